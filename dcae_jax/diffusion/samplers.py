"""Samplers for UViT (DPM-Solver++) and USiT (ODE) on DC-AE latents, in pure JAX (diffusion.md §4).

* `classifier_free_guidance`: wraps ``apply_fn(x, t, y)`` into a guided ``fn(x, t)``.
* `NoiseScheduleVP` + `dpm_solver_pp`: DPM-Solver++ (data prediction) for the discrete epsilon model,
  singlestep "fast" exactly as the reference's 30-NFE sampler, or multistep as diffusers'.
* `ode_sample`: Euler / Heun / adaptive Dopri5 for the velocity model (t=0 noise, t=1 data).

Every sampler is jittable as a whole. Solver coefficients depend only on static arguments, so they are
computed on the host in float64 at trace time; on device there are only model calls and elementwise
linear combinations over the batch (no host syncs; batch-sharded inputs stay sharded). Model calls sit
inside a `lax.scan` / `lax.while_loop`, so a big network is traced once (Dopri5: three times), not once
per function evaluation: compile time does not grow with the step count.

Model functions are called as ``fn(x, t)`` with ``x`` (B, ...) and ``t`` of shape (B,).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]  # (x (B, ...), t (B,)) -> (B, ...)


def _batch_time(t: Any, x: Array) -> Array:
    """A scalar or (B,) time as (B,), so every model call sees one time per example."""
    return jnp.broadcast_to(jnp.asarray(t), x.shape[:1])


# ------------------------------------------------------------------------------------------------
# Classifier-free guidance.


def classifier_free_guidance(
    apply_fn: Callable[[Array, Array, Array], Array], y: Array, *, null_class: int, scale: float
) -> ModelFn:
    """Guided model ``fn(x, t)`` from a class-conditional ``apply_fn(x, t, y)`` (diffusion.md §4.4).

    ``scale == 1`` disables guidance: one conditional pass. Otherwise one batched pass on ``[x; x]`` with
    labels ``[y; null_class]`` and ``out = u + scale * (c - u)`` on all channels, in float32. This equals
    the UViT reference's two-pass ``c + (scale - 1)(c - u)``. `scale` is a static Python number.

    Args:
      apply_fn: the network, ``(x (B, ...), t (B,), y (B,) int) -> (B, ...)``.
      y: class labels (B,).
      null_class: the unconditional label (1000 for the ImageNet models).
      scale: guidance scale.
    """
    if float(scale) == 1.0:
        return lambda x, t: apply_fn(x, _batch_time(t, x), y)

    labels = jnp.concatenate([y, jnp.full_like(y, null_class)])  # (2B,)

    def guided(x: Array, t: Array) -> Array:
        t = _batch_time(t, x)
        out = apply_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), labels)  # (2B, ...)
        cond, uncond = jnp.split(out.astype(jnp.promote_types(out.dtype, jnp.float32)), 2)
        return uncond + scale * (cond - uncond)

    return guided


# ------------------------------------------------------------------------------------------------
# Discrete VP noise schedule, seen as continuous in t (DPM-Solver's NoiseScheduleVP "discrete").


def _array_module(x: Any) -> Any:
    """numpy for host values (static times: float64 coefficients), jax.numpy for traced ones."""
    return np if isinstance(x, (int, float, np.ndarray, np.generic)) else jnp


def _interp(x: Any, xp: np.ndarray, fp: np.ndarray) -> Any:
    """Piecewise-linear f(x) through the knots (xp increasing), extended linearly beyond both ends.

    Unlike `np.interp` (which clamps), the outermost segments extend to infinity, as the reference's
    `interpolate_fn`: the schedule is defined a little outside [1/N, 1].
    """
    m = _array_module(x)
    if m is jnp:
        x = jnp.asarray(x)
        dtype = jnp.promote_types(x.dtype, jnp.float32)
        x, xp, fp = x.astype(dtype), jnp.asarray(xp, dtype), jnp.asarray(fp, dtype)
    idx = m.clip(m.searchsorted(xp, x) - 1, 0, len(xp) - 2)
    x_lo, x_hi, f_lo, f_hi = xp[idx], xp[idx + 1], fp[idx], fp[idx + 1]
    return f_lo + (x - x_lo) * ((f_hi - f_lo) / (x_hi - x_lo))


class NoiseScheduleVP:
    """VP schedule from discrete betas, as DPM-Solver's ``NoiseScheduleVP(schedule="discrete")``.

    Knots t_n = n / N (n = 1..N) carry log alpha_n = 0.5 * cumsum(log(1 - beta))_n, i.e.
    alpha_n = sqrt(abar_n); log alpha(t) is piecewise linear in t between knots (linear extrapolation
    outside). sigma = sqrt(1 - alpha^2), lambda = log alpha - log sigma (half log-SNR).

    Methods take host values (Python / NumPy floats -> float64 NumPy, used for solver coefficients)
    or jax arrays (-> jax arrays, jittable).
    """

    def __init__(self, betas: np.ndarray | None = None, *, alphas_cumprod: np.ndarray | None = None):
        if (betas is None) == (alphas_cumprod is None):
            raise ValueError("pass exactly one of betas, alphas_cumprod")
        if betas is not None:
            log_alpha = 0.5 * np.cumsum(np.log1p(-np.asarray(betas, np.float64)))
        else:
            log_alpha = 0.5 * np.log(np.asarray(alphas_cumprod, np.float64))
        self.total_N = len(log_alpha)
        self.T = 1.0
        self.t_knots = np.arange(1, self.total_N + 1, dtype=np.float64) / self.total_N  # (N,)
        self.log_alpha_knots = log_alpha  # (N,), decreasing

    def marginal_log_mean_coeff(self, t: Any) -> Any:
        """log alpha(t)."""
        return _interp(t, self.t_knots, self.log_alpha_knots)

    def marginal_alpha(self, t: Any) -> Any:
        return _array_module(t).exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t: Any) -> Any:
        """sigma(t) = sqrt(1 - alpha(t)^2)."""
        m = _array_module(t)
        return m.sqrt(-m.expm1(2.0 * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t: Any) -> Any:
        """lambda(t) = log alpha(t) - log sigma(t)."""
        m = _array_module(t)
        log_alpha = self.marginal_log_mean_coeff(t)
        return log_alpha - 0.5 * m.log(-m.expm1(2.0 * log_alpha))

    def inverse_lambda(self, lamb: Any) -> Any:
        """t with lambda(t) = lamb: log alpha = -0.5 log(1 + e^{-2 lamb}), then interpolate t(log alpha)."""
        m = _array_module(lamb)
        log_alpha = -0.5 * m.logaddexp(0.0, -2.0 * lamb)
        return _interp(log_alpha, self.log_alpha_knots[::-1], self.t_knots[::-1])


# ------------------------------------------------------------------------------------------------
# DPM-Solver++ (data prediction, no thresholding), compiled into a program of model evaluations.
#
# Every DPM-Solver++ update is linear in the current anchor x_s and the data predictions D = x0_hat
# made so far, with coefficients that depend only on the (static) time grid. So a sampler is a list of
# stages: evaluate D at (x_eval, t), then x_new = coef_x * x_anchor + coef_d . [D_new, D_prev, D_prev2];
# x_new is the next evaluation point, and also the new anchor when it ends a solver step.


@dataclasses.dataclass(frozen=True)
class _Stage:
    t: float  # continuous time of the model evaluation
    coef_x: float  # weight of the anchor x
    coef_d: np.ndarray  # (3,) weights of the data predictions, newest first
    ends_step: bool  # x_new becomes the anchor


_D = np.eye(3)  # data predictions as unit vectors over the buffer: _D[0] newest, _D[1], _D[2] older


def time_uniform_grid(t_start: float, t_end: float, steps: int) -> np.ndarray:
    """(steps + 1,) float64 times linspace(t_start, t_end): the reference's ``skip_type="time_uniform"``."""
    return np.linspace(t_start, t_end, steps + 1, dtype=np.float64)


def singlestep_orders(steps: int, order: int) -> list[int]:
    """Orders of the reference's "fast" singlestep solver; they sum to `steps` (= NFE).

    order 3: K = steps // 3 + 1 steps, [3] * (K - 2) + [2, 1] if steps % 3 == 0 else
    [3] * (K - 1) + [steps % 3] (steps=30 -> [3] * 9 + [2, 1]); order 2: [2] * (steps // 2) (+ [1]);
    order 1: [1] * steps (DDIM).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if order == 3:
        k, rem = steps // 3 + 1, steps % 3
        return [3] * (k - 2) + [2, 1] if rem == 0 else [3] * (k - 1) + [rem]
    if order == 2:
        return [2] * (steps // 2) + [1] * (steps % 2)
    if order == 1:
        return [1] * steps
    raise ValueError(f"order must be 1, 2 or 3, got {order}")


def multistep_orders(steps: int, order: int, lower_order_final: bool = True) -> list[int]:
    """Orders of multistep DPM-Solver++ as diffusers: warm-up 1, 2, ..; with `lower_order_final` and
    fewer than 15 steps, the last step is first order and the one before at most second order."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    orders = [min(order, j + 1) for j in range(steps)]
    if lower_order_final and steps < 15:
        orders[-1] = 1
        if steps >= 2:
            orders[-2] = min(orders[-2], 2)
    return orders


def _singlestep_stages(ns: NoiseScheduleVP, s: float, t: float, order: int, r: Sequence[float]) -> list[_Stage]:
    """One singlestep DPM-Solver++ step s -> t ("dpm_solver" type, diffusion.md §4.1): `order` stages.

    r = (r1, r2): intermediate points at lambda_s + r_k h, mapped back through `inverse_lambda`.
    """
    lam_s = ns.marginal_lambda(s)
    h = ns.marginal_lambda(t) - lam_s
    alpha, sigma = ns.marginal_alpha, ns.marginal_std
    phi1 = np.expm1(-h)
    if order == 1:
        d_s = _D[0]
        return [_Stage(s, sigma(t) / sigma(s), -alpha(t) * phi1 * d_s, True)]

    r1 = r[0]
    s1 = ns.inverse_lambda(lam_s + r1 * h)
    # Stage at s (buffer [D_s]): u1 = (sigma_s1 / sigma_s) x - alpha_s1 (e^{-r1 h} - 1) D_s.
    first = _Stage(s, sigma(s1) / sigma(s), -alpha(s1) * np.expm1(-r1 * h) * _D[0], False)
    if order == 2:
        d_s1, d_s = _D[0], _D[1]  # buffer [D_s1, D_s]
        coef = -alpha(t) * phi1 * d_s - (0.5 / r1) * alpha(t) * phi1 * (d_s1 - d_s)
        return [first, _Stage(s1, sigma(t) / sigma(s), coef, True)]
    if order != 3:
        raise ValueError(f"order must be 1, 2 or 3, got {order}")

    r2 = r[1]
    s2 = ns.inverse_lambda(lam_s + r2 * h)
    phi22 = np.expm1(-r2 * h) / (r2 * h) + 1.0
    phi2 = phi1 / h + 1.0
    d_s1, d_s = _D[0], _D[1]  # buffer [D_s1, D_s]
    coef_u2 = -alpha(s2) * np.expm1(-r2 * h) * d_s + (r2 / r1) * alpha(s2) * phi22 * (d_s1 - d_s)
    d_s2, d_s = _D[0], _D[2]  # buffer [D_s2, D_s1, D_s]
    coef_t = -alpha(t) * phi1 * d_s + (1.0 / r2) * alpha(t) * phi2 * (d_s2 - d_s)
    return [first, _Stage(s1, sigma(s2) / sigma(s), coef_u2, False), _Stage(s2, sigma(t) / sigma(s), coef_t, True)]


def _singlestep_program(ns: NoiseScheduleVP, grid: np.ndarray, orders: Sequence[int]) -> list[_Stage]:
    """The reference's "fast" method: an order-k step spans k grid intervals, r_k from the grid."""
    stages, i = [], 0
    lam = [ns.marginal_lambda(u) for u in grid]
    for order in orders:
        h = lam[i + order] - lam[i]
        r = [(lam[i + k] - lam[i]) / h for k in range(1, order)]
        stages += _singlestep_stages(ns, grid[i], grid[i + order], order, r)
        i += order
    return stages


def _multistep_program(ns: NoiseScheduleVP, grid: np.ndarray, orders: Sequence[int]) -> list[_Stage]:
    """Multistep DPM-Solver++ (diffusers' "midpoint" 2nd order, and its 3rd order): one stage per step."""
    lam = [ns.marginal_lambda(u) for u in grid]
    m0, m1, m2 = _D  # D at t_j, t_{j-1}, t_{j-2}
    stages = []
    for j, order in enumerate(orders):
        s, t = grid[j], grid[j + 1]
        h = lam[j + 1] - lam[j]
        alpha_t, phi1 = ns.marginal_alpha(t), np.expm1(-h)
        coef = -alpha_t * phi1 * m0
        if order >= 2:
            r0 = (lam[j] - lam[j - 1]) / h
            d1_0 = (m0 - m1) / r0
        if order == 2:
            coef = coef - 0.5 * alpha_t * phi1 * d1_0
        elif order == 3:
            r1 = (lam[j - 1] - lam[j - 2]) / h
            d1_1 = (m1 - m2) / r1
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi2 = phi1 / h + 1.0
            phi3 = (phi1 + h) / h**2 - 0.5
            coef = coef + alpha_t * phi2 * d1 - alpha_t * phi3 * d2
        stages.append(_Stage(s, ns.marginal_std(t) / ns.marginal_std(s), coef, True))
    return stages


def _run_program(eps_fn: ModelFn, x_T: Array, stages: Sequence[_Stage], ns: NoiseScheduleVP) -> Array:
    """Run the stages under one `lax.scan` (one traced model call); returns the last anchor."""
    dtype = jnp.promote_types(x_T.dtype, jnp.float32)
    x = x_T.astype(dtype)
    t = np.array([st.t for st in stages], np.float64)  # (S,)
    rows = {
        "t_input": jnp.asarray(t * ns.total_N, dtype),  # the model's time: t_cont * N, in (0, N]
        "alpha": jnp.asarray(ns.marginal_alpha(t), dtype),
        "sigma": jnp.asarray(ns.marginal_std(t), dtype),
        "coef_x": jnp.asarray([st.coef_x for st in stages], dtype),
        "coef_d": jnp.asarray(np.stack([st.coef_d for st in stages]), dtype),  # (S, 3)
        "ends_step": jnp.asarray([st.ends_step for st in stages]),
    }

    def stage(carry, row):
        x_anchor, x_eval, d_prev, d_prev2 = carry  # (B, ...) each
        eps = eps_fn(x_eval, jnp.full(x.shape[:1], row["t_input"], dtype)).astype(dtype)
        d_new = (x_eval - row["sigma"] * eps) / row["alpha"]  # data prediction x0_hat
        c = row["coef_d"]
        x_new = row["coef_x"] * x_anchor + c[0] * d_new + c[1] * d_prev + c[2] * d_prev2
        x_anchor = jnp.where(row["ends_step"], x_new, x_anchor)
        return (x_anchor, x_new, d_new, d_prev), None

    zeros = jnp.zeros_like(x)
    (x_out, *_), _ = lax.scan(stage, (x, x, zeros, zeros), rows)
    return x_out


def dpm_solver_pp(
    eps_fn: ModelFn,
    x_T: Array,
    *,
    schedule: NoiseScheduleVP,
    steps: int = 30,
    order: int = 3,
    method: str = "singlestep",
    t_end: float = 1e-3,
    t_start: float = 1.0,
    lower_order_final: bool = True,
    time_grid: Sequence[float] | None = None,
) -> Array:
    """DPM-Solver++ (data prediction) from x_T at `t_start` to x_0 at `t_end`; NFE == steps.

    `eps_fn(x, t_input)` is the epsilon network with t_input = t_cont * N (B,), fractional in (0, N]
    (the reference's model wrapper). Guide it with `classifier_free_guidance` first.

    method="singlestep": the reference's ``DPM_Solver.sample(method="fast", skip_type="time_uniform",
      solver_type="dpm_solver")``: grid linspace(t_start, t_end, steps + 1), orders from
      `singlestep_orders` (30 -> [3] * 9 + [2, 1]); each order-k step spans k intervals and takes its
      intermediate points from the grid's lambdas. The UViT evaluation sampler (steps=30, order=3).
    method="multistep": multistep DPM-Solver++ on the same grid, orders from `multistep_orders`.
      With t_start=1, t_end=1/N this is diffusers' ``DPMSolverMultistepScheduler(algorithm_type=
      "dpmsolver++", solver_type="midpoint", timestep_spacing="linspace", final_sigmas_type="sigma_min",
      lower_order_final=True)`` when (N - 1) / steps is an integer (e.g. 9, 27, 37 steps); otherwise
      diffusers rounds its timesteps to integers: pass ``time_grid=(timesteps + 1) / N`` plus [1 / N]
      to match it exactly (diffusers' integer timestep k is time (k + 1) / N here).

    Args:
      time_grid: optional decreasing (steps + 1,) continuous times; overrides t_start / t_end.
      lower_order_final: multistep only, diffusers' flag (takes effect below 15 steps).

    Returns:
      x_0 like x_T, float32 (float64 for float64 input).
    """
    if time_grid is None:
        grid = time_uniform_grid(t_start, t_end, steps)
    else:
        grid = np.asarray(time_grid, np.float64)
        if grid.ndim != 1 or len(grid) != steps + 1 or not np.all(np.diff(grid) < 0):
            raise ValueError(f"time_grid must be decreasing with steps + 1 = {steps + 1} entries")
    if method == "singlestep":
        stages = _singlestep_program(schedule, grid, singlestep_orders(steps, order))
    elif method == "multistep":
        stages = _multistep_program(schedule, grid, multistep_orders(steps, order, lower_order_final))
    else:
        raise ValueError(f"method must be 'singlestep' or 'multistep', got {method!r}")
    return _run_program(eps_fn, x_T, stages, schedule)


# ------------------------------------------------------------------------------------------------
# ODE samplers for the velocity model (SiT: t0=0 noise -> t1=1 data).

# Dormand–Prince 5(4): nodes, stage matrix (row 6 = the 5th-order weights: FSAL), 5th / 4th-order weights.
_DP_C = np.array([0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0])
_DP_A = np.array(
    [
        [0, 0, 0, 0, 0, 0, 0],
        [1 / 5, 0, 0, 0, 0, 0, 0],
        [3 / 40, 9 / 40, 0, 0, 0, 0, 0],
        [44 / 45, -56 / 15, 32 / 9, 0, 0, 0, 0],
        [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729, 0, 0, 0],
        [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656, 0, 0],
        [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0],
    ]
)
_DP_B5 = _DP_A[6]
_DP_B4 = np.array([5179 / 57600, 0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40])
# torchdiffeq's step-size controller constants.
_SAFETY, _IFACTOR, _DFACTOR = 0.9, 10.0, 0.2


def _rms(v: Array) -> Array:
    """torchdiffeq's norm: root mean square over every element (the whole batch)."""
    return jnp.sqrt(jnp.mean(jnp.square(v)))


def _fixed_step_solve(f: Callable[[Array, Array], Array], x: Array, ts: np.ndarray, heun: bool) -> Array:
    """Euler or Heun (explicit trapezoid, torchdiffeq "heun2") over the grid `ts`, under `lax.scan`."""

    def step(x, t_dt):
        t, dt = t_dt[0], t_dt[1]
        k1 = f(x, t)
        if not heun:
            return x + dt * k1, None
        k2 = f(x + dt * k1, t + dt)
        return x + 0.5 * dt * (k1 + k2), None

    t_dt = jnp.asarray(np.stack([ts[:-1], np.diff(ts)], axis=1), x.dtype)  # (num_steps, 2)
    x, _ = lax.scan(step, x, t_dt)
    return x


def _initial_step(f, t0, t1, y0, f0, atol, rtol):
    """torchdiffeq's `_select_initial_step` (Hairer, order 4 for Dopri5); costs one evaluation.

    The probe step is capped at t1 - t0 (as scipy) so the model is never evaluated past t1.
    """
    scale = atol + jnp.abs(y0) * rtol
    d0, d1 = _rms(y0 / scale), _rms(f0 / scale)
    h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1)
    h0 = jnp.minimum(h0, t1 - t0)
    f1 = f(y0 + h0 * f0, t0 + h0)
    d2 = _rms((f1 - f0) / scale) / h0
    h1 = jnp.where(
        (d1 <= 1e-15) & (d2 <= 1e-15),
        jnp.maximum(1e-6, h0 * 1e-3),
        (0.01 / jnp.maximum(d1, d2)) ** (1.0 / 5.0),
    )
    return jnp.minimum(100.0 * h0, h1)


def _dopri5_solve(f, x, t0, t1, atol, rtol, max_steps):
    """Adaptive Dopri5 (local extrapolation, FSAL) with torchdiffeq's error norm and controller.

    error ratio = rms(err / (atol + rtol * max(|y0|, |y1|))), accept if <= 1; next step
    h * clip(0.9 * ratio^(-1/5), 0.2 (1 when accepted), 10). The last step is clipped to end at t1.
    """
    dtype = x.dtype
    a, c = jnp.asarray(_DP_A, dtype), jnp.asarray(_DP_C, dtype)
    b5, b_err = jnp.asarray(_DP_B5, dtype), jnp.asarray(_DP_B5 - _DP_B4, dtype)
    t0, t1 = jnp.asarray(t0, dtype), jnp.asarray(t1, dtype)

    f0 = f(x, t0)
    h = _initial_step(f, t0, t1, x, f0, atol, rtol)

    def weighted(w, ks):  # sum_j w[j] ks[j], elementwise (no reduced-precision dot)
        return sum(w[j] * ks[j] for j in range(7))

    def attempt(state):
        t, y, fy, h, nfe, n_acc, n_rej = state
        is_last = h >= t1 - t
        h = jnp.minimum(h, t1 - t)

        def stage(i, ks):
            return ks.at[i].set(f(y + h * weighted(a[i], ks), t + c[i] * h))

        ks = lax.fori_loop(1, 7, stage, jnp.zeros((7, *y.shape), dtype).at[0].set(fy))  # (7, B, ...)
        y_new = y + h * weighted(b5, ks)
        err = h * weighted(b_err, ks)
        ratio = _rms(err / (atol + rtol * jnp.maximum(jnp.abs(y), jnp.abs(y_new))))
        accept = ratio <= 1.0  # False for NaN
        factor = jnp.clip(_SAFETY * ratio ** (-1.0 / 5.0), jnp.where(accept, 1.0, _DFACTOR), _IFACTOR)
        factor = jnp.where(ratio == 0.0, _IFACTOR, jnp.where(jnp.isfinite(ratio), factor, _DFACTOR))
        return (
            jnp.where(accept, jnp.where(is_last, t1, t + h), t),
            jnp.where(accept, y_new, y),
            jnp.where(accept, ks[6], fy),  # FSAL: f(t + h, y_new)
            h * factor,
            nfe + 6,
            n_acc + accept.astype(jnp.int32),
            n_rej + (~accept).astype(jnp.int32),
        )

    def not_done(state):
        t, *_, n_acc, n_rej = state
        return (t < t1) & (n_acc + n_rej < max_steps)

    zero = jnp.zeros((), jnp.int32)
    t, y, _, _, nfe, n_acc, n_rej = lax.while_loop(not_done, attempt, (t0, x, f0, h, zero + 2, zero, zero))
    return y, {"nfe": nfe, "n_accepted": n_acc, "n_rejected": n_rej, "t": t}


def ode_sample(
    velocity_fn: ModelFn,
    x0: Array,
    *,
    method: str = "dopri5",
    num_steps: int = 250,
    atol: float = 1e-6,
    rtol: float = 1e-3,
    t0: float = 0.0,
    t1: float = 1.0,
    max_steps: int = 10_000,
) -> tuple[Array, dict[str, Array]]:
    """Integrate dx/dt = velocity_fn(x, t) from t0 to t1 > t0; the USiT sampler (diffusion.md §4.2).

    method="euler" / "heun": `num_steps` uniform intervals (1 / 2 evaluations each).
    method="dopri5": adaptive Dormand–Prince 5(4) under `lax.while_loop` (torchdiffeq's initial step,
      error norm and controller; `num_steps` is ignored: in the reference it only sets the output
      points, which do not change the adaptive steps). The error norm is an RMS over the whole batch
      (one global reduction per step, as torchdiffeq), so the step sequence depends on the batch.
      Stops after `max_steps` attempted steps; info["t"] < t1 then tells.

    Returns:
      (x1 like x0 in float32 (float64 for float64 input), info) with info["nfe"] (int32) the number of
      velocity evaluations; Dopri5 adds "n_accepted", "n_rejected", "t".
    """
    if not t1 > t0:
        raise ValueError(f"need t1 > t0 (forward time), got t0={t0}, t1={t1}")
    dtype = jnp.promote_types(x0.dtype, jnp.float32)
    x = x0.astype(dtype)

    def f(x: Array, t: Array) -> Array:
        return velocity_fn(x, jnp.full(x.shape[:1], t, dtype)).astype(dtype)

    if method in ("euler", "heun"):
        ts = np.linspace(t0, t1, num_steps + 1, dtype=np.float64)
        x = _fixed_step_solve(f, x, ts, heun=method == "heun")
        return x, {"nfe": jnp.asarray(num_steps * (2 if method == "heun" else 1), jnp.int32)}
    if method == "dopri5":
        return _dopri5_solve(f, x, t0, t1, atol, rtol, max_steps)
    raise ValueError(f"method must be 'euler', 'heun' or 'dopri5', got {method!r}")
