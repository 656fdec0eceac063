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

`dtype` is the compute dtype; parameters stay float32. LayerNorm, the attention softmax and the
time sinusoid run in float32, and the residual stream is promoted like torch autocast promotes it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any

# timm `trunc_normal_(std=0.02)` truncates at *absolute* +-2 (= +-100 sigma): effectively N(0, 0.02^2).
# Flax's `truncated_normal` would truncate at +-2 sigma instead, a different distribution.
_linear_init = nn.initializers.normal(stddev=0.02)


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
    "uvit-tiny": UViTConfig(depth=2, hidden_size=32, num_heads=2, name="uvit-tiny"),  # tests and smoke runs
}


def get_uvit_config(name: str, *, in_channels: int, input_size: int, patch_size: int = 1, **overrides) -> UViTConfig:
    """A preset sized for a given latent space; `overrides` replace any other field."""
    if name not in PRESETS:
        raise KeyError(f"unknown UViT preset {name!r}; valid names: {sorted(PRESETS)}")
    return dataclasses.replace(
        PRESETS[name], in_channels=in_channels, input_size=input_size, patch_size=patch_size, **overrides
    )


def timestep_embedding(t: Array, dim: int, max_period: float = 10000.0) -> Array:
    """GLIDE/ADM sinusoid, cos first, in float32: (B,) -> (B, dim). `t` is used as given (may be fractional)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)  # (half,)
    args = t.astype(jnp.float32)[:, None] * freqs[None]  # (B, half)
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def patchify(x: Array, p: int) -> Array:
    """(B, H, W, C) -> (B, (H/p)(W/p), p*p*C), raster patch order, features laid out (p1, p2, C)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)  # (B, h, w, p1, p2, C)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: Array, p: int, channels: int) -> Array:
    """(B, h*w, p*p*C) -> (B, h*p, w*p, C); the inverse of `patchify` (square grids)."""
    b, n, _ = x.shape
    h = w = math.isqrt(n)
    x = x.reshape(b, h, w, p, p, channels).transpose(0, 1, 3, 2, 4, 5)  # (B, h, p1, w, p2, C)
    return x.reshape(b, h * p, w * p, channels)


def _torch_uniform_fan_in(fan_in: int) -> nn.initializers.Initializer:
    """torch Conv2d's default init for weight and bias: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _dense(features: int, name: str, dtype: Dtype, use_bias: bool = True) -> nn.Dense:
    """A torch `nn.Linear` as initialised by UViT `_init_weights`."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, kernel_init=_linear_init, name=name)


def _layer_norm(name: str) -> nn.LayerNorm:
    """torch `nn.LayerNorm(D)`: eps 1e-5 and two-pass variance, always in float32."""
    return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=jnp.float32, name=name)


class PatchConv(nn.Module):
    """torch `Conv2d(C, D, kernel=stride=p)` as a matmul over flattened patches; kernel in conv layout (p, p, C, D)."""

    features: int
    patch_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        p, c = self.patch_size, x.shape[-1]
        fan_in = c * p * p
        kernel = self.param("kernel", _torch_uniform_fan_in(fan_in), (p, p, c, self.features), jnp.float32)
        bias = self.param("bias", _torch_uniform_fan_in(fan_in), (self.features,), jnp.float32)
        patches = patchify(x, p).astype(self.dtype)  # (B, L, p*p*C)
        # (p, p, C, D) flattens to (p1 p2 C, D), the same order as the patch features.
        y = patches @ kernel.reshape(fan_in, self.features).astype(self.dtype)  # (B, L, D)
        return y + bias.astype(self.dtype)


class PatchEmbed(nn.Module):
    """Latents to raster-ordered patch tokens (a wrapper so params sit at patch_embed/proj like torch)."""

    features: int
    patch_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return PatchConv(self.features, self.patch_size, self.dtype, name="proj")(x)  # (B, L, D)


class LabelEmbedder(nn.Module):
    """Class-label token with label dropout to the null class (index num_classes) for CFG training."""

    num_classes: int
    features: int
    dropout_prob: float

    @nn.compact
    def __call__(self, y: Array, train: bool) -> Array:
        if train and self.dropout_prob > 0:
            # torch: `rand(B) < p` -> null class.
            drop = jax.random.uniform(self.make_rng("label_dropout"), y.shape) < self.dropout_prob
            y = jnp.where(drop, self.num_classes, y)
        table = nn.Embed(
            self.num_classes + 1,
            self.features,
            embedding_init=nn.initializers.normal(stddev=1.0),  # torch nn.Embedding default N(0, 1)
            name="embedding_table",
        )
        return table(y)  # (B, D) float32


class Attention(nn.Module):
    """Multi-head self-attention: qkv without bias (features (3, heads, head_dim)), proj with bias."""

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, n, d = x.shape
        head_dim = d // self.num_heads
        qkv = _dense(3 * d, "qkv", self.dtype, use_bias=False)(x)  # (B, N, 3D)
        qkv = qkv.reshape(b, n, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, H, hd) each
        # implementation=None lets JAX choose (XLA in jax 0.10); its softmax runs in float32 for any dtype.
        out = jax.nn.dot_product_attention(q, k, v, scale=head_dim**-0.5)  # (B, N, H, hd)
        return _dense(d, "proj", self.dtype)(out.reshape(b, n, d))  # (B, N, D), heads major


class Mlp(nn.Module):
    """timm `Mlp`: Linear -> exact (erf) GELU -> Linear."""

    hidden_features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        h = nn.gelu(_dense(self.hidden_features, "fc1", self.dtype)(x), approximate=False)
        return _dense(d, "fc2", self.dtype)(h)


class Block(nn.Module):
    """Pre-LN transformer block; out-blocks first fuse the long skip (concat + Linear, not a sum)."""

    num_heads: int
    mlp_ratio: float
    has_skip: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, skip: Array | None = None) -> Array:
        d = x.shape[-1]
        if self.has_skip:
            x = _dense(d, "skip_linear", self.dtype)(jnp.concatenate([x, skip], axis=-1))  # (B, N, 2D) -> (B, N, D)
        x = x + Attention(self.num_heads, self.dtype, name="attn")(_layer_norm("norm1")(x))
        x = x + Mlp(int(d * self.mlp_ratio), self.dtype, name="mlp")(_layer_norm("norm2")(x))
        return x


class UViT(nn.Module):
    """Class-conditional UViT: (x_t, t, y) -> prediction with the latent's shape (eps or velocity).

    Attributes:
      config: the architecture.
      dtype: compute dtype (bf16 for training); parameters stay float32.
      remat: recompute each block's activations in the backward pass (the reference's `use_checkpoint`).
    """

    config: UViTConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: Array, t: Array, y: Array, *, train: bool = False) -> Array:
        """x: (B, H, W, C) latents; t: (B,) float time fed to the sinusoid as is; y: (B,) int in [0, num_classes]."""
        cfg = self.config
        d, p = cfg.hidden_size, cfg.patch_size
        if x.shape[1:] != (cfg.input_size, cfg.input_size, cfg.in_channels):
            raise ValueError(
                f"expected latents (B, {cfg.input_size}, {cfg.input_size}, {cfg.in_channels}), got {x.shape}"
            )

        patches = PatchEmbed(d, p, self.dtype, name="patch_embed")(x)  # (B, L, D)
        time_token = timestep_embedding(t, d)[:, None]  # (B, 1, D) float32
        label_token = LabelEmbedder(cfg.num_classes, d, cfg.class_dropout_prob, name="label_emb")(y, train)[:, None]
        tokens = jnp.concatenate([label_token, time_token, patches.astype(jnp.float32)], axis=1)  # (B, 2 + L, D)
        pos_embed = self.param("pos_embed", _linear_init, (1, cfg.seq_len, d), jnp.float32)
        h = tokens + pos_embed

        block_cls = nn.remat(Block) if self.remat else Block
        skips = []
        for i in range(cfg.depth // 2):
            h = block_cls(cfg.num_heads, cfg.mlp_ratio, dtype=self.dtype, name=f"in_blocks_{i}")(h)
            skips.append(h)
        h = block_cls(cfg.num_heads, cfg.mlp_ratio, dtype=self.dtype, name="mid_block")(h)
        for i in range(cfg.depth // 2):
            h = block_cls(cfg.num_heads, cfg.mlp_ratio, has_skip=True, dtype=self.dtype, name=f"out_blocks_{i}")(
                h,
                skips.pop(),  # LIFO: out_blocks_0 pairs with the last in-block
            )

        h = _layer_norm("norm")(h)
        out = _dense(p * p * cfg.in_channels, "decoder_pred", self.dtype)(h)  # (B, 2 + L, p*p*C)
        return unpatchify(out[:, 2:].astype(jnp.float32), p, cfg.in_channels)  # (B, H, W, C)


def _dummy_inputs(config: UViTConfig) -> tuple[Array, Array, Array]:
    x = jnp.zeros((1, config.input_size, config.input_size, config.in_channels), jnp.float32)
    return x, jnp.zeros((1,), jnp.float32), jnp.zeros((1,), jnp.int32)


def init_uvit_params(config: UViTConfig, rng: Array) -> dict:
    """Freshly initialised float32 params (no "label_dropout" rng needed: init runs with train=False)."""
    return UViT(config).init({"params": rng}, *_dummy_inputs(config), train=False)["params"]


def count_params(config: UViTConfig) -> int:
    """Number of parameters, from shapes only (nothing is allocated)."""
    shapes = jax.eval_shape(lambda r: init_uvit_params(config, r), jax.random.key(0))
    return sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes))
