"""DiT's Gaussian diffusion: respacing and schedule tables against independent NumPy versions of the ADM
algorithms, the posterior formulas by Gaussian conditioning, DDPM sampling (a NumPy loop, an exact
oracle on Gaussian data, jit == eager), DiT's guidance convention and its MSE + VLB training loss."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcae_jax.diffusion import gaussian_diffusion as gd

# ----------------------------------------------------------------------------------------------
# Independent NumPy versions of the reference algorithms (float64).


def _np_space_timesteps(num_timesteps: int, counts: str) -> list[int]:
    """ADM `space_timesteps` written out: equal sections, each strided by a running float."""
    if counts.startswith("ddim"):
        want = int(counts[4:])
        stride = next(s for s in range(1, num_timesteps) if len(range(0, num_timesteps, s)) == want)
        return list(range(0, num_timesteps, stride))
    counts = [int(c) for c in counts.split(",")]
    sizes = [num_timesteps // len(counts) + (i < num_timesteps % len(counts)) for i in range(len(counts))]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    kept = set()
    for start, size, count in zip(starts, sizes, counts):
        stride, pos = (1.0 if count <= 1 else (size - 1) / (count - 1)), 0.0
        for _ in range(count):
            kept.add(int(start) + round(pos))
            pos += stride
    return sorted(kept)


def _np_tables(betas: np.ndarray) -> dict[str, np.ndarray]:
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    return {
        "abar": abar,
        "coef1": betas * np.sqrt(abar_prev) / (1 - abar),
        "coef2": (1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar),
        "post_var": post_var,
        "min_log": np.log(np.concatenate([[post_var[1]], post_var[1:]])),
        "max_log": np.log(betas),
    }


def _np_respaced(num_steps: str) -> tuple[np.ndarray, list[int]]:
    """SpacedDiffusion's betas: walk the base abar, one beta per kept step from the last kept abar."""
    base_abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    kept, betas, last = _np_space_timesteps(1000, num_steps), [], 1.0
    for i, a in enumerate(base_abar):
        if i in kept:
            betas.append(1.0 - a / last)
            last = a
    return np.array(betas), kept


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "counts"),
    [(1000, "250"), (1000, "25"), (1000, "1000"), (300, "10,15,20"), (1000, "7,3,100"), (1000, "ddim50")],
)
def test_space_timesteps_matches_reference_algorithm(n, counts):
    assert gd.space_timesteps(n, counts) == _np_space_timesteps(n, counts)


def test_space_timesteps_250_known_values_and_errors():
    kept = gd.space_timesteps(1000, 250)
    assert len(kept) == 250 and kept[:5] == [0, 4, 8, 12, 16] and kept[-1] == 999
    assert kept[42] == 169  # 42 * 999 / 249 = 168.51 -> rounds up
    with pytest.raises(ValueError, match="cannot divide"):
        gd.space_timesteps(10, "11")


@pytest.mark.parametrize("num_steps", ["250", "25", "1000"])
def test_respaced_betas_and_timestep_map(num_steps):
    base = gd.GaussianDiffusion.linear()
    np.testing.assert_allclose(base.betas, np.linspace(1e-4, 0.02, 1000), rtol=1e-15)
    proc = base.respace(num_steps)
    betas, kept = _np_respaced(num_steps)
    np.testing.assert_allclose(proc.betas, betas, rtol=1e-12)
    np.testing.assert_array_equal(proc.timestep_map, kept)
    np.testing.assert_allclose(proc.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12)  # same marginals
    ref = _np_tables(betas)
    for ours, key in [
        (proc.posterior_mean_coef1, "coef1"),
        (proc.posterior_mean_coef2, "coef2"),
        (proc.posterior_variance, "post_var"),
        (proc.posterior_log_variance_clipped, "min_log"),
    ]:
        np.testing.assert_allclose(ours, ref[key], rtol=1e-12)

    # Respacing a respaced process composes the maps.
    kept_100 = np.asarray(gd.space_timesteps(1000, "100"))
    np.testing.assert_array_equal(
        base.respace("100").respace("10").timestep_map, kept_100[gd.space_timesteps(100, "10")]
    )


def test_posterior_by_gaussian_conditioning():
    """q(x_{k-1} | x_k, x0) from the joint Gaussian of (x_{k-1}, x_k) given x0."""
    proc = gd.GaussianDiffusion(np.array([0.1, 0.2, 0.3, 0.4]))
    rng = np.random.default_rng(0)
    x0, x_t = rng.standard_normal((2, 4, 3, 3, 2))
    t = jnp.arange(4)
    mean, var, log_var = proc.q_posterior_mean_variance(jnp.asarray(x0), jnp.asarray(x_t), t)
    abar = np.cumprod(1 - proc.betas)
    for k in range(1, 4):
        # x_{k-1} = sqrt(abar_{k-1}) x0 + sqrt(1 - abar_{k-1}) e1;  x_k = sqrt(1 - beta_k) x_{k-1} + sqrt(beta_k) e2
        mu1, mu2 = math.sqrt(abar[k - 1]) * x0[k], math.sqrt(abar[k]) * x0[k]
        v1, v2 = 1 - abar[k - 1], 1 - abar[k]
        cov = math.sqrt(1 - proc.betas[k]) * v1
        np.testing.assert_allclose(mean[k], mu1 + cov / v2 * (x_t[k] - mu2), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var[k], v1 - cov**2 / v2, rtol=1e-6)
        np.testing.assert_allclose(log_var[k], math.log(v1 - cov**2 / v2), rtol=1e-6)
    np.testing.assert_allclose(mean[0], x0[0], rtol=1e-6)  # the first step's posterior is x0 itself
    assert float(var[0].max()) == 0.0 and np.allclose(log_var[0], np.log(proc.posterior_variance[1]))

    # p(x_{k-1} | x_k): the true eps recovers x0; v = -1 / +1 select the posterior / beta log variances.
    eps = (x_t - np.sqrt(abar)[:, None, None, None] * x0) / np.sqrt(1 - abar)[:, None, None, None]
    for v, bound in [(-1.0, proc.posterior_log_variance_clipped), (1.0, np.log(proc.betas))]:
        out = jnp.concatenate([jnp.asarray(eps), jnp.full_like(jnp.asarray(eps), v)], axis=-1)
        p = proc.p_mean_variance(out, jnp.asarray(x_t), t)
        np.testing.assert_allclose(p["pred_xstart"], x0, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(p["mean"], mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(p["log_variance"][:, 0, 0, 0], bound, rtol=1e-6)
    # Fixed variances for epsilon-only models: DDPM's beta~ (clipped) and beta (first entry beta~_1).
    eps_j = jnp.asarray(eps)
    small = proc.p_mean_variance(eps_j, jnp.asarray(x_t), t, variance="fixed_small")["log_variance"][:, 0, 0, 0]
    large = proc.p_mean_variance(eps_j, jnp.asarray(x_t), t, variance="fixed_large")["log_variance"][:, 0, 0, 0]
    np.testing.assert_allclose(small, proc.posterior_log_variance_clipped, rtol=1e-6)
    np.testing.assert_allclose(large, np.log([proc.posterior_variance[1], *proc.betas[1:]]), rtol=1e-6)
    with pytest.raises(ValueError, match="2C"):
        proc.p_mean_variance(eps_j, jnp.asarray(x_t), t)


# ----------------------------------------------------------------------------------------------
# Sampling.


def _toy_model(xp, x, t):
    """A deterministic 'network' with 2C outputs that depends on x and the original step t."""
    eps = 0.4 * x + 1e-3 * t.reshape(-1, 1, 1, 1) - 0.1
    return xp.concatenate([eps, 0.8 * xp.tanh(x + 0.5)], axis=-1)


def test_ddpm_matches_numpy_loop_and_jit_matches_eager():
    shape, rng = (3, 4, 4, 2), jax.random.key(3)
    x_T = jax.random.normal(jax.random.key(4), shape)
    fn = functools.partial(_toy_model, jnp)
    sample = functools.partial(gd.ddpm_sample, fn, num_steps=10)
    eager = sample(x_T, rng)
    jitted = jax.jit(sample)(x_T, rng)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)

    betas, kept = _np_respaced("10")
    tab = _np_tables(betas)
    x = np.asarray(x_T, np.float64)
    for j, k in enumerate(range(9, -1, -1)):  # p_sample_loop: indices reversed, step j draws fold_in(rng, j)
        out = _toy_model(np, x, np.full(shape[0], float(kept[k])))
        eps, v = out[..., :2], out[..., 2:]
        x0 = np.sqrt(1 / tab["abar"][k]) * x - np.sqrt(1 / tab["abar"][k] - 1) * eps
        mean = tab["coef1"][k] * x0 + tab["coef2"][k] * x
        frac = (v + 1) / 2
        log_var = frac * tab["max_log"][k] + (1 - frac) * tab["min_log"][k]
        noise = np.asarray(jax.random.normal(jax.random.fold_in(rng, j), shape), np.float64)
        x = mean + (k != 0) * np.exp(0.5 * log_var) * noise
    err = float(np.max(np.abs(np.asarray(eager) - x)) / np.max(np.abs(x)))
    assert err < 1e-4, err


def test_ddpm_samples_gaussian_data_with_an_oracle():
    """Data x0 ~ N(mu, s^2): the exact eps predictor and reverse variance make ancestral sampling exact."""
    s = 0.5
    base = gd.GaussianDiffusion.linear()
    proc = base.respace(250)
    t_to_k = np.full(1000, -1)
    t_to_k[proc.timestep_map] = np.arange(250)
    min_log, max_log = proc.log_variance_bounds()

    def oracle(mu):
        def fn(x, t):
            t = t.astype(jnp.int32)
            ab = jnp.asarray(base.alphas_cumprod, jnp.float32)[t][:, None, None, None]
            eps = jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * mu) / (ab * s**2 + 1 - ab)  # E[eps | x_t]
            var_x0 = s**2 * (1 - ab) / (ab * s**2 + 1 - ab)  # Var[x0 | x_t]
            k = jnp.asarray(t_to_k)[t]
            g = lambda a: jnp.asarray(a, jnp.float32)[k][:, None, None, None]
            var = g(proc.posterior_variance) + g(proc.posterior_mean_coef1) ** 2 * var_x0  # Var[x_{k-1} | x_k]
            v = 2 * (jnp.log(var) - g(min_log)) / (g(max_log) - g(min_log)) - 1
            return jnp.concatenate([eps, jnp.broadcast_to(v, eps.shape)], axis=-1)

        return fn

    x_T = jax.random.normal(jax.random.key(0), (4096, 2, 2, 1))
    sample = jax.jit(lambda mu: gd.ddpm_sample(oracle(mu), x_T, jax.random.key(1)))
    for mu in (0.7, -0.3):
        x0 = np.asarray(sample(mu))
        assert abs(x0.mean() - mu) < 0.02 and abs(x0.std() / s - 1) < 0.03, (mu, x0.mean(), x0.std())


def test_dit_guidance_convention():
    b, c = 3, 2
    seen = []

    def apply_fn(x, t, y):
        seen.append(x.shape[0])
        scale = (y.astype(jnp.float32) + 1.0)[:, None, None, None]
        return jnp.concatenate([x * scale + t[:, None, None, None], x - scale], axis=-1)  # (B, H, W, 2C)

    x = jax.random.normal(jax.random.key(0), (b, 2, 2, c))
    t, y = jnp.array([1.0, 2.0, 3.0]), jnp.array([5, 0, 7])
    out = gd.dit_classifier_free_guidance(apply_fn, y, null_class=1000, scale=1.3, guided_channels=c)(x, t)
    cond, uncond = apply_fn(x, t, y), apply_fn(x, t, jnp.full_like(y, 1000))
    np.testing.assert_allclose(out[..., :c], uncond[..., :c] + 1.3 * (cond[..., :c] - uncond[..., :c]), rtol=1e-6)
    np.testing.assert_allclose(out[..., c:], cond[..., c:], rtol=1e-6)  # variance channels: conditional, unguided
    assert seen[0] == 2 * b
    seen.clear()
    out1 = gd.dit_classifier_free_guidance(apply_fn, y, null_class=1000, scale=1.0, guided_channels=c)(x, t)
    np.testing.assert_array_equal(out1, cond)
    assert seen == [b]


# ----------------------------------------------------------------------------------------------
# Training loss.


def _np_losses(x0, t, noise, a, b):
    """`training_losses` for the toy model out = [a x_t + 1e-3 t, tanh(b x_t)], float64."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    tab = _np_tables(betas)
    e = lambda arr: arr[t][:, None, None, None]
    ab = e(tab["abar"])
    x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
    eps = a * x_t + 1e-3 * t[:, None, None, None]
    v = np.tanh(b * x_t)
    mse = ((noise - eps) ** 2).mean((1, 2, 3))
    true_mean = e(tab["coef1"]) * x0 + e(tab["coef2"]) * x_t
    true_log_var = e(tab["min_log"])
    pred_x0 = np.sqrt(1 / ab) * x_t - np.sqrt(1 / ab - 1) * eps
    mean = e(tab["coef1"]) * pred_x0 + e(tab["coef2"]) * x_t
    log_var = (v + 1) / 2 * e(tab["max_log"]) + (1 - v) / 2 * e(tab["min_log"])
    kl = 0.5 * (
        -1 + log_var - true_log_var + np.exp(true_log_var - log_var) + (true_mean - mean) ** 2 * np.exp(-log_var)
    )
    cdf = lambda z: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))
    inv_std = np.exp(-0.5 * log_var)
    hi, lo = cdf(inv_std * (x0 - mean + 1 / 255)), cdf(inv_std * (x0 - mean - 1 / 255))
    ll = np.where(
        x0 < -0.999,
        np.log(np.maximum(hi, 1e-12)),
        np.where(x0 > 0.999, np.log(np.maximum(1 - lo, 1e-12)), np.log(np.maximum(hi - lo, 1e-12))),
    )
    vb = np.where(t == 0, -ll.mean((1, 2, 3)), kl.mean((1, 2, 3))) / np.log(2)
    return {"mse": mse, "vb": vb, "loss": mse + vb}


def test_dit_objective_terms_and_stop_gradient():
    rng = np.random.default_rng(0)
    x0 = np.clip(rng.standard_normal((6, 3, 3, 2)), -1.2, 1.2)
    x0[0, 0, 0] = [1.0, -1.0]  # both edge bins of the decoder likelihood
    t = np.array([0, 0, 1, 500, 999, 37])
    noise = rng.standard_normal(x0.shape)
    obj = gd.DiTObjective()

    def terms(a, b):
        fn = lambda x_t, tt: jnp.concatenate([a * x_t + 1e-3 * tt[:, None, None, None], jnp.tanh(b * x_t)], -1)
        return obj.losses(fn, jnp.asarray(x0, jnp.float32), jnp.asarray(t), jnp.asarray(noise, jnp.float32))

    ours = jax.jit(terms)(0.9, 0.6)
    ref = _np_losses(x0, t, noise, 0.9, 0.6)
    for key in ("mse", "vb", "loss"):
        np.testing.assert_allclose(ours[key], ref[key], rtol=2e-4, atol=1e-6, err_msg=key)

    # VLB gradients reach only the variance values; MSE gradients only the epsilon prediction.
    means = lambda ab: {k: jnp.mean(v) for k, v in terms(ab[0], ab[1]).items()}
    grads = jax.jit(jax.jacrev(means))(jnp.array([0.9, 0.6]))  # d/d(a, b)
    assert float(grads["vb"][0]) == 0.0 and float(grads["mse"][1]) == 0.0
    assert float(grads["vb"][1]) != 0.0 and float(grads["mse"][0]) != 0.0

    seen = []

    def record(x_t, tt):
        seen.append(np.asarray(tt))
        return jnp.concatenate([x_t, jnp.zeros_like(x_t)], -1)

    loss, aux = obj.loss(record, jnp.asarray(x0, jnp.float32), jax.random.key(0))
    assert loss.shape == () and set(aux) == {"mse", "vb"}
    np.testing.assert_allclose(loss, aux["mse"] + aux["vb"], rtol=1e-6)
    assert seen[0].dtype == np.float32 and seen[0].min() >= 0 and seen[0].max() <= 999
    np.testing.assert_array_equal(seen[0], np.round(seen[0]))
    with pytest.raises(ValueError, match="2C"):
        obj.loss(lambda x_t, tt: x_t, jnp.asarray(x0, jnp.float32), jax.random.key(0))
