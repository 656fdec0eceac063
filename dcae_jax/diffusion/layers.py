"""Pieces UViT and DiT share: patch embedding, label embedding, attention, MLP, and init helpers.

The two reference models build these from the same timm / torch modules but initialise and configure
them differently (UViT: N(0, 0.02) Linears, qkv without bias, exact GELU, affine LayerNorm eps 1e-5;
DiT: xavier Linears, qkv with bias, tanh GELU, LayerNorm without affine, eps 1e-6). Those
differences are module fields here; each model file passes its own. Parameter names follow the
torch module names (`proj`, `embedding_table`, `qkv`, `fc1`, ...), so converters are key tables.

Latents are NHWC; token order is raster (h, w).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dcae_jax.runtime import compute

Array = jax.Array
Dtype = Any
Initializer = nn.initializers.Initializer


class LatentConfig(Protocol):
    """What the shared input check and init helpers read from a model config."""

    in_channels: int
    input_size: int


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


def torch_uniform_fan_in(fan_in: int) -> Initializer:
    """torch Conv2d's default init for weight and bias: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def dense(features: int, name: str, dtype: Dtype, kernel_init: Initializer, use_bias: bool = True) -> nn.Dense:
    """A torch `nn.Linear` with the given weight init and a zero bias."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, kernel_init=kernel_init, name=name)


def layer_norm(name: str, epsilon: float, affine: bool = True) -> nn.LayerNorm:
    """torch `nn.LayerNorm(D, eps, elementwise_affine=affine)`: two-pass variance, always in float32."""
    return nn.LayerNorm(
        epsilon=epsilon, use_bias=affine, use_scale=affine, use_fast_variance=False, dtype=jnp.float32, name=name
    )


class PatchConv(nn.Module):
    """torch `Conv2d(C, D, kernel=stride=p)` as a matmul over flattened patches; kernel in conv layout (p, p, C, D).

    `kernel_init` / `bias_init` of None are torch's Conv2d default, U(+-1/sqrt(C*p*p)). `in_channels`: the
    kernel's channels when x may have fewer (adaptive channels: x's c channels meet the kernel's first c).
    """

    features: int
    patch_size: int
    dtype: Dtype = jnp.float32
    kernel_init: Initializer | None = None
    bias_init: Initializer | None = None
    in_channels: int | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        p, c = self.patch_size, x.shape[-1]
        channels = self.in_channels or c
        fan_in = channels * p * p
        kernel_init = torch_uniform_fan_in(fan_in) if self.kernel_init is None else self.kernel_init
        bias_init = torch_uniform_fan_in(fan_in) if self.bias_init is None else self.bias_init
        kernel = self.param("kernel", kernel_init, (p, p, channels, self.features), jnp.float32)[:, :, :c]
        bias = self.param("bias", bias_init, (self.features,), jnp.float32)
        patches = patchify(x, p).astype(self.dtype)  # (B, L, p*p*c)
        # (p, p, c, D) flattens to (p1 p2 c, D), the same order as the patch features.
        y = patches @ kernel.reshape(p * p * c, self.features).astype(self.dtype)  # (B, L, D)
        return y + bias.astype(self.dtype)


class PatchEmbed(nn.Module):
    """Latents to raster-ordered patch tokens (a wrapper so params sit at <embedder>/proj like torch)."""

    features: int
    patch_size: int
    dtype: Dtype = jnp.float32
    kernel_init: Initializer | None = None
    bias_init: Initializer | None = None
    in_channels: int | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        proj = PatchConv(
            self.features,
            self.patch_size,
            self.dtype,
            self.kernel_init,
            self.bias_init,
            in_channels=self.in_channels,
            name="proj",
        )
        return proj(x)  # (B, L, D)


class LabelEmbedder(nn.Module):
    """Class embedding with label dropout to the null class (index num_classes) for CFG training.

    The table has num_classes + 1 rows when `null_row` (UViT always; DiT only when it drops labels).
    The default init is torch `nn.Embedding`'s N(0, 1).
    """

    num_classes: int
    features: int
    dropout_prob: float
    null_row: bool = True
    embedding_init: Initializer = nn.initializers.normal(stddev=1.0)

    @nn.compact
    def __call__(self, y: Array, train: bool) -> Array:
        if train and self.dropout_prob > 0:
            drop = jax.random.uniform(self.make_rng("label_dropout"), y.shape) < self.dropout_prob  # torch: rand < p
            y = jnp.where(drop, self.num_classes, y)
        table = nn.Embed(
            self.num_classes + int(self.null_row),
            self.features,
            embedding_init=self.embedding_init,
            name="embedding_table",
        )
        return table(y)  # (B, D) float32


class Attention(nn.Module):
    """timm `Attention`: qkv features laid out (3, heads, head_dim), proj with bias."""

    num_heads: int
    qkv_bias: bool
    kernel_init: Initializer
    dtype: Dtype = jnp.float32
    attention: str = "auto"  # runtime.compute.attention_implementation: auto | xla | cudnn

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, n, d = x.shape
        head_dim = d // self.num_heads
        qkv = dense(3 * d, "qkv", self.dtype, self.kernel_init, use_bias=self.qkv_bias)(x)  # (B, N, 3D)
        qkv = qkv.reshape(b, n, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, H, hd) each
        # XLA's kernel (softmax in float32 for any dtype), or cuDNN's fused one on a GPU in bf16 (float32 softmax
        # statistics too); chosen when the module is traced.
        impl = compute.attention_implementation(self.attention, self.dtype, head_dim)
        out = jax.nn.dot_product_attention(q, k, v, scale=head_dim**-0.5, implementation=impl)  # (B, N, H, hd)
        return dense(d, "proj", self.dtype, self.kernel_init)(out.reshape(b, n, d))  # (B, N, D), heads major


class Mlp(nn.Module):
    """timm `Mlp`: Linear -> GELU (exact erf, or tanh-approximate) -> Linear."""

    hidden_features: int
    approximate_gelu: bool
    kernel_init: Initializer
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = dense(self.hidden_features, "fc1", self.dtype, self.kernel_init)(x)
        h = nn.gelu(h, approximate=self.approximate_gelu)
        return dense(x.shape[-1], "fc2", self.dtype, self.kernel_init)(h)


def check_latents(x: Array, config: LatentConfig, prefix: bool = False) -> None:
    """Raise unless x is (B, input_size, input_size, in_channels); `prefix`: any 1..in_channels channels."""
    s, c = config.input_size, config.in_channels
    if prefix and x.ndim == 4 and x.shape[1:3] == (s, s) and 1 <= x.shape[3] <= c:
        return
    if x.shape[1:] != (s, s, c):
        want = f"1..{c}" if prefix else str(c)
        raise ValueError(f"expected latents (B, {s}, {s}, {want}), got {x.shape}")


def init_params(model: nn.Module, rng: Array) -> dict:
    """Freshly initialised float32 params of a UViT / DiT (`model.config`), from dummy (1, ...) inputs.

    No "label_dropout" rng is needed: init runs with train=False.
    """
    cfg: LatentConfig = model.config
    x = jnp.zeros((1, cfg.input_size, cfg.input_size, cfg.in_channels), jnp.float32)
    t, y = jnp.zeros((1,), jnp.float32), jnp.zeros((1,), jnp.int32)
    return model.init({"params": rng}, x, t, y, train=False)["params"]


def num_params(model: nn.Module) -> int:
    """Number of parameters of `init_params(model, ...)`, from shapes only (nothing is allocated)."""
    shapes = jax.eval_shape(lambda r: init_params(model, r), jax.random.key(0))
    return sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes))
