"""DiT (Peebles & Xie) as efficientvit trains it on DC-AE latents (`diffusioncore/models/dit.py`, diffusion.md §3.3).

A plain transformer over raster-ordered patch tokens plus a *fixed* 2D sin-cos position embedding.
Conditioning ``c = t_embedder(t) + y_embedder(y)`` enters every block through adaLN-Zero: a
``SiLU -> Linear(D, 6D)`` gives shift/scale/gate for the attention and MLP branches around
LayerNorms without affine (eps 1e-6). The head is adaLN (shift, scale) + Linear to ``p*p*2C``
channels: epsilon, then the learned-range variance values (``learn_sigma=True``). Latents are NHWC
here (the reference is NCHW); token order is raster (h, w) either way.

Parameter names follow the torch module names, so a state-dict converter is a key table
(torch Linear ``.weight`` (out, in) -> ``kernel`` (in, out))::

    x_embedder.proj.weight (D, C, p, p)       -> x_embedder/proj/kernel (p, p, C, D)  [transpose(2, 3, 1, 0)]
    x_embedder.proj.bias                      -> x_embedder/proj/bias
    t_embedder.mlp.0 / mlp.2 .weight, .bias   -> t_embedder/mlp_0 / mlp_2 /kernel, /bias   (256 -> D -> D)
    y_embedder.embedding_table.weight         -> y_embedder/embedding_table/embedding  (num_classes + 1, D)
    pos_embed (1, L, D)                       -> (none: a constant, see `sincos_pos_embed_2d`)
    blocks.{i}.attn.qkv.weight, .bias         -> blocks_{i}/attn/qkv/kernel (D, 3D), /bias  features (3, heads, head_dim)
    blocks.{i}.attn.proj / mlp.fc1 / mlp.fc2  -> blocks_{i}/attn/proj / mlp/fc1 / mlp/fc2
    blocks.{i}.adaLN_modulation.1             -> blocks_{i}/adaLN_modulation_1   (D -> 6D)
    final_layer.adaLN_modulation.1            -> final_layer/adaLN_modulation_1  (D -> 2D)
    final_layer.linear                        -> final_layer/linear              (D -> p*p*2C)

The torch `pos_embed` is an `nn.Parameter(requires_grad=False)`: it is in the state dict but not
in the reference's trainable-parameter count (DiT-XL on f32c32: 674.89M), so it is not a Flax param.

`dtype` is the compute dtype; parameters stay float32. LayerNorms, the attention softmax, the
sinusoids and the residual stream run in float32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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

# DiT `initialize_weights`: every Linear xavier_uniform / bias 0, the patch conv xavier on its (D, C*p*p) view.
_xavier = nn.initializers.xavier_uniform()
_patch_xavier = nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3)  # kernel (p, p, C, D)
_zeros = nn.initializers.zeros
# torch `nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)`
_layer_norm = functools.partial(layer_norm, epsilon=1e-6, affine=False)


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Architecture of a DiT. Defaults are DiT-XL with patch 1 on f32c32 latents of a 512px image."""

    in_channels: int = 32  # latent channels
    input_size: int = 16  # latent height = width
    patch_size: int = 1
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # the label table has num_classes + 1 rows (when dropout > 0); the last is the null class
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True  # output 2C channels: epsilon, then the variance interpolation values
    frequency_embedding_size: int = 256  # width of the timestep sinusoid fed to the t-embedder MLP
    name: str = "custom"

    def __post_init__(self):
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} not divisible by patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(
                f"hidden_size must be a multiple of 4 for the 2D sin-cos embedding, got {self.hidden_size}"
            )

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def label_table_size(self) -> int:
        """The reference adds the null row only when labels are dropped in training (`use_cfg_embedding`)."""
        return self.num_classes + int(self.class_dropout_prob > 0)

    @property
    def null_class(self) -> int:
        return self.num_classes


# `dc_ae_dit_xl_in_512px` (patch 1); in_channels / input_size / patch_size come from the autoencoder.
DIT_PRESETS: dict[str, DiTConfig] = {
    "dit-xl": DiTConfig(depth=28, hidden_size=1152, num_heads=16, name="dit-xl"),
    "dit-tiny": DiTConfig(depth=2, hidden_size=32, num_heads=2, name="dit-tiny"),  # tests and smoke runs
}


def get_dit_config(name: str, *, in_channels: int, input_size: int, patch_size: int = 1, **overrides) -> DiTConfig:
    """A preset sized for a given latent space; `overrides` replace any other field."""
    if name not in DIT_PRESETS:
        raise KeyError(f"unknown DiT preset {name!r}; valid names: {sorted(DIT_PRESETS)}")
    return dataclasses.replace(
        DIT_PRESETS[name], in_channels=in_channels, input_size=input_size, patch_size=patch_size, **overrides
    )


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, dim) = [sin(pos * omega), cos(pos * omega)], omega_k = 10000^(-k / (dim/2))."""
    omega = 1.0 / 10000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))  # (dim/2,)
    out = pos.astype(np.float64)[:, None] * omega[None]  # (M, dim/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


@functools.lru_cache(maxsize=16)
def _sincos_pos_embed_2d_cached(dim: int, grid_size: int) -> np.ndarray:
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")  # (g, g) each
    rows, cols = rows.reshape(-1), cols.reshape(-1)  # raster order: token k = row * g + col
    # The reference's first half (named "emb_h") is built from the *column* index (its meshgrid puts w first).
    emb = np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)  # (g*g, dim)
    emb = emb.astype(np.float32)  # the reference stores it in a float32 parameter
    emb.setflags(write=False)
    return emb


def sincos_pos_embed_2d(dim: int, grid_size: int) -> np.ndarray:
    """The fixed DiT/MAE position embedding, (grid_size**2, dim) float32, raster token order."""
    return _sincos_pos_embed_2d_cached(dim, grid_size)


def modulate(x: Array, shift: Array, scale: Array) -> Array:
    """adaLN: x (B, N, D) * (1 + scale (B, D)) + shift (B, D)."""
    return x * (1.0 + scale[:, None]) + shift[:, None]


class TimestepEmbedder(nn.Module):
    """GLIDE sinusoid of the (possibly fractional) timestep -> Linear -> SiLU -> Linear."""

    features: int
    frequency_embedding_size: int = 256
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: Array) -> Array:
        freq = timestep_embedding(t, self.frequency_embedding_size)  # (B, 256) float32, cos first
        init = nn.initializers.normal(stddev=0.02)
        h = nn.silu(dense(self.features, "mlp_0", self.dtype, init)(freq))
        return dense(self.features, "mlp_2", self.dtype, init)(h)  # (B, D)


class DiTBlock(nn.Module):
    """adaLN-Zero block: the zero-initialised modulation makes every block start as the identity."""

    num_heads: int
    mlp_ratio: float
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: Array, c: Array) -> Array:
        d = x.shape[-1]
        mod = dense(6 * d, "adaLN_modulation_1", self.dtype, _zeros)(nn.silu(c)).astype(jnp.float32)  # (B, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        h = modulate(_layer_norm("norm1")(x), shift_msa, scale_msa)
        attn = Attention(self.num_heads, True, _xavier, dtype=self.dtype, attention=self.attention, name="attn")
        x = x + gate_msa[:, None] * attn(h)
        h = modulate(_layer_norm("norm2")(x), shift_mlp, scale_mlp)
        mlp = Mlp(int(d * self.mlp_ratio), approximate_gelu=True, kernel_init=_xavier, dtype=self.dtype, name="mlp")
        return x + gate_mlp[:, None] * mlp(h)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + Linear to the patch pixels; both zero-initialised."""

    out_features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, c: Array) -> Array:
        d = x.shape[-1]
        mod = dense(2 * d, "adaLN_modulation_1", self.dtype, _zeros)(nn.silu(c)).astype(jnp.float32)
        shift, scale = jnp.split(mod, 2, axis=-1)
        h = modulate(_layer_norm("norm_final")(x), shift, scale)
        return dense(self.out_features, "linear", self.dtype, _zeros)(h)  # (B, N, p*p*out)


class DiT(nn.Module):
    """Class-conditional DiT: (x_t, t, y) -> (B, H, W, 2C): epsilon, then learned-range variance values.

    Attributes:
      config: the architecture.
      dtype: compute dtype (bf16 for training); parameters stay float32.
      remat: per-block recomputation in the backward pass, a `runtime.compute.REMAT_POLICIES` name ("full" is
        the reference's `use_checkpoint`); True / False mean "full" / "none".
      attention: the attention kernel, "auto" | "xla" | "cudnn" (`runtime.compute.attention_implementation`).
    """

    config: DiTConfig
    dtype: Dtype = jnp.float32
    remat: str | bool = "none"
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: Array, t: Array, y: Array, *, train: bool = False) -> Array:
        """x: (B, H, W, C) latents; t: (B,) float diffusion step (0..999, may be fractional); y: (B,) int labels."""
        cfg = self.config
        d, p = cfg.hidden_size, cfg.patch_size
        check_latents(x, cfg)
        x_embedder = PatchEmbed(d, p, self.dtype, kernel_init=_patch_xavier, bias_init=_zeros, name="x_embedder")
        tokens = x_embedder(x).astype(jnp.float32)  # (B, L, D)
        h = tokens + jnp.asarray(sincos_pos_embed_2d(d, cfg.grid_size))[None]
        t_emb = TimestepEmbedder(d, cfg.frequency_embedding_size, self.dtype, name="t_embedder")(t)
        y_embedder = LabelEmbedder(
            cfg.num_classes,
            d,
            cfg.class_dropout_prob,
            null_row=cfg.class_dropout_prob > 0,  # the reference's `use_cfg_embedding`
            embedding_init=nn.initializers.normal(stddev=0.02),
            name="y_embedder",
        )
        y_emb = y_embedder(y, train)
        c = t_emb.astype(jnp.float32) + y_emb  # (B, D)

        block_cls = compute.remat(DiTBlock, self.remat)
        for i in range(cfg.depth):
            h = block_cls(cfg.num_heads, cfg.mlp_ratio, self.dtype, self.attention, name=f"blocks_{i}")(h, c)
        out = FinalLayer(p * p * cfg.out_channels, self.dtype, name="final_layer")(h, c)  # (B, L, p*p*out)
        return unpatchify(out.astype(jnp.float32), p, cfg.out_channels)  # (B, H, W, out)


def init_dit_params(config: DiTConfig, rng: Array) -> dict:
    """Freshly initialised float32 params as the reference's `initialize_weights` (adaLN and head zeroed)."""
    return init_params(DiT(config), rng)


def count_params(config: DiTConfig) -> int:
    """Number of (trainable) parameters, from shapes only (nothing is allocated)."""
    return num_params(DiT(config))
