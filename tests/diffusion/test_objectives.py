"""Objectives: the SD scaled-linear schedule, discrete epsilon-prediction (UViT) and linear-interpolant
velocity (USiT), checked with oracle networks that know the clean data and so the exact target."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcae_jax.diffusion import objectives

B, SHAPE = 64, (4, 4, 8)  # batch of NHWC latents


@pytest.fixture(scope="module")
def latents():
    return 0.5 + 0.8 * jax.random.normal(jax.random.key(0), (B, *SHAPE))


def test_scaled_linear_betas_reference_values():
    betas = objectives.scaled_linear_betas()
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    abar = np.cumprod(1.0 - betas)
    np.testing.assert_allclose(abar[0], 0.99915, rtol=1e-12)  # abar_1 = 1 - 0.00085
    np.testing.assert_allclose(abar[499], 0.2777, atol=1e-4)
    np.testing.assert_allclose(abar[999], 0.00466, atol=1e-5)
    lam = 0.5 * np.log(abar / (1 - abar))  # half log-SNR from +3.53 to -2.68 (log-SNR +7.07 .. -5.36)
    np.testing.assert_allclose([2 * lam[0], 2 * lam[-1]], [7.07, -5.36], atol=0.01)
    np.testing.assert_allclose(objectives.EpsilonObjective().alphas_cumprod(), abar, rtol=1e-15)


def test_scaled_linear_betas_match_diffusers():
    pytest.importorskip("torch")
    from diffusers import DDPMScheduler

    ours = np.cumprod(1.0 - objectives.scaled_linear_betas())
    theirs = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    np.testing.assert_allclose(ours, theirs.double().numpy(), rtol=2e-6)  # diffusers builds betas in float32


def test_epsilon_objective_oracle_and_zero(latents):
    obj = objectives.EpsilonObjective()
    abar = jnp.asarray(obj.alphas_cumprod(), jnp.float32)

    def oracle(x_n, t):  # recovers eps from x_n and the clean latents it knows
        a = abar[t.astype(jnp.int32) - 1][:, None, None, None]
        return (x_n - jnp.sqrt(a) * latents) / jnp.sqrt(1.0 - a)

    def zeros(x_n, t):
        return jnp.zeros_like(x_n)

    @jax.jit
    def run(x, rng):
        seen = []
        loss, aux = obj.loss(lambda x_n, t: seen.append(t) or oracle(x_n, t), x, rng)
        return loss, aux, seen[0], obj.loss(zeros, x, rng)[0]

    rng = jax.random.key(1)
    loss, aux, t, loss0 = run(latents, rng)
    assert float(loss) < 1e-8 and set(aux) == {"mse"}
    assert abs(float(loss0) - 1.0) < 0.05  # E[eps^2] = 1
    t = np.asarray(t)
    assert t.dtype == np.float32 and t.shape == (B,)
    assert np.all(t == np.round(t)) and t.min() >= 1 and t.max() <= 1000 and len(np.unique(t)) > B // 2
    # Eager (op by op) == jit.
    np.testing.assert_allclose(float(obj.loss(zeros, latents, rng)[0]), float(loss0), rtol=1e-6)


def test_epsilon_objective_covers_all_steps():
    obj = objectives.EpsilonObjective()
    times = []

    def record(x_n, t):
        times.append(np.asarray(t))
        return x_n

    obj.loss(record, jnp.zeros((20_000, 1)), jax.random.key(2))
    t = times[0]
    assert t.min() == 1 and t.max() == 1000 and len(np.unique(t)) == 1000


def test_epsilon_add_noise_matches_formula():
    obj = objectives.EpsilonObjective()
    x0, eps = jnp.full((3, 2), 2.0), jnp.full((3, 2), -1.0)
    n = jnp.array([1, 500, 1000])
    abar = obj.alphas_cumprod()[np.asarray(n) - 1]
    expected = np.sqrt(abar)[:, None] * 2.0 - np.sqrt(1 - abar)[:, None]
    np.testing.assert_allclose(obj.add_noise(x0, n, eps), np.broadcast_to(expected, (3, 2)), rtol=1e-6)


def test_velocity_objective_oracle_and_zero(latents):
    obj = objectives.VelocityObjective()

    def oracle(x_t, t):  # closed form: u = x1 - x0 = (x1 - x_t) / (1 - t)
        return (latents - x_t) / (1.0 - t)[:, None, None, None]

    def zeros(x_t, t):
        return jnp.zeros_like(x_t)

    @jax.jit
    def run(x, rng):
        seen = []
        loss, aux = obj.loss(lambda x_t, t: seen.append(t) or oracle(x_t, t), x, rng)
        return loss, aux, seen[0], obj.loss(zeros, x, rng)[0]

    rng = jax.random.key(3)
    loss, aux, t, loss0 = run(latents, rng)
    assert float(loss) < 1e-6 and set(aux) == {"mse"}
    t = np.asarray(t)
    assert t.dtype == np.float32 and t.shape == (B,) and t.min() >= 0 and t.max() < 1 and t.std() > 0.2
    # Zero model: E[(x1 - x0)^2] = E[x1^2] + 1 per element.
    np.testing.assert_allclose(float(loss0), float(jnp.mean(latents**2)) + 1.0, rtol=0.05)
    np.testing.assert_allclose(float(obj.loss(zeros, latents, rng)[0]), float(loss0), rtol=1e-6)


def test_velocity_objective_known_error():
    obj = objectives.VelocityObjective()
    x1 = jnp.zeros((2, 3, 1, 1))

    def const(x_t, t):  # target -x0 plus per-example offsets 1, 2: per-example means 1, 4 -> loss 2.5
        return -(x_t / (1.0 - t)[:, None, None, None]) + jnp.array([1.0, 2.0])[:, None, None, None]

    loss, _ = obj.loss(const, x1, jax.random.key(4))
    np.testing.assert_allclose(float(loss), 2.5, rtol=1e-5)
