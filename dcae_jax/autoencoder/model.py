"""DC-AE encoder/decoder (Chen et al., ICLR 2025) and the registry of released variants.

Residual autoencoding: every down block adds a parameter-free space-to-channel + channel-averaging
shortcut, every up block a channel-duplicating + channel-to-space shortcut, and the encoder's
`project_out` / decoder's `project_in` are residual too (factor-1 averaging / duplicating).
`DCAEConfig.residual=False` removes all of them at equal parameter count (the paper's ablation).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dcae_jax.autoencoder import layers

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DCAEConfig:
    """Architecture of a DC-AE. Field names follow diffusers' `AutoencoderDC` config.

    Per-stage tuples have one entry per stage (stage i works at width `block_out_channels[i]`
    and resolution H / 2**i). A stage with 0 layers is empty and has no down/up block.
    """

    latent_channels: int = 32
    encoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    decoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    encoder_layers_per_block: tuple[int, ...] = (0, 4, 8, 2, 2, 2)
    decoder_layers_per_block: tuple[int, ...] = (0, 5, 10, 2, 2, 2)
    encoder_block_types: tuple[str, ...] = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    decoder_block_types: tuple[str, ...] = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    encoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((),) * 6
    decoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((),) * 6
    decoder_norm_types: tuple[str, ...] = ("batch_norm",) * 3 + ("rms_norm",) * 3
    decoder_act_fns: tuple[str, ...] = ("relu",) * 3 + ("silu",) * 3
    downsample_block_type: str = "pixel_unshuffle"  # or "conv" (stride-2 conv, SANA)
    upsample_block_type: str = "pixel_shuffle"  # or "interpolate" (nearest + conv, SANA)
    in_channels: int = 3
    attention_head_dim: int = 32
    residual: bool = True  # False: remove every shortcut (the paper's non-residual baseline)
    scaling_factor: float | None = None
    name: str = "custom"

    def __post_init__(self):
        n = len(self.encoder_block_out_channels)
        per_stage = {
            "encoder_layers_per_block": self.encoder_layers_per_block,
            "encoder_block_types": self.encoder_block_types,
            "encoder_qkv_multiscales": self.encoder_qkv_multiscales,
            "decoder_block_out_channels": self.decoder_block_out_channels,
            "decoder_layers_per_block": self.decoder_layers_per_block,
            "decoder_block_types": self.decoder_block_types,
            "decoder_qkv_multiscales": self.decoder_qkv_multiscales,
            "decoder_norm_types": self.decoder_norm_types,
            "decoder_act_fns": self.decoder_act_fns,
        }
        for field, value in per_stage.items():
            if len(value) != n:
                raise ValueError(f"DCAEConfig.{field} has {len(value)} entries, expected {n} (one per stage)")
        for t in self.encoder_block_types + self.decoder_block_types:
            layers.get_block(t)
        for t in self.decoder_norm_types:
            layers.get_norm(t)
        for t in self.decoder_act_fns:
            layers.get_activation(t)
        if self.downsample_block_type not in ("pixel_unshuffle", "conv"):
            raise ValueError(
                f"DCAEConfig.downsample_block_type={self.downsample_block_type!r}; valid: 'pixel_unshuffle', 'conv'"
            )
        if self.upsample_block_type not in ("pixel_shuffle", "interpolate"):
            raise ValueError(
                f"DCAEConfig.upsample_block_type={self.upsample_block_type!r}; valid: 'pixel_shuffle', 'interpolate'"
            )

    @property
    def num_stages(self) -> int:
        return len(self.encoder_block_out_channels)

    @property
    def spatial_compression_ratio(self) -> int:
        return 2 ** (self.num_stages - 1)

    def replace(self, **changes: Any) -> DCAEConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DCAEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DCAEConfig fields {unknown}; valid: {sorted(known)}")

        def tup(v):
            return tuple(tup(x) for x in v) if isinstance(v, list | tuple) else v

        return cls(**{k: tup(v) for k, v in d.items()})

    @classmethod
    def from_diffusers(cls, d: dict[str, Any], name: str = "custom") -> DCAEConfig:
        """Builds a config from a diffusers `AutoencoderDC` config.json dict (KeyError / ValueError name the field)."""
        for key in ("latent_channels",):
            if not isinstance(d[key], int) or isinstance(d[key], bool) or d[key] < 1:
                raise ValueError(f"{key}={d[key]!r} must be a positive integer")
        for key in ("encoder_block_out_channels", "decoder_block_out_channels"):
            if not isinstance(d[key], list | tuple) or not all(isinstance(c, int) and c > 0 for c in d[key]):
                raise ValueError(f"{key}={d[key]!r} must be a list of positive integers")
        n = len(d["encoder_block_out_channels"])

        def per_stage(key, default):
            v = d.get(key, default)
            if isinstance(v, str):
                v = (v,) * n
            return tuple(tuple(x) if isinstance(x, list) else x for x in v)

        if not d.get("encoder_out_shortcut", True) or not d.get("decoder_in_shortcut", True):
            raise ValueError("AutoencoderDC configs without in/out shortcuts are not supported")
        down = "pixel_unshuffle" if d.get("downsample_block_type", "pixel_unshuffle") == "pixel_unshuffle" else "conv"
        up = "interpolate" if d.get("upsample_block_type", "pixel_shuffle") == "interpolate" else "pixel_shuffle"
        if d.get("decoder_conv_act_fn", "relu") != "relu":
            raise ValueError(f"decoder_conv_act_fn={d['decoder_conv_act_fn']!r} is not supported (only 'relu')")
        return cls(
            latent_channels=d["latent_channels"],
            in_channels=d.get("in_channels", 3),
            attention_head_dim=d.get("attention_head_dim", 32),
            encoder_block_out_channels=tuple(d["encoder_block_out_channels"]),
            decoder_block_out_channels=tuple(d["decoder_block_out_channels"]),
            encoder_layers_per_block=tuple(d["encoder_layers_per_block"]),
            decoder_layers_per_block=tuple(d["decoder_layers_per_block"]),
            encoder_block_types=per_stage("encoder_block_types", "ResBlock"),
            decoder_block_types=per_stage("decoder_block_types", "ResBlock"),
            encoder_qkv_multiscales=per_stage("encoder_qkv_multiscales", ((),) * n),
            decoder_qkv_multiscales=per_stage("decoder_qkv_multiscales", ((),) * n),
            decoder_norm_types=per_stage("decoder_norm_types", "rms_norm"),
            decoder_act_fns=per_stage("decoder_act_fns", "silu"),
            downsample_block_type=down,
            upsample_block_type=up,
            scaling_factor=d.get("scaling_factor"),
            name=name,
        )

    def to_diffusers(self) -> dict[str, Any]:
        """The equivalent diffusers `AutoencoderDC` config (for tests and interop)."""
        if not self.residual:
            raise ValueError("diffusers AutoencoderDC cannot express residual=False")
        return dict(
            in_channels=self.in_channels,
            latent_channels=self.latent_channels,
            attention_head_dim=self.attention_head_dim,
            encoder_block_types=list(self.encoder_block_types),
            decoder_block_types=list(self.decoder_block_types),
            encoder_block_out_channels=list(self.encoder_block_out_channels),
            decoder_block_out_channels=list(self.decoder_block_out_channels),
            encoder_layers_per_block=list(self.encoder_layers_per_block),
            decoder_layers_per_block=list(self.decoder_layers_per_block),
            encoder_qkv_multiscales=[list(s) for s in self.encoder_qkv_multiscales],
            decoder_qkv_multiscales=[list(s) for s in self.decoder_qkv_multiscales],
            upsample_block_type=self.upsample_block_type,
            downsample_block_type=self.downsample_block_type,
            decoder_norm_types=list(self.decoder_norm_types),
            decoder_act_fns=list(self.decoder_act_fns),
            scaling_factor=self.scaling_factor if self.scaling_factor is not None else 1.0,
        )


# ----------------------------------------------------------------------------------------------
# Registry of released checkpoints.


def _in_mix(latent: int, stages: int, scaling_factor: float, name: str) -> DCAEConfig:
    widths = (128, 256, 512, 512, 1024, 1024) + (2048,) * (stages - 6)
    return DCAEConfig(
        latent_channels=latent,
        encoder_block_out_channels=widths,
        decoder_block_out_channels=widths,
        encoder_layers_per_block=(0, 4, 8, 2, 2, 2) + (2,) * (stages - 6),
        decoder_layers_per_block=(0, 5, 10, 2, 2, 2) + (2,) * (stages - 6),
        encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * (stages - 3),
        decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * (stages - 3),
        encoder_qkv_multiscales=((),) * stages,
        decoder_qkv_multiscales=((),) * stages,
        decoder_norm_types=("batch_norm",) * 3 + ("rms_norm",) * (stages - 3),
        decoder_act_fns=("relu",) * 3 + ("silu",) * (stages - 3),
        scaling_factor=scaling_factor,
        name=name,
    )


def _sana(name: str) -> DCAEConfig:
    return DCAEConfig(
        latent_channels=32,
        encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
        decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
        encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        decoder_norm_types=("rms_norm",) * 6,
        decoder_act_fns=("silu",) * 6,
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        scaling_factor=0.41407,
        name=name,
    )


VARIANTS: dict[str, DCAEConfig] = {
    "dc-ae-f32c32-in-1.0": _in_mix(32, 6, 0.3189, "dc-ae-f32c32-in-1.0"),
    "dc-ae-f32c32-mix-1.0": _in_mix(32, 6, 0.4552, "dc-ae-f32c32-mix-1.0"),
    "dc-ae-f64c128-in-1.0": _in_mix(128, 7, 0.2889, "dc-ae-f64c128-in-1.0"),
    "dc-ae-f64c128-mix-1.0": _in_mix(128, 7, 0.4538, "dc-ae-f64c128-mix-1.0"),
    "dc-ae-f128c512-in-1.0": _in_mix(512, 8, 0.4883, "dc-ae-f128c512-in-1.0"),
    "dc-ae-f128c512-mix-1.0": _in_mix(512, 8, 0.3620, "dc-ae-f128c512-mix-1.0"),
    "dc-ae-f32c32-sana-1.0": _sana("dc-ae-f32c32-sana-1.0"),
    "dc-ae-f32c32-sana-1.1": _sana("dc-ae-f32c32-sana-1.1"),
}


def get_config(name: str) -> DCAEConfig:
    """The config of a released model, by name (a `-diffusers` suffix or `mit-han-lab/` prefix is ok)."""
    key = name.rstrip("/").split("/")[-1].removesuffix("-diffusers")
    if key not in VARIANTS:
        raise KeyError(f"unknown DC-AE variant {name!r}; valid names: {sorted(VARIANTS)}")
    return VARIANTS[key]


def tiny_config(**overrides: Any) -> DCAEConfig:
    """A small residual DC-AE (f8, 3 stages) with every block type, for tests and quick training."""
    base = DCAEConfig(
        latent_channels=8,
        encoder_block_out_channels=(16, 32, 64, 64),
        decoder_block_out_channels=(16, 32, 64, 64),
        encoder_layers_per_block=(0, 1, 1, 1),
        decoder_layers_per_block=(0, 1, 1, 1),
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
        encoder_qkv_multiscales=((),) * 4,
        decoder_qkv_multiscales=((),) * 4,
        decoder_norm_types=("batch_norm", "batch_norm", "rms_norm", "rms_norm"),
        decoder_act_fns=("relu", "relu", "silu", "silu"),
        attention_head_dim=8,
        scaling_factor=1.0,
        name="tiny",
    )
    return base.replace(**overrides)


# ----------------------------------------------------------------------------------------------
# Modules.


class Encoder(nn.Module):
    """Image (B, H, W, 3) in [-1, 1] -> latent (B, H/f, W/f, latent_channels)."""

    config: DCAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        widths, depths = cfg.encoder_block_out_channels, cfg.encoder_layers_per_block
        n = cfg.num_stages
        pixel_unshuffle = cfg.downsample_block_type == "pixel_unshuffle"
        if depths[0] > 0:
            x = layers.Conv2d(widths[0], 3, name="project_in", **kw)(x)
        else:  # stem straight to stage 1: a down block without shortcut
            x = layers.DownBlock(widths[1], pixel_unshuffle, shortcut=False, name="project_in", **kw)(x)
        for i in range(n):
            for j in range(depths[i]):
                block = layers.make_block(
                    cfg.encoder_block_types[i],
                    norm="rms_norm",
                    act="silu",
                    head_dim=cfg.attention_head_dim,
                    scales=cfg.encoder_qkv_multiscales[i],
                    name=f"stage_{i}_block_{j}",
                    **kw,
                )
                x = block(x, train)
            if i < n - 1 and depths[i] > 0:
                x = layers.DownBlock(widths[i + 1], pixel_unshuffle, cfg.residual, name=f"stage_{i}_down", **kw)(x)
        z = layers.Conv2d(cfg.latent_channels, 3, name="project_out", **kw)(x)
        if cfg.residual:
            z = z + layers.channel_average(x, cfg.latent_channels).astype(z.dtype)
        return z


class Decoder(nn.Module):
    """Latent (B, h, w, latent_channels) -> image (B, h*f, w*f, 3), not clamped."""

    config: DCAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: Array, train: bool = False) -> Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        widths, depths = cfg.decoder_block_out_channels, cfg.decoder_layers_per_block
        n = cfg.num_stages
        interpolate = cfg.upsample_block_type == "interpolate"
        x = layers.Conv2d(widths[-1], 3, name="project_in", **kw)(z)
        if cfg.residual:
            x = x + layers.channel_duplicate(z, widths[-1]).astype(x.dtype)
        for i in reversed(range(n)):
            if i < n - 1 and depths[i] > 0:
                x = layers.UpBlock(widths[i], interpolate, cfg.residual, name=f"stage_{i}_up", **kw)(x)
            for j in range(depths[i]):
                block = layers.make_block(
                    cfg.decoder_block_types[i],
                    norm=cfg.decoder_norm_types[i],
                    act=cfg.decoder_act_fns[i],
                    head_dim=cfg.attention_head_dim,
                    scales=cfg.decoder_qkv_multiscales[i],
                    name=f"stage_{i}_block_{j}",
                    **kw,
                )
                x = block(x, train)
        x = layers.RMSNorm(param_dtype=self.param_dtype, name="head_norm")(x)
        x = nn.relu(x)
        if depths[0] > 0:
            x = layers.Conv2d(cfg.in_channels, 3, name="head_conv", **kw)(x)
        else:
            x = layers.UpBlock(cfg.in_channels, interpolate, shortcut=False, name="head_conv", **kw)(x)
        return x


class DCAEModel(nn.Module):
    """The autoencoder: `encode`, `decode`, and `__call__` = decode(encode(x))."""

    config: DCAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        self.encoder = Encoder(self.config, self.dtype, self.param_dtype)
        self.decoder = Decoder(self.config, self.dtype, self.param_dtype)

    def encode(self, x: Array, train: bool = False) -> Array:
        return self.encoder(x, train)

    def decode(self, z: Array, train: bool = False) -> Array:
        return self.decoder(z, train)

    def __call__(self, x: Array, train: bool = False) -> tuple[Array, Array]:
        z = self.encode(x, train)
        return self.decode(z, train), z


def init_variables(config: DCAEConfig, rng: Array | int, resolution: int | None = None) -> dict[str, Any]:
    """Random variables (params, batch_stats) of `DCAEModel(config)`, initialised on the host.

    Same structure and initializer family as `DCAEModel.init` (lecun-normal kernels, unit norm
    scales, zero biases, BatchNorm mean 0 / var 1) without compiling an init graph, which on CPU
    takes longer than the forward pass of a small model. Deterministic in `rng`.
    """
    del resolution  # kept for API compatibility: shapes do not depend on the input size
    res = config.spatial_compression_ratio
    abstract = jax.eval_shape(
        DCAEModel(config).init, jax.random.key(0), jax.ShapeDtypeStruct((1, res, res, config.in_channels), jnp.float32)
    )
    seed = int(rng) if isinstance(rng, int) else [int(v) for v in np.asarray(jax.random.key_data(rng)).ravel()]
    gen = np.random.default_rng(seed)
    pixel_shuffle_up = config.upsample_block_type == "pixel_shuffle"

    def is_up_block(name) -> bool:
        return isinstance(name, str) and (name.endswith("_up") or name == "head_conv")

    def init_leaf(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = gen.standard_normal(leaf.shape, np.float32) / np.sqrt(fan_in)
            keys = [getattr(p, "key", None) for p in path]
            if pixel_shuffle_up and len(keys) >= 3 and keys[-2] == "conv" and is_up_block(keys[-3]):
                value = np.repeat(value[..., : leaf.shape[-1] // 4], 4, axis=-1)  # ICNR, as layers.UpBlock
        elif name in ("scale", "var"):
            value = np.ones(leaf.shape, np.float32)
        else:
            value = np.zeros(leaf.shape, np.float32)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(init_leaf, abstract)


def count_params(tree: Any) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
