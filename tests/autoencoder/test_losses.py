"""Losses against hand-computed values, and the properties the GAN phase relies on."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcae_jax.autoencoder import losses


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_l1_loss_exact():
    x = jnp.array([[1.0, -2.0], [3.0, 0.5]])
    y = jnp.array([[0.0, 0.0], [1.0, 0.5]])
    assert float(losses.l1_loss(x, y)) == pytest.approx((1 + 2 + 2 + 0) / 4)
    assert losses.l1_loss(x.astype(jnp.bfloat16), y).dtype == jnp.float32


def test_hinge_d_loss_exact_and_zero_when_margins_met():
    real, fake = jnp.array([0.5, 2.0, -1.0]), jnp.array([-3.0, 0.0])
    # real: relu(1 - r) = [0.5, 0, 2] -> mean 5/6; fake: relu(1 + f) = [0, 1] -> mean 1/2.
    assert float(losses.hinge_d_loss(real, fake)) == pytest.approx(0.5 * (5 / 6 + 1 / 2))
    assert float(losses.hinge_d_loss(jnp.array([1.0, 4.0]), jnp.array([-1.0, -7.0]))) == 0.0
    # Margins met -> no gradient to the discriminator.
    g = jax.grad(losses.hinge_d_loss, argnums=(0, 1))(jnp.array([1.5, 4.0]), jnp.array([-1.5, -7.0]))
    assert all(float(jnp.abs(t).sum()) == 0.0 for t in g)
    # Zero logits: both hinges are 1.
    assert float(losses.hinge_d_loss(jnp.zeros(4), jnp.zeros(4))) == pytest.approx(1.0)


def test_non_saturating_d_loss_exact():
    real, fake = jnp.array([0.0, 2.0]), jnp.array([-1.0])
    expected = 0.5 * ((_softplus(0.0) + _softplus(-2.0)) / 2 + _softplus(-1.0))
    assert float(losses.non_saturating_d_loss(real, fake)) == pytest.approx(expected, rel=1e-6)
    assert float(losses.non_saturating_d_loss(jnp.zeros(3), jnp.zeros(3))) == pytest.approx(math.log(2), rel=1e-6)
    # Stable for huge logits (no overflow in softplus).
    assert float(losses.non_saturating_d_loss(jnp.array([1e4]), jnp.array([-1e4]))) == pytest.approx(0.0, abs=1e-6)


def test_generator_losses_exact():
    fake = jnp.array([[1.0, -3.0], [0.5, 0.0]])
    assert float(losses.hinge_g_loss(fake)) == pytest.approx(-(1.0 - 3.0 + 0.5 + 0.0) / 4)
    expected = (_softplus(-1.0) + _softplus(3.0) + _softplus(-0.5) + _softplus(0.0)) / 4
    assert float(losses.non_saturating_g_loss(fake)) == pytest.approx(expected, rel=1e-6)
    # Non-saturating: gradient stays large when the discriminator rejects fakes confidently.
    assert float(jax.grad(losses.non_saturating_g_loss)(jnp.array([-20.0]))[0]) == pytest.approx(-1.0, rel=1e-6)


def test_gan_loss_registry():
    assert losses.get_gan_loss("hinge") == (losses.hinge_d_loss, losses.hinge_g_loss)
    assert losses.get_gan_loss("non_saturating") == (losses.non_saturating_d_loss, losses.non_saturating_g_loss)
    assert set(losses.GAN_LOSSES) == {"hinge", "non_saturating"}
    with pytest.raises(ValueError, match=r"unknown GAN loss 'wgan'.*\['hinge', 'non_saturating'\]"):
        losses.get_gan_loss("wgan")


def test_adaptive_gan_weight_is_norm_ratio_on_pytrees():
    # ||rec|| = sqrt(9 + 16) = 5 over two leaves; ||gan|| = sqrt(1 + 1 + 4 + 4) = sqrt(10).
    rec = {"kernel": jnp.array([[3.0]]), "bias": jnp.array([4.0])}
    gan = {"kernel": jnp.array([[1.0, 1.0]]), "bias": jnp.array([2.0, 2.0])}
    w = losses.adaptive_gan_weight(rec, gan)
    assert w.shape == () and w.dtype == jnp.float32
    assert float(w) == pytest.approx(5.0 / (math.sqrt(10.0) + 1e-4), rel=1e-6)
    # Plain arrays work too; eps defaults to 1e-4, so a zero GAN gradient gives ||rec|| / 1e-4, clipped.
    assert float(losses.adaptive_gan_weight(jnp.array([3.0, 4.0]), jnp.zeros(2), max_weight=1e9)) == pytest.approx(
        5e4, rel=1e-5
    )
    assert float(losses.adaptive_gan_weight(jnp.array([3.0, 4.0]), jnp.zeros(2))) == 1e4
    assert float(losses.adaptive_gan_weight(jnp.zeros(2), jnp.ones(2))) == 0.0
    with pytest.raises(ValueError, match="empty"):
        losses.adaptive_gan_weight({}, gan)


def test_adaptive_gan_weight_stops_gradient():
    def f(scale):
        w = losses.adaptive_gan_weight(scale * jnp.array([3.0, 4.0]), jnp.array([1.0]))
        return w * scale

    # d/ds (stop_gradient(w) * s) = w (the weight is treated as a constant).
    w = float(losses.adaptive_gan_weight(jnp.array([3.0, 4.0]), jnp.array([1.0])))
    assert float(jax.grad(f)(1.0)) == pytest.approx(w, rel=1e-6)


def test_disc_factor_gates_and_traces():
    assert float(losses.disc_factor(0, 10)) == 0.0
    assert float(losses.disc_factor(9, 10)) == 0.0
    assert float(losses.disc_factor(10, 10)) == 1.0
    assert float(losses.disc_factor(11, 10)) == 1.0
    steps = jnp.arange(8)
    out = jax.jit(jax.vmap(losses.disc_factor, in_axes=(0, None)))(steps, 5)
    np.testing.assert_array_equal(out, np.array([0, 0, 0, 0, 0, 1, 1, 1], np.float32))
    assert out.dtype == jnp.float32
