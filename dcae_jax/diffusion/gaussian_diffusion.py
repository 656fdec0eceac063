"""DiT's discrete Gaussian diffusion (ADM/IDDPM `GaussianDiffusion` + `SpacedDiffusion`), in JAX (diffusion.md §3.3, §4.3).

What DiT on DC-AE latents needs, as efficientvit builds it with `create_diffusion`:

* the linear beta schedule 1e-4 .. 0.02 over 1000 steps, epsilon prediction, learned-range variance;
* `space_timesteps` respacing (evaluation: 250 steps) -- the kept original steps, with betas recomputed
  from the kept cumulative products so the respaced chain has the same marginals;
* `ddpm_sample`: ancestral sampling (`p_sample_loop`, ``clip_denoised=False``) as one `lax.scan`;
* `dit_classifier_free_guidance`: the reference's `forward_with_cfg` (guidance on the first
  `in_channels` output channels, the variance channels taken from the conditional pass);
* `DiTObjective`: the training loss, MSE on epsilon + the VLB term for the variance with the mean's
  gradient stopped (``LossType.MSE`` with ``LEARNED_RANGE``).

Schedule tables are float64 NumPy on the host (like the reference); values are gathered per example
and cast to float32 on device (the reference's ``_extract_into_tensor(...).float()``). Latents are NHWC,
so the epsilon / variance split is on the last axis. Model functions are called as ``fn(x, t)`` with
``t`` (B,) float32 holding the *original* step index (0..999) the network was trained on.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]  # (x (B, H, W, C), t (B,) float32) -> (B, H, W, 2C)
VARIANCES = ("learned_range", "fixed_small", "fixed_large")


def linear_betas(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Ho et al.'s linear schedule extended to any step count (ADM `get_named_beta_schedule("linear")`), float64."""
    scale = 1000.0 / num_steps
    return np.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: int | str | Sequence[int]) -> list[int]:
    """Original steps kept by a respaced process, sorted (ADM `space_timesteps`).

    The process is cut into ``len(section_counts)`` nearly equal sections (the first ``num_timesteps %
    len`` one step longer); section i keeps ``section_counts[i]`` steps at fractional stride
    ``(size - 1) / (count - 1)`` from its start, each rounded (Python's round: half to even).
    ``"ddimN"`` instead takes the integer stride that gives exactly N steps from 0.
    ``"250"`` / ``250`` -> 250 steps over [0, 999] (the DiT evaluation sampler).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps out of {num_timesteps} with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        idx = 0.0
        for _ in range(count):  # accumulate the float stride (not j * stride) so rounding ties match the reference
            steps.append(start + round(idx))
            idx += stride
        start += size
    return sorted(set(steps))


def _extract(table: np.ndarray, t: Array, like: Array) -> Array:
    """float64 host table -> per-example float32 values (B, 1, ..., 1) gathered at int indices t (B,)."""
    v = jnp.asarray(table, jnp.float32)[t]
    return v.reshape(v.shape + (1,) * (like.ndim - 1))


def _mean_flat(x: Array) -> Array:
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


class GaussianDiffusion:
    """A discrete diffusion given by its betas: float64 tables of q and of the posterior q(x_{k-1} | x_k, x_0).

    Index k runs over *this* process's steps (0 = the first, least noisy). `timestep_map[k]` is the original
    step the network sees (the identity unless respaced).
    """

    def __init__(self, betas: np.ndarray, timestep_map: Sequence[int] | None = None):
        betas = np.asarray(betas, np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be 1-D and in (0, 1]")
        n = len(betas)
        self.betas = betas
        self.num_timesteps = n
        self.timestep_map = np.arange(n) if timestep_map is None else np.asarray(timestep_map, np.int64)
        if self.timestep_map.shape != (n,):
            raise ValueError(f"timestep_map must have {n} entries")

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        # Posterior q(x_{k-1} | x_k, x_0): variance is 0 at k = 0, so its log is clipped to the value at k = 1.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:])) if n > 1 else np.array([])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    @classmethod
    def linear(cls, num_steps: int = 1000) -> GaussianDiffusion:
        """DiT's training process: `linear_betas(num_steps)`."""
        return cls(linear_betas(num_steps))

    def respace(self, section_counts: int | str | Sequence[int]) -> GaussianDiffusion:
        """`SpacedDiffusion`: keep `space_timesteps(N, section_counts)`; beta_j = 1 - abar_{k_j} / abar_{k_{j-1}}."""
        kept = space_timesteps(self.num_timesteps, section_counts)
        abar = self.alphas_cumprod[kept]
        betas = 1.0 - abar / np.append(1.0, abar[:-1])
        return GaussianDiffusion(betas, self.timestep_map[kept])

    def log_variance_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(min, max) log variances that learned-range values -1 / +1 select: clipped posterior and beta."""
        return self.posterior_log_variance_clipped, np.log(self.betas)

    # ---- per-example quantities, t (B,) int indices into this process ----

    def q_sample(self, x0: Array, t: Array, noise: Array) -> Array:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        return (
            _extract(self.sqrt_alphas_cumprod, t, x0) * x0 + _extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def q_posterior_mean_variance(self, x0: Array, x_t: Array, t: Array) -> tuple[Array, Array, Array]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x0)."""
        mean = _extract(self.posterior_mean_coef1, t, x_t) * x0 + _extract(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, _extract(self.posterior_variance, t, x_t), _extract(self.posterior_log_variance_clipped, t, x_t)

    def predict_xstart_from_eps(self, x_t: Array, t: Array, eps: Array) -> Array:
        return (
            _extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def model_log_variance(self, model_output: Array, x_t: Array, t: Array, variance: str = "learned_range") -> Array:
        """log variance of p(x_{t-1} | x_t): learned-range values v in [-1, 1] interpolate between the bounds."""
        if variance == "learned_range":
            v = model_output[..., x_t.shape[-1] :]
            if v.shape != x_t.shape:
                raise ValueError(
                    f"learned_range needs 2C = {2 * x_t.shape[-1]} output channels, got {model_output.shape}"
                )
            min_log, max_log = self.log_variance_bounds()
            frac = (v + 1.0) / 2.0
            return frac * _extract(max_log, t, x_t) + (1.0 - frac) * _extract(min_log, t, x_t)
        if variance == "fixed_small":
            return _extract(self.posterior_log_variance_clipped, t, x_t) * jnp.ones_like(x_t)
        if variance == "fixed_large":
            large = np.log(np.append(self.posterior_variance[1], self.betas[1:]))
            return _extract(large, t, x_t) * jnp.ones_like(x_t)
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")

    def p_mean_variance(
        self, model_output: Array, x_t: Array, t: Array, *, clip_denoised: bool = False, variance: str = "learned_range"
    ) -> dict[str, Array]:
        """p(x_{t-1} | x_t) from the network output (B, H, W, 2C) = [eps, variance values]."""
        eps = model_output[..., : x_t.shape[-1]]
        log_variance = self.model_log_variance(model_output, x_t, t, variance)
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {
            "mean": mean,
            "variance": jnp.exp(log_variance),
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
        }


# ------------------------------------------------------------------------------------------------
# Sampling.


def dit_classifier_free_guidance(
    apply_fn: Callable[[Array, Array, Array], Array], y: Array, *, null_class: int, scale: float, guided_channels: int
) -> ModelFn:
    """The reference's `DiT.forward_with_cfg` as a model function ``fn(x, t)`` (diffusion.md §4.4).

    ``scale == 1``: one conditional pass. Otherwise one batched pass on ``[x; x]`` with labels
    ``[y; null_class]``; the first `guided_channels` output channels (epsilon: pass ``in_channels``)
    become ``u + scale * (c - u)``, the rest (learned-range variance values) are the conditional pass's.
    """
    if float(scale) == 1.0:
        return lambda x, t: apply_fn(x, t, y)
    labels = jnp.concatenate([y, jnp.full_like(y, null_class)])  # (2B,)

    def guided(x: Array, t: Array) -> Array:
        out = apply_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), labels)  # (2B, H, W, 2C)
        cond, uncond = jnp.split(out.astype(jnp.promote_types(out.dtype, jnp.float32)), 2)
        c = guided_channels
        eps = uncond[..., :c] + scale * (cond[..., :c] - uncond[..., :c])
        return jnp.concatenate([eps, cond[..., c:]], axis=-1)

    return guided


def ddpm_sample(
    model_fn: ModelFn,
    x_T: Array,
    rng: Array,
    *,
    num_steps: int | str | Sequence[int] | None = 250,
    diffusion: GaussianDiffusion | None = None,
    clip_denoised: bool = False,
    variance: str = "learned_range",
) -> Array:
    """Ancestral DDPM sampling (`p_sample_loop`) from x_T to x_0 under one `lax.scan`; jittable.

    Args:
      model_fn: ``(x (B, H, W, C), t (B,) float32 original step) -> (B, H, W, 2C)`` (epsilon, variance
        values); guide it with `dit_classifier_free_guidance` first.
      x_T: (B, H, W, C) initial Gaussian noise.
      rng: the per-step noise key. Step j (j = 0 is the first, noisiest step) draws
        ``jax.random.normal(jax.random.fold_in(rng, j), x_T.shape)``; the last step adds no noise.
      num_steps: respacing of `diffusion` (`space_timesteps` section counts; 250 = the DiT evaluation
        sampler); None uses `diffusion` as is.
      diffusion: the training process; default `GaussianDiffusion.linear(1000)`. Static (host tables).
      clip_denoised: clip the x_0 prediction to [-1, 1] (False for latents, as the reference).
      variance: "learned_range" (DiT), or "fixed_small" / "fixed_large" for epsilon-only models.

    Returns:
      x_0, float32 (float64 for float64 input).
    """
    base = GaussianDiffusion.linear() if diffusion is None else diffusion
    proc = base if num_steps is None else base.respace(num_steps)
    dtype = jnp.promote_types(x_T.dtype, jnp.float32)
    n = proc.num_timesteps
    ks = np.arange(n - 1, -1, -1)  # this process's indices, noisiest first
    steps = {
        "k": jnp.asarray(ks, jnp.int32),
        "t_model": jnp.asarray(proc.timestep_map[ks], dtype),
        "j": jnp.arange(n, dtype=jnp.uint32),
    }

    def step(x, row):
        k = jnp.full(x.shape[:1], row["k"])  # (B,)
        out = model_fn(x, jnp.full(x.shape[:1], row["t_model"], dtype)).astype(dtype)
        p = proc.p_mean_variance(out, x, k, clip_denoised=clip_denoised, variance=variance)
        noise = jax.random.normal(jax.random.fold_in(rng, row["j"]), x.shape, dtype)
        nonzero = (row["k"] != 0).astype(dtype)  # no noise at the final step
        return (p["mean"] + nonzero * jnp.exp(0.5 * p["log_variance"]) * noise).astype(dtype), None

    x, _ = lax.scan(step, x_T.astype(dtype), steps)
    return x


# ------------------------------------------------------------------------------------------------
# Training loss.


def normal_kl(mean1: Array, logvar1: Array, mean2: Array, logvar2: Array) -> Array:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _approx_standard_normal_cdf(x: Array) -> Array:
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Array, *, means: Array, log_scales: Array) -> Array:
    """log P(bin of x) under N(means, e^{2 log_scales}) for 256 bins on [-1, 1] (ADM's decoder NLL), in nats.

    The reference applies it to latents as if they were 8-bit images; only the t = 0 term uses it.
    """
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


@dataclasses.dataclass(frozen=True)
class DiTObjective:
    """DiT's training loss (``create_diffusion(timestep_respacing="")``: MSE loss, learned-range variance).

    t ~ U{0..N-1}, eps ~ N(0, I), x_t = q_sample(x0, t, eps); the network gives [eps_hat, v] (2C channels);
    loss = mean over examples of  mean_flat((eps - eps_hat)^2) + vb,  where vb (bits per dim) is
    KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) -- or the decoder NLL at t = 0 -- computed with eps_hat
    under stop_gradient, so only the variance values learn from it.
    """

    num_steps: int = 1000

    def diffusion(self) -> GaussianDiffusion:
        # The reference wraps even the full process in SpacedDiffusion: betas recomputed from abar ratios.
        return GaussianDiffusion.linear(self.num_steps).respace([self.num_steps])

    def losses(self, apply_fn: Callable[[Array, Array], Array], x0: Array, t: Array, noise: Array) -> dict[str, Array]:
        """Per-example terms (B,) for given steps t (B,) int and noise like x0 (`training_losses`)."""
        proc = self.diffusion()
        x0 = x0.astype(jnp.float32)
        x_t = proc.q_sample(x0, t, noise)
        out = apply_fn(x_t, jnp.asarray(proc.timestep_map, jnp.float32)[t]).astype(jnp.float32)
        c = x0.shape[-1]
        if out.shape != (*x0.shape[:-1], 2 * c):
            raise ValueError(f"DiT output must have 2C = {2 * c} channels (learned sigma), got {out.shape}")
        eps_hat = out[..., :c]
        frozen = jnp.concatenate([lax.stop_gradient(eps_hat), out[..., c:]], axis=-1)

        true_mean, _, true_log_var = proc.q_posterior_mean_variance(x0, x_t, t)
        p = proc.p_mean_variance(frozen, x_t, t, clip_denoised=False)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, means=p["mean"], log_scales=0.5 * p["log_variance"])
        vb = jnp.where(t == 0, _mean_flat(nll) / math.log(2.0), kl)
        mse = _mean_flat(jnp.square(noise - eps_hat))
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def loss(self, apply_fn: Callable[[Array, Array], Array], x0: Array, rng: Array) -> tuple[Array, dict[str, Array]]:
        """Loss on clean latents x0 (B, H, W, C); `apply_fn(x_t, t)` gets the step t as float32 (B,)."""
        rng_t, rng_eps = jax.random.split(rng)
        t = jax.random.randint(rng_t, x0.shape[:1], 0, self.num_steps)  # (B,) in 0..N-1
        noise = jax.random.normal(rng_eps, x0.shape, jnp.float32)
        terms = self.losses(apply_fn, x0, t, noise)
        aux = {k: jnp.mean(v) for k, v in terms.items() if k != "loss"}
        return jnp.mean(terms["loss"]), aux
