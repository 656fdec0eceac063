"""PatchGAN discriminator for DC-AE phase 3 (decoder-head refinement with a GAN loss), NHWC.

Layout of pix2pix / taming-transformers `NLayerDiscriminator`, so torch weights convert by a plain
OIHW -> HWIO transpose: conv4x4/2 + LeakyReLU(0.2); `num_layers - 1` x [conv4x4/2 + norm + LeakyReLU]
with channels doubling (capped at 8x); conv4x4/1 + norm + LeakyReLU; conv4x4/1 to one logit. Every
conv pads 1 on each side as torch does (not `k // 2` like `layers.Conv2d`), so a 256x256 input gives a
30x30 logit map for `num_layers=3`; each logit judges a 70x70 receptive field.

Norm choice. The reference uses BatchNorm (pix2pix) or ActNorm (taming). The default here is
GroupNorm: it has no running statistics, so a sharded, jitted train step needs no cross-replica
`batch_stats` syncing, no mutable collections and no train/eval switch, and real and fake batches
are normalized independently of each other. "batch" (flax `BatchNorm`, torch eps/momentum) and
"none" are available for comparisons.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

# (num_groups, dtype, param_dtype, name) -> norm applied as `norm(x, train)`; built inside `nn.compact`.
NormFactory = Callable[[int, Dtype, Dtype, str], Callable[[Array, bool], Array]]


def _group_norm(num_groups: int, dtype: Dtype, param_dtype: Dtype, name: str):
    norm = nn.GroupNorm(num_groups=num_groups, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, name=name)
    return lambda x, train: norm(x)


def _batch_norm(num_groups: int, dtype: Dtype, param_dtype: Dtype, name: str):
    # momentum 0.9 == torch momentum 0.1; batch statistics in training, running statistics otherwise.
    norm = nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, name=name)
    return lambda x, train: norm(x, use_running_average=not train)


def _no_norm(num_groups: int, dtype: Dtype, param_dtype: Dtype, name: str):
    return lambda x, train: x


DISC_NORMS: dict[str, NormFactory] = {"group": _group_norm, "batch": _batch_norm, "none": _no_norm}


def get_disc_norm(name: str) -> NormFactory:
    """Looks up a discriminator norm by name; raises with the valid names."""
    if name not in DISC_NORMS:
        raise ValueError(f"unknown discriminator norm {name!r}; valid names: {sorted(DISC_NORMS)}")
    return DISC_NORMS[name]


class PatchDiscriminator(nn.Module):
    """PatchGAN: images (B, H, W, C) in [-1, 1] -> float32 logits (B, h, w, 1), one per patch.

    Convs followed by a norm have no bias (the norm's shift makes it redundant), as in the reference
    with BatchNorm; with `norm="none"` every conv has a bias. `num_groups` is the GroupNorm group
    count and must divide `base_features * 2**i` for every normed layer.
    """

    base_features: int = 64
    num_layers: int = 3
    norm: str = "group"
    num_groups: int = 32
    negative_slope: float = 0.2
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        make_norm = get_disc_norm(self.norm)
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        kw = dict(kernel_size=(4, 4), padding=((1, 1), (1, 1)), dtype=self.dtype, param_dtype=self.param_dtype)
        conv_bias = self.norm == "none"
        act = lambda h: nn.leaky_relu(h, self.negative_slope)

        h = x.astype(self.dtype)
        h = act(nn.Conv(self.base_features, strides=(2, 2), name="conv_0", **kw)(h))  # (B, H/2, W/2, F)
        mult = 1
        for i in range(1, self.num_layers + 1):
            # Layers 1..n-1 halve the resolution; layer n keeps it (stride 1).
            mult = min(2**i, 8)
            stride = 2 if i < self.num_layers else 1
            h = nn.Conv(
                self.base_features * mult, strides=(stride, stride), use_bias=conv_bias, name=f"conv_{i}", **kw
            )(h)
            norm = make_norm(self.num_groups, self.dtype, self.param_dtype, f"norm_{i}")
            h = act(norm(h, train))
        logits = nn.Conv(1, strides=(1, 1), name=f"conv_{self.num_layers + 1}", **kw)(h)  # (B, h, w, 1)
        return logits.astype(jnp.float32)
