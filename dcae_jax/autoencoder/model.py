"""DC-AE encoder/decoder (Chen et al., ICLR 2025) and the registry of released variants.

Residual autoencoding: every down block adds a parameter-free space-to-channel + channel-averaging
shortcut, every up block a channel-duplicating + channel-to-space shortcut, and the encoder's
`project_out` / decoder's `project_in` are residual too (factor-1 averaging / duplicating).
`DCAEConfig.residual=False` removes all of them at equal parameter count (the paper's ablation). DC-AE 1.5 keeps
the block shortcuts but drops the two around the latent (`encoder_out_shortcut`, `decoder_in_shortcut`), which makes
its latent channels orderable: any prefix of them decodes (`DCAEModel.encode(x, latent_channels=c)`).
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
    encoder_out_shortcut: bool = True  # the channel-averaging shortcut around the encoder's project_out (1.5: off)
    decoder_in_shortcut: bool = True  # the channel-duplicating shortcut around the decoder's project_in (1.5: off)
    decoder_conv_act_fn: str = (
        "relu"  # activation between the decoder's head norm and its output conv (Lite, 1.5: silu)
    )
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
        for t in (*self.decoder_act_fns, self.decoder_conv_act_fn):
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

    @property
    def adaptive_latent(self) -> bool:
        """Whether a prefix of the latent channels decodes on its own: no shortcut spreads a channel over others
        (DC-AE 1.5's structured latent space)."""
        return not (self.residual and (self.encoder_out_shortcut or self.decoder_in_shortcut))

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

        for key in ("encoder_out_shortcut", "decoder_in_shortcut"):
            if not isinstance(d.get(key, True), bool):
                raise ValueError(f"{key}={d[key]!r} must be true or false")
        down = "pixel_unshuffle" if d.get("downsample_block_type", "pixel_unshuffle") == "pixel_unshuffle" else "conv"
        up = "interpolate" if d.get("upsample_block_type", "pixel_shuffle") == "interpolate" else "pixel_shuffle"
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
            encoder_out_shortcut=d.get("encoder_out_shortcut", True),
            decoder_in_shortcut=d.get("decoder_in_shortcut", True),
            decoder_conv_act_fn=d.get("decoder_conv_act_fn", "relu"),
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
            encoder_out_shortcut=self.encoder_out_shortcut,
            decoder_in_shortcut=self.decoder_in_shortcut,
            decoder_conv_act_fn=self.decoder_conv_act_fn,
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


def _lite(name: str) -> DCAEConfig:
    """DC-AE-Lite: the sana-1.0 encoder; a ResBlock-only decoder with pixel-shuffle up blocks and a SiLU head."""
    return _sana(name).replace(
        decoder_layers_per_block=(0, 3, 5, 4, 4, 4),
        decoder_block_types=("ResBlock",) * 6,
        decoder_qkv_multiscales=((),) * 6,
        upsample_block_type="pixel_shuffle",
        decoder_conv_act_fn="silu",
    )


def _v15(stages: int, scaling_factor: float | None, name: str) -> DCAEConfig:
    """DC-AE 1.5: ResBlocks everywhere, 128 latent channels, no shortcut around the latent, SiLU head."""
    return DCAEConfig(
        latent_channels=128,
        encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024) + (1024,) * (stages - 6),
        decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024) + (1024,) * (stages - 6),
        encoder_layers_per_block=(0, 5, 10, 4, 4, 4) + (4,) * (stages - 6),
        decoder_layers_per_block=(0, 5, 10, 4, 4, 4) + (4,) * (stages - 6),
        encoder_block_types=("ResBlock",) * stages,
        decoder_block_types=("ResBlock",) * stages,
        encoder_qkv_multiscales=((),) * stages,
        decoder_qkv_multiscales=((),) * stages,
        decoder_norm_types=("rms_norm",) * stages,
        decoder_act_fns=("silu",) * stages,
        encoder_out_shortcut=False,
        decoder_in_shortcut=False,
        decoder_conv_act_fn="silu",
        scaling_factor=scaling_factor,
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
    # The in-1.0 architecture trained at 256 px; its latent scaling factor is not published.
    "dc-ae-f32c32-in-1.0-256px": _in_mix(32, 6, None, "dc-ae-f32c32-in-1.0-256px"),
    # Lite's scaling factor is sana-1.0's: same encoder, usable with diffusion models trained on sana-1.0 latents.
    "dc-ae-lite-f32c32-sana-1.1": _lite("dc-ae-lite-f32c32-sana-1.1"),
    # f32c128-1.5: no published scaling factor; f64c128-1.5: 0.5935, the factor its USiT models use.
    "dc-ae-f32c128-1.5": _v15(6, None, "dc-ae-f32c128-1.5"),
    "dc-ae-f64c128-1.5": _v15(7, 0.5935, "dc-ae-f64c128-1.5"),
}
# Other names of released models (Hugging Face repos use all of them).
ALIASES: dict[str, str] = {
    "dc-ae-lite-f32c32": "dc-ae-lite-f32c32-sana-1.1",
    "dc-ae-turbo-f32c32-sana-1.1": "dc-ae-lite-f32c32-sana-1.1",
}
# Where each released model's weights live on the Hugging Face hub (`DCAE.from_pretrained` takes these ids).
REPO_IDS: dict[str, str] = {
    **{
        f"dc-ae-{arch}-{data}-{version}": f"mit-han-lab/dc-ae-{arch}-{data}-{version}-diffusers"
        for arch, data, version in [(a, d, "1.0") for a in ("f32c32", "f64c128", "f128c512") for d in ("in", "mix")]
        + [("f32c32", "sana", "1.0"), ("f32c32", "sana", "1.1")]
    },
    "dc-ae-f32c32-in-1.0-256px": "mit-han-lab/dc-ae-f32c32-in-1.0-256px",
    "dc-ae-lite-f32c32-sana-1.1": "dc-ai/dc-ae-lite-f32c32-diffusers",
    "dc-ae-f32c128-1.5": "dc-ai/dc-ae-f32c128-1.5",
    "dc-ae-f64c128-1.5": "dc-ai/dc-ae-f64c128-1.5",
}


def canonical_name(name: str) -> str | None:
    """The registry name of a released model from a name, alias, repo id or path ending in one; else None."""
    key = str(name).rstrip("/").split("/")[-1].removesuffix("-diffusers")
    key = ALIASES.get(key, key)
    return key if key in VARIANTS else None


def get_config(name: str) -> DCAEConfig:
    """The config of a released model, by name (a `-diffusers` suffix or `mit-han-lab/` prefix is ok)."""
    key = canonical_name(name)
    if key is None:
        raise KeyError(f"unknown DC-AE variant {name!r}; valid names: {sorted(VARIANTS)} (aliases: {sorted(ALIASES)})")
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
    remat: str = "none"  # a compute.REMAT_POLICIES name, per block

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
                    remat=self.remat,
                    **kw,
                )
                x = block(x, train)
            if i < n - 1 and depths[i] > 0:
                x = layers.DownBlock(widths[i + 1], pixel_unshuffle, cfg.residual, name=f"stage_{i}_down", **kw)(x)
        z = layers.Conv2d(cfg.latent_channels, 3, name="project_out", **kw)(x)
        if cfg.residual and cfg.encoder_out_shortcut:
            z = z + layers.channel_average(x, cfg.latent_channels).astype(z.dtype)
        return z


class Decoder(nn.Module):
    """Latent (B, h, w, latent_channels) -> image (B, h*f, w*f, 3), not clamped."""

    config: DCAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"  # a compute.REMAT_POLICIES name, per block

    @nn.compact
    def __call__(self, z: Array, train: bool = False) -> Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        widths, depths = cfg.decoder_block_out_channels, cfg.decoder_layers_per_block
        n = cfg.num_stages
        interpolate = cfg.upsample_block_type == "interpolate"
        if z.shape[-1] < cfg.latent_channels:  # a channel prefix (DC-AE 1.5): the rest are zeros
            if not cfg.adaptive_latent:
                raise ValueError(
                    f"latent has {z.shape[-1]} of {cfg.latent_channels} channels; only a model without the "
                    "shortcuts around its latent (decoder_in_shortcut=False, as DC-AE 1.5) decodes a channel prefix"
                )
            z = jnp.pad(z, [(0, 0)] * (z.ndim - 1) + [(0, cfg.latent_channels - z.shape[-1])])
        x = layers.Conv2d(widths[-1], 3, name="project_in", **kw)(z)
        if cfg.residual and cfg.decoder_in_shortcut:
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
                    remat=self.remat,
                    **kw,
                )
                x = block(x, train)
        x = layers.RMSNorm(param_dtype=self.param_dtype, name="head_norm")(x)
        x = layers.get_activation(cfg.decoder_conv_act_fn)(x)
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
    remat: str = "none"  # a compute.REMAT_POLICIES name, per block

    def setup(self):
        self.encoder = Encoder(self.config, self.dtype, self.param_dtype, self.remat)
        self.decoder = Decoder(self.config, self.dtype, self.param_dtype, self.remat)

    def encode(self, x: Array, train: bool = False, latent_channels: int | None = None) -> Array:
        """`latent_channels=c`: the first c channels only (a DC-AE 1.5 model's structured latent)."""
        z = self.encoder(x, train)
        if latent_channels is not None and latent_channels != z.shape[-1]:
            check_latent_channels(self.config, latent_channels)
            z = z[..., :latent_channels]
        return z

    def decode(self, z: Array, train: bool = False) -> Array:
        return self.decoder(z, train)

    def __call__(self, x: Array, train: bool = False, keep_channels: Array | None = None) -> tuple[Array, Array]:
        """(reconstruction, latent). `keep_channels=c` (may be traced) decodes only the first c latent channels, the
        rest zeroed: DC-AE 1.5's training of a structured latent (the latent returned is whole)."""
        z = self.encode(x, train)
        if keep_channels is None:
            return self.decode(z, train), z
        keep = jnp.arange(z.shape[-1]) < keep_channels
        return self.decode(jnp.where(keep, z, jnp.zeros_like(z)), train), z


def check_latent_channels(config: DCAEConfig, c: int) -> None:
    """Raises unless `c` channels of `config`'s latent can be encoded / decoded on their own."""
    if not 1 <= c <= config.latent_channels:
        raise ValueError(f"latent_channels={c} must be in 1..{config.latent_channels}")
    if c < config.latent_channels and not config.adaptive_latent:
        raise ValueError(
            f"latent_channels={c}: {config.name} has shortcuts around its latent (each latent channel feeds every "
            "decoder channel), so a channel prefix does not decode; only DC-AE 1.5-style models "
            "(encoder_out_shortcut=decoder_in_shortcut=False) have a structured latent"
        )


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
