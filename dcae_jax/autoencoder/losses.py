"""Loss functions for DC-AE training: reconstruction, GAN (discriminator + generator), GAN weighting.

Small pure functions that compose inside a jitted train step; every loss is reduced to a float32
scalar by a mean (the discriminator losses as taming-transformers: 0.5 * (real term + fake term)).
Phase 3 (decoder-head refinement) uses

    loss_g = l1 + perceptual + disc_factor(step, start) * adaptive_gan_weight(g_rec, g_gan) * w * g_loss
    loss_d = disc_factor(step, start) * d_loss(logits_real, logits_fake)

with `(d_loss, g_loss) = get_gan_loss(name)` and `g_rec`, `g_gan` the gradients of the reconstruction
and generator losses w.r.t. the decoder's last layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
ArrayLike = jax.typing.ArrayLike


def _f32(x: ArrayLike) -> Array:
    return jnp.asarray(x).astype(jnp.float32)


def l1_loss(x: ArrayLike, y: ArrayLike) -> Array:
    """Mean absolute error.

    Args:
      x: predictions, any shape.
      y: targets, broadcastable to `x`.

    Returns:
      mean(|x - y|) as a float32 scalar.
    """
    return jnp.mean(jnp.abs(_f32(x) - _f32(y)))


# ----------------------------------------------------------------------------------------------
# GAN losses. Logits are raw discriminator outputs (any shape, e.g. PatchGAN (B, h, w, 1)).


def hinge_d_loss(logits_real: ArrayLike, logits_fake: ArrayLike) -> Array:
    """Hinge discriminator loss: 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))).

    Zero once every real logit is >= 1 and every fake logit <= -1 (margins met, no gradient).

    Args:
      logits_real: discriminator logits on real images.
      logits_fake: discriminator logits on reconstructions.

    Returns:
      float32 scalar.
    """
    real = jnp.mean(jax.nn.relu(1.0 - _f32(logits_real)))
    fake = jnp.mean(jax.nn.relu(1.0 + _f32(logits_fake)))
    return 0.5 * (real + fake)


def non_saturating_d_loss(logits_real: ArrayLike, logits_fake: ArrayLike) -> Array:
    """Logistic (binary cross-entropy) discriminator loss: 0.5 * (mean(softplus(-real)) + mean(softplus(fake))).

    Equals 0.5 * (BCE(real, 1) + BCE(fake, 0)); taming-transformers' `vanilla_d_loss`.

    Args:
      logits_real: discriminator logits on real images.
      logits_fake: discriminator logits on reconstructions.

    Returns:
      float32 scalar.
    """
    real = jnp.mean(jax.nn.softplus(-_f32(logits_real)))
    fake = jnp.mean(jax.nn.softplus(_f32(logits_fake)))
    return 0.5 * (real + fake)


def hinge_g_loss(logits_fake: ArrayLike) -> Array:
    """Generator loss paired with the hinge discriminator loss: -mean(fake).

    Args:
      logits_fake: discriminator logits on reconstructions.

    Returns:
      float32 scalar.
    """
    return -jnp.mean(_f32(logits_fake))


def non_saturating_g_loss(logits_fake: ArrayLike) -> Array:
    """Non-saturating generator loss: mean(softplus(-fake)) = BCE(fake, 1).

    Unlike -log(1 - D), its gradient does not vanish when the discriminator confidently rejects fakes.

    Args:
      logits_fake: discriminator logits on reconstructions.

    Returns:
      float32 scalar.
    """
    return jnp.mean(jax.nn.softplus(-_f32(logits_fake)))


DLoss = Callable[[ArrayLike, ArrayLike], Array]
GLoss = Callable[[ArrayLike], Array]

GAN_LOSSES: dict[str, tuple[DLoss, GLoss]] = {
    "hinge": (hinge_d_loss, hinge_g_loss),
    "non_saturating": (non_saturating_d_loss, non_saturating_g_loss),
}


def get_gan_loss(name: str) -> tuple[DLoss, GLoss]:
    """Looks up a (discriminator loss, generator loss) pair by name; raises with the valid names."""
    if name not in GAN_LOSSES:
        raise ValueError(f"unknown GAN loss {name!r}; valid names: {sorted(GAN_LOSSES)}")
    return GAN_LOSSES[name]


# ----------------------------------------------------------------------------------------------
# GAN weighting.


def _global_norm(tree: Any) -> Array:
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        raise ValueError("adaptive_gan_weight got an empty gradient pytree")
    return jnp.sqrt(sum(jnp.sum(jnp.square(_f32(g))) for g in leaves))


def adaptive_gan_weight(rec_grad: Any, gan_grad: Any, max_weight: float = 1e4, eps: float = 1e-4) -> Array:
    """Balances the GAN term against reconstruction: clip(||rec_grad|| / (||gan_grad|| + eps), 0, max_weight).

    taming-transformers' `calculate_adaptive_weight`: scaling the generator loss by this ratio makes
    its gradient at the decoder's last layer about as large as the reconstruction loss's gradient
    there. The weight is a constant of the step (`stop_gradient`), as the reference's `.detach()`.

    Args:
      rec_grad: gradient pytree (or array) of the reconstruction loss w.r.t. the last layer's params.
      gan_grad: gradient pytree of the generator loss w.r.t. the same params.
      max_weight: upper clip.
      eps: added to the GAN gradient norm so a zero GAN gradient gives a finite weight.

    Returns:
      float32 scalar; norms are global L2 norms over all leaves.
    """
    weight = _global_norm(rec_grad) / (_global_norm(gan_grad) + eps)
    return jax.lax.stop_gradient(jnp.clip(weight, 0.0, max_weight))


def disc_factor(step: ArrayLike, start_step: ArrayLike) -> Array:
    """GAN warm-up gate: 0.0 while `step < start_step`, 1.0 from `start_step` on (taming's `adopt_weight`).

    Traceable (works on a traced step counter inside `jit`); float32 scalar.
    """
    return jnp.where(jnp.asarray(step) >= jnp.asarray(start_step), 1.0, 0.0).astype(jnp.float32)
