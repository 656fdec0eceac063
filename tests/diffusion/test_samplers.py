"""Samplers: CFG, the discrete VP schedule, DPM-Solver++ (vs an independent NumPy reference and vs
diffusers), and the ODE solvers (convergence orders, scipy RK45, Gaussian transport).

Toy models are exact posterior means of analytic data distributions, so every check has a closed form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.linalg

from dcae_jax.diffusion import objectives, samplers

N = 1000
BETAS = objectives.scaled_linear_betas()
SCHEDULE = samplers.NoiseScheduleVP(BETAS)

# Toy data for the epsilon model: per element 0.5 N(-M, S^2) + 0.5 N(M, S^2) (bimodal, so eps is nonlinear in x).
MIX_M, MIX_S = 0.8, 0.35


def mixture_eps(x, alpha, sigma, xp=np):
    """E[eps | x_t = x] for the mixture with x_t = alpha x0 + sigma eps (exact eps-prediction)."""
    var = alpha**2 * MIX_S**2 + sigma**2
    return sigma * (x - alpha * MIX_M * xp.tanh(alpha * MIX_M * x / var)) / var


def mixture_eps_fn(x, t_input):
    """The toy network: (x (B, D), t_input = t * N (B,)) -> eps, in JAX through the schedule."""
    t = (t_input / N)[:, None]
    return mixture_eps(x, SCHEDULE.marginal_alpha(t), SCHEDULE.marginal_std(t), xp=jnp)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def x_T():
    return np.asarray(jax.random.normal(jax.random.key(0), (64, 8)), np.float32)


# ------------------------------------------------------------------------------------------------
# Classifier-free guidance.


def test_cfg_scale_one_is_a_single_conditional_call():
    calls = []

    def apply_fn(x, t, y):
        calls.append((x.shape, t.shape, np.asarray(y)))
        return x * (1.0 + y[:, None]) + t[:, None]

    x, y = jnp.ones((3, 2)), jnp.array([1, 2, 3])
    out = samplers.classifier_free_guidance(apply_fn, y, null_class=1000, scale=1.0)(x, 0.5)
    assert len(calls) == 1 and calls[0][0] == (3, 2) and calls[0][1] == (3,)
    np.testing.assert_array_equal(calls[0][2], [1, 2, 3])
    np.testing.assert_allclose(out, x * (1.0 + y[:, None]) + 0.5)


def test_cfg_batches_cond_and_null_and_mixes_all_channels():
    calls = []

    def net(x, t, y):
        return x * (1.0 + y[:, None]) + t[:, None]

    def apply_fn(x, t, y):
        calls.append(np.asarray(y))
        return net(x, t, y)

    x, y, t, s = jnp.arange(6.0).reshape(3, 2), jnp.array([1, 2, 3]), jnp.array([0.1, 0.2, 0.3]), 1.5
    out = samplers.classifier_free_guidance(apply_fn, y, null_class=7, scale=s)(x, t)
    assert len(calls) == 1
    np.testing.assert_array_equal(calls[0], [1, 2, 3, 7, 7, 7])
    cond = x * (1.0 + y[:, None]) + t[:, None]
    uncond = x * 8.0 + t[:, None]
    np.testing.assert_allclose(out, uncond + s * (cond - uncond), rtol=1e-6)

    traces = []  # under jit: still one traced call of the network

    def counted(x, t, y):
        traces.append(1)
        return net(x, t, y)

    jitted = jax.jit(lambda x, t: samplers.classifier_free_guidance(counted, y, null_class=7, scale=s)(x, t))(x, t)
    assert len(traces) == 1
    np.testing.assert_allclose(jitted, out, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Noise schedule.


def test_schedule_knots_extrapolation_and_inverse():
    log_abar = np.log(np.cumprod(1.0 - BETAS))
    n = np.array([1, 2, 500, 999, 1000])
    np.testing.assert_allclose(SCHEDULE.marginal_log_mean_coeff(n / N), 0.5 * log_abar[n - 1], rtol=1e-12)
    # Linear extrapolation below the first knot (t=0) and above the last (t=1.001).
    la = 0.5 * log_abar
    np.testing.assert_allclose(SCHEDULE.marginal_log_mean_coeff(0.0), la[0] - (la[1] - la[0]), atol=1e-15)
    np.testing.assert_allclose(SCHEDULE.marginal_log_mean_coeff(1.001), la[-1] + (la[-1] - la[-2]), rtol=1e-12)
    # sigma, lambda and the inverse on the host (float64).
    t = np.linspace(1e-3, 1.0, 37)
    alpha, sigma = SCHEDULE.marginal_alpha(t), SCHEDULE.marginal_std(t)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-12)
    np.testing.assert_allclose(SCHEDULE.marginal_lambda(t), np.log(alpha / sigma), rtol=1e-10)
    np.testing.assert_allclose(SCHEDULE.inverse_lambda(SCHEDULE.marginal_lambda(t)), t, rtol=1e-9)
    # The jitted float32 path agrees with the host float64 path.
    lam32 = jax.jit(SCHEDULE.marginal_lambda)(jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(lam32, SCHEDULE.marginal_lambda(t), atol=2e-5)
    inv32 = jax.jit(SCHEDULE.inverse_lambda)(lam32)
    np.testing.assert_allclose(inv32, t, atol=2e-5)


# ------------------------------------------------------------------------------------------------
# DPM-Solver++ singlestep ("fast"): an independent float64 NumPy implementation of diffusion.md §4.1.


def numpy_singlestep_reference(x, orders, t_start=1.0, t_end=1e-3):
    """Reference DPM-Solver++ "fast" sampler written from the formulas, float64, np.interp schedule."""
    t_knots = np.arange(1, N + 1) / N
    log_alpha_knots = 0.5 * np.cumsum(np.log(1.0 - BETAS))

    def log_alpha(t):
        return np.interp(t, t_knots, log_alpha_knots)  # all times used lie within the knots

    def alpha(t):
        return np.exp(log_alpha(t))

    def sigma(t):
        return np.sqrt(1.0 - np.exp(2.0 * log_alpha(t)))

    def lam(t):
        return log_alpha(t) - np.log(sigma(t))

    def inv_lam(lmb):
        return np.interp(-0.5 * np.log1p(np.exp(-2.0 * lmb)), log_alpha_knots[::-1], t_knots[::-1])

    def data_pred(x, t):
        return (x - sigma(t) * mixture_eps(x, alpha(t), sigma(t))) / alpha(t)

    x = np.asarray(x, np.float64)
    grid = np.linspace(t_start, t_end, sum(orders) + 1)
    i = 0
    for order in orders:
        s, t = grid[i], grid[i + order]
        h = lam(t) - lam(s)
        phi1 = np.exp(-h) - 1.0
        d_s = data_pred(x, s)
        if order == 1:
            x = sigma(t) / sigma(s) * x - alpha(t) * phi1 * d_s
        elif order == 2:
            r1 = (lam(grid[i + 1]) - lam(s)) / h
            s1 = inv_lam(lam(s) + r1 * h)
            u = sigma(s1) / sigma(s) * x - alpha(s1) * (np.exp(-r1 * h) - 1.0) * d_s
            d_s1 = data_pred(u, s1)
            x = sigma(t) / sigma(s) * x - alpha(t) * phi1 * d_s - (0.5 / r1) * alpha(t) * phi1 * (d_s1 - d_s)
        else:
            r1 = (lam(grid[i + 1]) - lam(s)) / h
            r2 = (lam(grid[i + 2]) - lam(s)) / h
            s1, s2 = inv_lam(lam(s) + r1 * h), inv_lam(lam(s) + r2 * h)
            phi2 = phi1 / h + 1.0
            phi22 = (np.exp(-r2 * h) - 1.0) / (r2 * h) + 1.0
            u1 = sigma(s1) / sigma(s) * x - alpha(s1) * (np.exp(-r1 * h) - 1.0) * d_s
            d_s1 = data_pred(u1, s1)
            u2 = (
                sigma(s2) / sigma(s) * x
                - alpha(s2) * (np.exp(-r2 * h) - 1.0) * d_s
                + (r2 / r1) * alpha(s2) * phi22 * (d_s1 - d_s)
            )
            d_s2 = data_pred(u2, s2)
            x = sigma(t) / sigma(s) * x - alpha(t) * phi1 * d_s + (1.0 / r2) * alpha(t) * phi2 * (d_s2 - d_s)
        i += order
    return x


@pytest.mark.parametrize(
    ("steps", "orders"), [(30, [3] * 9 + [2, 1]), (8, [3, 3, 2]), (10, [3, 3, 3, 1]), (5, [2, 2, 1])]
)
def test_singlestep_orders(steps, orders):
    order = 2 if steps == 5 else 3
    assert samplers.singlestep_orders(steps, order) == orders
    assert sum(orders) == steps


def test_singlestep_matches_numpy_reference(x_T):
    ref = numpy_singlestep_reference(x_T, [3] * 9 + [2, 1])
    sample = jax.jit(lambda x: samplers.dpm_solver_pp(mixture_eps_fn, x, schedule=SCHEDULE, steps=30))
    ours = sample(x_T)
    err32 = rel_err(ours, ref)
    assert err32 < 1e-5, err32
    # Eager (op-by-op) vs jit: guards against jit-only miscompiles.
    eager = samplers.dpm_solver_pp(mixture_eps_fn, jnp.asarray(x_T), schedule=SCHEDULE, steps=30)
    assert rel_err(eager, ours) < 1e-6
    # In float64 the formulas agree to rounding: any coefficient slip would show here.
    with jax.enable_x64(True):
        ours64 = jax.jit(lambda x: samplers.dpm_solver_pp(mixture_eps_fn, x, schedule=SCHEDULE, steps=30))(
            jnp.asarray(x_T, jnp.float64)
        )
        assert ours64.dtype == jnp.float64
    assert rel_err(ours64, ref) < 1e-10
    # A different split ([3, 3, 2]) through the same machinery.
    with jax.enable_x64(True):
        ours8 = samplers.dpm_solver_pp(mixture_eps_fn, jnp.asarray(x_T, jnp.float64), schedule=SCHEDULE, steps=8)
    assert rel_err(ours8, numpy_singlestep_reference(x_T, [3, 3, 2])) < 1e-10


@pytest.mark.parametrize("method", ["singlestep", "multistep"])
def test_dpm_solver_transports_gaussian_data(method):
    """Data N(mu, s^2): the exact eps is linear in x, so the probability-flow map is affine and known."""
    mu, s = 0.5, 0.8

    def eps_fn(x, t_input):
        t = (t_input / N)[:, None]
        alpha, sigma = SCHEDULE.marginal_alpha(t), SCHEDULE.marginal_std(t)
        return sigma * (x - alpha * mu) / (alpha**2 * s**2 + sigma**2)

    x = jax.random.normal(jax.random.key(1), (4096, 4))
    out = jax.jit(lambda x: samplers.dpm_solver_pp(eps_fn, x, schedule=SCHEDULE, steps=30, method=method))(x)
    # The flow maps N(m_T, v_T) at t=1 onto N(m_e, v_e) at t_end; starting from N(0, 1) (terminal SNR
    # is not zero) the exact output is m_e + sqrt(v_e / v_T) (x - m_T).
    a_T, a_e = SCHEDULE.marginal_alpha(1.0), SCHEDULE.marginal_alpha(1e-3)
    v_T, v_e = a_T**2 * s**2 + 1 - a_T**2, a_e**2 * s**2 + 1 - a_e**2
    exact = a_e * mu + np.sqrt(v_e / v_T) * (np.asarray(x) - a_T * mu)
    out = np.asarray(out, np.float64)
    assert abs(out.mean() - mu) < 0.05 and abs(out.std() - s) < 0.05  # loose: the data distribution
    # Tighter: the exact flow map, up to 30 time-uniform steps of discretisation error (measured: the
    # slope is 1.8% low for singlestep, 3.1% for multistep; rms error 0.014 / 0.024).
    assert abs(out.mean() - exact.mean()) < 0.01 and abs(out.std() / exact.std() - 1) < 0.05
    assert np.sqrt(np.mean((out - exact) ** 2)) < 0.04


# ------------------------------------------------------------------------------------------------
# DPM-Solver++ multistep vs diffusers.

DIFFUSERS_SETTINGS = dict(
    num_train_timesteps=N,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    algorithm_type="dpmsolver++",
    solver_order=3,
    solver_type="midpoint",
    lower_order_final=True,
    euler_at_final=False,
    final_sigmas_type="sigma_min",
    timestep_spacing="linspace",
    thresholding=False,
)


def diffusers_multistep(x, steps):
    torch = pytest.importorskip("torch")
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(**DIFFUSERS_SETTINGS)
    scheduler.set_timesteps(steps)
    abar = scheduler.alphas_cumprod.double().numpy()
    sample = torch.from_numpy(np.array(x, np.float32))
    for k in scheduler.timesteps:  # diffusers' integer timestep k is abar_{k+1}: time (k + 1) / N here
        alpha, sigma = np.sqrt(abar[k]), np.sqrt(1.0 - abar[k])
        eps = mixture_eps(sample.double().numpy(), alpha, sigma)
        sample = scheduler.step(torch.from_numpy(eps).float(), k, sample).prev_sample
    return sample.numpy(), scheduler.timesteps.numpy()


@pytest.mark.parametrize("steps", [27, 9])  # order 3 to the end; and diffusers' lower-order final (< 15 steps)
def test_multistep_matches_diffusers(x_T, steps):
    ref, timesteps = diffusers_multistep(x_T, steps)
    grid = samplers.time_uniform_grid(1.0, 1e-3, steps)
    np.testing.assert_allclose(grid[:-1] * N - 1, timesteps, atol=1e-9)  # the same discrete timesteps
    sample = jax.jit(
        lambda x: samplers.dpm_solver_pp(mixture_eps_fn, x, schedule=SCHEDULE, steps=steps, method="multistep")
    )
    ours = sample(x_T)
    assert rel_err(ours, ref) < 1e-4, rel_err(ours, ref)
    # The warm-up / final orders matter: a plain order-3 run without them lands elsewhere.
    no_final = samplers.dpm_solver_pp(
        mixture_eps_fn, jnp.asarray(x_T), schedule=SCHEDULE, steps=steps, method="multistep", lower_order_final=False
    )
    if steps < 15:
        assert rel_err(no_final, ref) > 1e-3
    else:
        assert rel_err(no_final, ours) < 1e-7


def test_multistep_matches_diffusers_rounded_timesteps(x_T):
    """30 steps: diffusers rounds linspace(0, 999, 31) to integers; pass its grid explicitly."""
    ref, timesteps = diffusers_multistep(x_T, 30)
    grid = np.concatenate([(timesteps + 1.0) / N, [1.0 / N]])
    ours = jax.jit(
        lambda x: samplers.dpm_solver_pp(
            mixture_eps_fn, x, schedule=SCHEDULE, steps=30, method="multistep", time_grid=grid
        )
    )(x_T)
    assert rel_err(ours, ref) < 1e-4, rel_err(ours, ref)


# ------------------------------------------------------------------------------------------------
# ODE samplers.

A = np.array([[-0.5, 2.0], [-2.0, -0.5]])  # dx/dt = A x: a decaying rotation, x(1) = expm(A) x(0)


def linear_velocity(x, t):
    return x @ jnp.asarray(A.T, x.dtype)


@pytest.fixture(scope="module")
def linear_problem():
    x0 = np.asarray(jax.random.normal(jax.random.key(2), (16, 2)), np.float32)
    return x0, x0.astype(np.float64) @ scipy.linalg.expm(A).T


@pytest.mark.parametrize(("method", "order"), [("euler", 1), ("heun", 2)])
def test_fixed_step_convergence_order(linear_problem, method, order):
    x0, exact = linear_problem
    solve = jax.jit(lambda x, n: samplers.ode_sample(linear_velocity, x, method=method, num_steps=n), static_argnums=1)
    errs = []
    for n in (20, 40):
        x1, info = solve(x0, n)
        assert int(info["nfe"]) == n * order
        errs.append(np.abs(np.asarray(x1) - exact).max())
    ratio = errs[0] / errs[1]
    assert 2**order * 0.85 < ratio < 2**order * 1.15, (errs, ratio)


def test_dopri5_tolerance_and_adaptive_nfe(linear_problem):
    x0, exact = linear_problem
    solve = jax.jit(
        lambda x, rtol, atol: samplers.ode_sample(linear_velocity, x, rtol=rtol, atol=atol), static_argnums=(1, 2)
    )
    x_loose, info_loose = solve(x0, 1e-3, 1e-6)
    x_tight, info_tight = solve(x0, 1e-5, 1e-8)
    scale = np.abs(exact).max()
    err_loose = np.abs(np.asarray(x_loose) - exact).max() / scale
    err_tight = np.abs(np.asarray(x_tight) - exact).max() / scale
    assert err_loose < 1e-3 and err_tight < 2e-5 and err_tight < err_loose / 5, (err_loose, err_tight)
    for info in (info_loose, info_tight):
        assert info["nfe"].dtype == jnp.int32 and float(info["t"]) == 1.0
        assert int(info["nfe"]) == 2 + 6 * (int(info["n_accepted"]) + int(info["n_rejected"]))
    assert int(info_tight["nfe"]) > int(info_loose["nfe"]) > 8


def nonlinear_velocity(x, t, xp=np):
    return -(x**3) + xp.sin(3.0 * t) * x + xp.cos(2.0 * t)


def test_dopri5_matches_scipy_rk45():
    x0 = np.linspace(-1.5, 1.5, 12).reshape(4, 3).astype(np.float32)
    ours, info = jax.jit(
        lambda x: samplers.ode_sample(lambda x, t: nonlinear_velocity(x, t[:, None], xp=jnp), x, t1=2.0)
    )(x0)
    kw = dict(t_span=(0.0, 2.0), y0=x0.astype(np.float64).ravel())
    scipy_rk45 = scipy.integrate.solve_ivp(
        lambda t, y: nonlinear_velocity(y, t), method="RK45", rtol=1e-3, atol=1e-6, **kw
    )
    truth = scipy.integrate.solve_ivp(
        lambda t, y: nonlinear_velocity(y, t), method="DOP853", rtol=1e-12, atol=1e-12, **kw
    )
    rk45, truth = scipy_rk45.y[:, -1].reshape(x0.shape), truth.y[:, -1].reshape(x0.shape)
    # Same method, error norm and controller as scipy's RK45: the same answer to float32 rounding,
    # and the same work up to scipy's "no growth right after a rejection" rule.
    assert np.abs(np.asarray(ours) - rk45).max() < 1e-4
    assert abs(int(info["nfe"]) - scipy_rk45.nfev) <= 12, (int(info["nfe"]), scipy_rk45.nfev)
    assert np.abs(np.asarray(ours) - truth).max() < 1e-2
    eager, _ = samplers.ode_sample(lambda x, t: nonlinear_velocity(x, t[:, None], xp=jnp), jnp.asarray(x0), t1=2.0)
    np.testing.assert_allclose(eager, ours, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("method", "num_steps", "tol"), [("dopri5", 250, 2e-3), ("heun", 50, 2e-3), ("euler", 250, 2e-2)]
)
def test_linear_interpolant_transports_gaussian(method, num_steps, tol):
    """x_t = t x1 + (1 - t) x0, x1 ~ N(mu, s^2): the exact velocity carries x0 to mu + s x0."""
    mu, s = 0.7, 0.5

    def velocity(x, t):
        t = t[:, None]
        return mu + (t * s**2 - (1.0 - t)) / (t**2 * s**2 + (1.0 - t) ** 2) * (x - t * mu)

    x0 = jax.random.normal(jax.random.key(3), (256, 4))
    x1, _ = jax.jit(lambda x: samplers.ode_sample(velocity, x, method=method, num_steps=num_steps))(x0)
    assert float(jnp.max(jnp.abs(x1 - (mu + s * x0)))) < tol
