"""Training objectives for diffusion on DC-AE latents (efficientvit `diffusioncore`, diffusion.md §3).

* `EpsilonObjective`: UViT's ``train_scheduler="DPM_Solver"``, discrete epsilon-prediction on the
  Stable-Diffusion "scaled linear" schedule. The network sees the 1-based integer step n as time.
* `VelocityObjective`: USiT's SiT linear interpolant (t=0 noise, t=1 data), velocity target, t in [0, 1].

Both take ``apply_fn(x_t, t) -> prediction`` with ``x_t`` like the data and ``t`` of shape (B,) float32,
and return ``(loss, aux)`` with float32 scalars, so they drop into a jitted train step (label dropout and
the class labels live in `apply_fn`). Everything is elementwise over the batch: sharded batches stay sharded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ApplyFn = Callable[[Array, Array], Array]  # (x_t (B, ...), t (B,) float32) -> (B, ...)


def scaled_linear_betas(num_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> np.ndarray:
    """SD "scaled linear" betas, float64 (the reference computes them in float64 too).

    ``beta_n = linspace(sqrt(beta_start), sqrt(beta_end), num_steps)[n - 1] ** 2`` for n = 1..num_steps.
    """
    return np.linspace(np.sqrt(beta_start), np.sqrt(beta_end), num_steps, dtype=np.float64) ** 2


def _per_example(v: Array, like: Array) -> Array:
    """(B,) -> (B, 1, ..., 1) so a per-example scalar broadcasts against `like` (B, ...)."""
    return v.reshape(v.shape + (1,) * (like.ndim - 1))


@dataclasses.dataclass(frozen=True)
class EpsilonObjective:
    """Discrete epsilon-prediction (U-ViT ``train_ldm_discrete``): the UViT objective.

    n ~ U{1..N}, eps ~ N(0, I), x_n = sqrt(abar_n) x0 + sqrt(1 - abar_n) eps,
    loss = mean((eps - apply_fn(x_n, n))^2) over all elements (plain MSE, no weighting).
    """

    num_steps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012

    def alphas_cumprod(self) -> np.ndarray:
        """(N,) float64; entry n - 1 is abar_n = prod_{i <= n} (1 - beta_i)."""
        return np.cumprod(1.0 - scaled_linear_betas(self.num_steps, self.beta_start, self.beta_end))

    def add_noise(self, x0: Array, n: Array, eps: Array) -> Array:
        """x_n = sqrt(abar_n) x0 + sqrt(1 - abar_n) eps; x0, eps (B, ...), n (B,) int in 1..N."""
        abar = self.alphas_cumprod()
        # float64 square roots on the host, one float32 gather per example.
        sqrt_abar = jnp.asarray(np.sqrt(abar), jnp.float32)[n - 1]  # (B,)
        sqrt_one_minus = jnp.asarray(np.sqrt(1.0 - abar), jnp.float32)[n - 1]  # (B,)
        return _per_example(sqrt_abar, x0) * x0 + _per_example(sqrt_one_minus, x0) * eps

    def loss(self, apply_fn: ApplyFn, x0: Array, rng: Array) -> tuple[Array, dict[str, Array]]:
        """Loss on clean latents x0 (B, ...); `apply_fn` gets the integer step n as float32 (B,)."""
        x0 = x0.astype(jnp.float32)
        rng_n, rng_eps = jax.random.split(rng)
        n = jax.random.randint(rng_n, x0.shape[:1], 1, self.num_steps + 1)  # (B,) in 1..N
        eps = jax.random.normal(rng_eps, x0.shape, jnp.float32)
        x_n = self.add_noise(x0, n, eps)
        eps_hat = apply_fn(x_n, n.astype(jnp.float32)).astype(jnp.float32)
        mse = jnp.mean(jnp.square(eps - eps_hat))
        return mse, {"mse": mse}


@dataclasses.dataclass(frozen=True)
class VelocityObjective:
    """SiT linear interpolant with velocity prediction: the USiT objective.

    t ~ U[0, 1), x0 ~ N(0, I) (noise), x1 = data, x_t = t x1 + (1 - t) x0, target u = x1 - x0,
    loss = mean over examples of mean over (H, W, C) of (apply_fn(x_t, t) - u)^2. t is fed unscaled.
    """

    @staticmethod
    def interpolate(x0: Array, x1: Array, t: Array) -> Array:
        """x_t = t x1 + (1 - t) x0; x0, x1 (B, ...), t (B,)."""
        t = _per_example(t, x1)
        return t * x1 + (1.0 - t) * x0

    def loss(self, apply_fn: ApplyFn, x1: Array, rng: Array) -> tuple[Array, dict[str, Array]]:
        """Loss on clean latents x1 (B, ...); `apply_fn` gets t in [0, 1) as float32 (B,)."""
        x1 = x1.astype(jnp.float32)
        rng_t, rng_x0 = jax.random.split(rng)
        t = jax.random.uniform(rng_t, x1.shape[:1], jnp.float32)  # (B,) in [0, 1)
        x0 = jax.random.normal(rng_x0, x1.shape, jnp.float32)
        v_hat = apply_fn(self.interpolate(x0, x1, t), t).astype(jnp.float32)
        per_example = jnp.mean(jnp.square(v_hat - (x1 - x0)), axis=tuple(range(1, x1.ndim)))  # (B,)
        mse = jnp.mean(per_example)
        return mse, {"mse": mse}
