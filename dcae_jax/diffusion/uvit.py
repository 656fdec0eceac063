"""UViT, the latent-diffusion backbone DC-AE is evaluated with (efficientvit `diffusioncore/models/uvit.py`).

A ViT over ``[label, time, patch_1 .. patch_L]`` tokens with U-Net style long skips: ``depth // 2``
in-blocks push their outputs on a stack, one mid block, ``depth // 2`` out-blocks each pop the most
recent skip (LIFO) and fuse it *before* attention with ``skip_linear(concat([x, skip]))``. The time
token is the raw sinusoid (no MLP), the head is LayerNorm + Linear with no final conv. Latents are
NHWC here (the reference is NCHW); the token order is raster (h, w) either way.

Parameter names follow the torch module names, so a state-dict converter is a key table
(torch ``.weight`` of a Linear -> ``kernel`` transposed ``(in, out)``)::

    patch_embed.proj.weight (D, C, p, p)      -> patch_embed/proj/kernel (p, p, C, D)  [transpose(2, 3, 1, 0)]
    patch_embed.proj.bias                     -> patch_embed/proj/bias
    label_emb.embedding_table.weight          -> label_emb/embedding_table/embedding   (num_classes + 1, D)
    pos_embed (1, 2 + L, D)                   -> pos_embed
    in_blocks.{i}.* / mid_block.* / out_blocks.{i}.*
                                              -> in_blocks_{i}/* / mid_block/* / out_blocks_{i}/*
      norm1 / norm2 .weight, .bias            -> norm1 / norm2 /scale, /bias
      attn.qkv.weight (3D, D)  (no bias)      -> attn/qkv/kernel (D, 3D)   features laid out (3, heads, head_dim)
      attn.proj.weight, .bias                 -> attn/proj/kernel, /bias
      mlp.fc1 / mlp.fc2 .weight, .bias        -> mlp/fc1 / mlp/fc2 /kernel, /bias
      skip_linear.weight (D, 2D), .bias       -> skip_linear/kernel (2D, D), /bias     (out-blocks only)
    norm.weight, .bias                        -> norm/scale, /bias
    decoder_pred.weight (p*p*C, D), .bias     -> decoder_pred/kernel (D, p*p*C), /bias

Adaptive channels (the USiT of DC-AE 1.5, DC-Gen's `adaptive_channel`): the model holds the weights of all
`in_channels` latent channels and takes latents with only the first c' of them (a DC-AE 1.5 channel prefix):
the patch embedding uses its kernel's first c' input channels (bias whole), `decoder_pred` its first p*p*c'
outputs, so the prediction has c' channels too.

`dtype` is the compute dtype; parameters stay float32. LayerNorm, the attention softmax and the
time sinusoid run in float32, and the residual stream is promoted like torch autocast promotes it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dcae_jax.diffusion.layers import (
    Attention,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    check_latents,
    dense,
    init_params,
    layer_norm,
    num_params,
    timestep_embedding,
    unpatchify,
)
from dcae_jax.runtime import compute

Array = jax.Array
Dtype = Any

# timm `trunc_normal_(std=0.02)` truncates at *absolute* +-2 (= +-100 sigma): effectively N(0, 0.02^2).
# Flax's `truncated_normal` would truncate at +-2 sigma instead, a different distribution.
_linear_init = nn.initializers.normal(stddev=0.02)  # every Linear (bias 0) and pos_embed
_layer_norm = functools.partial(layer_norm, epsilon=1e-5)  # torch `nn.LayerNorm(D)`: affine, eps 1e-5


@dataclasses.dataclass(frozen=True)
class UViTConfig:
    """Architecture of a UViT. Defaults are UViT-S on f32c32 latents of a 512px image."""

    in_channels: int = 32  # latent channels
    input_size: int = 16  # latent height = width
    patch_size: int = 1
    hidden_size: int = 512
    depth: int = 12  # depth // 2 in-blocks + 1 mid block + depth // 2 out-blocks
    num_heads: int = 8
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # the label table has num_classes + 1 rows; the last is the null (CFG) class
    class_dropout_prob: float = 0.1
    adaptive_channels: bool = False  # also takes latents with only the first c' <= in_channels channels
    name: str = "custom"

    def __post_init__(self):
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} not divisible by patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 2:
            raise ValueError(f"hidden_size must be even for the cos/sin time token, got {self.hidden_size}")

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def seq_len(self) -> int:
        return self.num_patches + 2  # label and time tokens first


# `dc_ae_uvit_{s,h,2b}_in_512px`; in_channels / input_size / patch_size come from the autoencoder.
PRESETS: dict[str, UViTConfig] = {
    "uvit-s": UViTConfig(depth=12, hidden_size=512, num_heads=8, name="uvit-s"),
    "uvit-h": UViTConfig(depth=28, hidden_size=1152, num_heads=16, name="uvit-h"),
    "uvit-2b": UViTConfig(depth=28, hidden_size=2048, num_heads=32, name="uvit-2b"),
    "uvit-3b": UViTConfig(depth=56, hidden_size=2048, num_heads=32, name="uvit-3b"),  # DC-AE 1.5's USiT-3B
    "uvit-tiny": UViTConfig(depth=2, hidden_size=32, num_heads=2, name="uvit-tiny"),  # tests and smoke runs
}


def get_uvit_config(
    preset: str, /, *, in_channels: int, input_size: int, patch_size: int = 1, **overrides
) -> UViTConfig:
    """A preset sized for a given latent space; `overrides` replace any other field (`name` included)."""
    if preset not in PRESETS:
        raise KeyError(f"unknown UViT preset {preset!r}; valid names: {sorted(PRESETS)}")
    return dataclasses.replace(
        PRESETS[preset], in_channels=in_channels, input_size=input_size, patch_size=patch_size, **overrides
    )


class Block(nn.Module):
    """Pre-LN transformer block; out-blocks first fuse the long skip (concat + Linear, not a sum)."""

    num_heads: int
    mlp_ratio: float
    has_skip: bool = False
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: Array, skip: Array | None = None) -> Array:
        d = x.shape[-1]
        if self.has_skip:
            skip_linear = dense(d, "skip_linear", self.dtype, _linear_init)
            x = skip_linear(jnp.concatenate([x, skip], axis=-1))  # (B, N, 2D) -> (B, N, D)
        attn = Attention(self.num_heads, False, _linear_init, dtype=self.dtype, attention=self.attention, name="attn")
        x = x + attn(_layer_norm("norm1")(x))
        mlp = Mlp(
            int(d * self.mlp_ratio), approximate_gelu=False, kernel_init=_linear_init, dtype=self.dtype, name="mlp"
        )
        x = x + mlp(_layer_norm("norm2")(x))
        return x


class UViT(nn.Module):
    """Class-conditional UViT: (x_t, t, y) -> prediction with the latent's shape (eps or velocity).

    Attributes:
      config: the architecture.
      dtype: compute dtype (bf16 for training); parameters stay float32.
      remat: per-block recomputation in the backward pass, a `runtime.compute.REMAT_POLICIES` name ("full" is
        the reference's `use_checkpoint`); True / False mean "full" / "none".
      attention: the attention kernel, "auto" | "xla" | "cudnn" (`runtime.compute.attention_implementation`).
    """

    config: UViTConfig
    dtype: Dtype = jnp.float32
    remat: str | bool = "none"
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: Array, t: Array, y: Array, *, train: bool = False) -> Array:
        """x: (B, H, W, C) latents (C = in_channels, or any C <= in_channels with adaptive channels); t: (B,)
        float time fed to the sinusoid as is; y: (B,) int in [0, num_classes]."""
        cfg = self.config
        d, p = cfg.hidden_size, cfg.patch_size
        check_latents(x, cfg, prefix=cfg.adaptive_channels)
        c = x.shape[-1]

        # (B, L, D); torch Conv2d default init; its kernel has every channel, the first c are used.
        patches = PatchEmbed(d, p, self.dtype, in_channels=cfg.in_channels, name="patch_embed")(x)
        time_token = timestep_embedding(t, d)[:, None]  # (B, 1, D) float32
        # Default LabelEmbedder: N(0, 1) table (torch nn.Embedding) that always has the null row.
        label_token = LabelEmbedder(cfg.num_classes, d, cfg.class_dropout_prob, name="label_emb")(y, train)[:, None]
        tokens = jnp.concatenate([label_token, time_token, patches.astype(jnp.float32)], axis=1)  # (B, 2 + L, D)
        pos_embed = self.param("pos_embed", _linear_init, (1, cfg.seq_len, d), jnp.float32)
        h = tokens + pos_embed

        block_cls = compute.remat(Block, self.remat)
        kw = dict(dtype=self.dtype, attention=self.attention)
        skips = []
        for i in range(cfg.depth // 2):
            h = block_cls(cfg.num_heads, cfg.mlp_ratio, name=f"in_blocks_{i}", **kw)(h)
            skips.append(h)
        h = block_cls(cfg.num_heads, cfg.mlp_ratio, name="mid_block", **kw)(h)
        for i in range(cfg.depth // 2):
            h = block_cls(cfg.num_heads, cfg.mlp_ratio, has_skip=True, name=f"out_blocks_{i}", **kw)(
                h,
                skips.pop(),  # LIFO: out_blocks_0 pairs with the last in-block
            )

        h = _layer_norm("norm")(h)
        out = dense(p * p * cfg.in_channels, "decoder_pred", self.dtype, _linear_init)(h)  # (B, 2 + L, p*p*C)
        # Adaptive channels: the first p*p*c outputs (the reference slices the weight rows: the same numbers).
        return unpatchify(out[:, 2:, : p * p * c].astype(jnp.float32), p, c)  # (B, H, W, c)


def init_uvit_params(config: UViTConfig, rng: Array) -> dict:
    """Freshly initialised float32 params (no "label_dropout" rng needed: init runs with train=False)."""
    return init_params(UViT(config), rng)


def count_params(config: UViTConfig) -> int:
    """Number of parameters, from shapes only (nothing is allocated)."""
    return num_params(UViT(config))
