"""The released DC-AE diffusion checkpoints (ImageNet 512x512, class-conditional) and their loader.

    from dcae_jax import DCAEDiffusion
    pipe = DCAEDiffusion.from_pretrained("mit-han-lab/dc-ae-f64c128-in-1.0-uvit-h-in-512px-train2000k")
    images = pipe.generate([279, 388, 979, 417], guidance_scale=6.0, seed=0)

A release is a Hugging Face repo (`DCAE_Diffusion_HF` of efficientvit / DC-Gen) holding `config.json`
(`{"model_name": ...}`) and `model.safetensors` with `diffusion_model.*` keys (and, in efficientvit's
layout, the bundled autoencoder under `autoencoder.*`). The model name picks the architecture, the
autoencoder, the latent scaling factor and the evaluation sampler from `RELEASED`; the weights go
through `dcae_jax.diffusion.convert` (every key mapped, shapes checked, no torch for safetensors).
A bundled autoencoder is loaded from the same file; otherwise the named DC-AE is loaded with
`DCAE.from_pretrained` (its diffusers repo id when online, or pass `autoencoder=<local dir>`).
Published FIDs (50k samples, ImageNet-train reference statistics, efficientvit README) are kept here
so that `docs/diffusion.md` and an evaluation can be put side by side.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Release:
    """What the reference registry and README say about one released model."""

    autoencoder: str  # DC-AE variant name (dcae_jax.VARIANTS)
    scaling_factor: float
    model: str  # uvit-s | uvit-h | uvit-2b | uvit-3b | dit-xl
    objective: str  # epsilon (UViT) | velocity (USiT) | dit (DiT GaussianDiffusion)
    guidance_scale: float  # the evaluation scale of the reference commands (1.0: none published, no guidance)
    fid: tuple[float, float] | None  # published FID without / with guidance (None: not in the reference README)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the autoencoder's latents of a 512x512 image."""
        from dcae_jax.autoencoder import model as dcae

        ae = dcae.get_config(self.autoencoder)
        return (512 // ae.spatial_compression_ratio, 512 // ae.spatial_compression_ratio, ae.latent_channels)


# The authors' demo (efficientvit README): these classes, guidance 6.0, seed 0, a 4x4 grid.
DEMO_CLASSES = (279, 333, 979, 936, 933, 145, 497, 1, 248, 360, 793, 12, 387, 437, 938, 978)

_F32, _F64 = ("dc-ae-f32c32-in-1.0", 0.3189), ("dc-ae-f64c128-in-1.0", 0.2889)
_F64_15 = ("dc-ae-f64c128-1.5", 0.5935)
RELEASED: dict[str, Release] = {
    "dc-ae-f32c32-in-1.0-dit-xl-in-512px": Release(*_F32, "dit-xl", "dit", 1.3, (9.56, 2.84)),
    "dc-ae-f32c32-in-1.0-dit-xl-in-512px-trainbs1024": Release(*_F32, "dit-xl", "dit", 1.3, (6.88, 2.41)),
    "dc-ae-f32c32-in-1.0-uvit-s-in-512px": Release(*_F32, "uvit-s", "epsilon", 1.5, (46.12, 18.08)),
    "dc-ae-f32c32-in-1.0-uvit-h-in-512px": Release(*_F32, "uvit-h", "epsilon", 1.5, (9.83, 2.53)),
    "dc-ae-f32c32-in-1.0-uvit-2b-in-512px": Release(*_F32, "uvit-2b", "epsilon", 1.5, (8.13, 2.30)),
    "dc-ae-f32c32-in-1.0-usit-h-in-512px": Release(*_F32, "uvit-h", "velocity", 1.2, (3.80, 1.89)),
    "dc-ae-f32c32-in-1.0-usit-2b-in-512px": Release(*_F32, "uvit-2b", "velocity", 1.15, (2.90, 1.72)),
    "dc-ae-f64c128-in-1.0-uvit-h-in-512px": Release(*_F64, "uvit-h", "epsilon", 1.5, (13.96, 3.01)),
    "dc-ae-f64c128-in-1.0-uvit-h-in-512px-train2000k": Release(*_F64, "uvit-h", "epsilon", 1.5, (12.26, 2.66)),
    "dc-ae-f64c128-in-1.0-uvit-2b-in-512px": Release(*_F64, "uvit-2b", "epsilon", 1.5, (7.78, 2.47)),
    "dc-ae-f64c128-in-1.0-uvit-2b-in-512px-train2000k": Release(*_F64, "uvit-2b", "epsilon", 1.5, (6.50, 2.25)),
    # DC-AE 1.5 (DC-Gen `c2i_model_zoo.py`): USiT with adaptive channels on the structured f64c128 latent, sampled
    # with all 128 channels by the reference (fewer: `generate(..., latent_channels=c)`). DC-Gen publishes no
    # evaluation guidance scale or FID for them: sampling defaults to no guidance (pass guidance_scale=...).
    "dc-ae-f64c128-1.5-usit-2b-in-512px": Release(*_F64_15, "uvit-2b", "velocity", 1.0, None),
    "dc-ae-f64c128-1.5-usit-3b-in-512px": Release(*_F64_15, "uvit-3b", "velocity", 1.0, None),
}


def dcae_repo_id(name: str) -> str:
    """The Hugging Face repo of a released DC-AE (dc-ai/... for DC-AE 1.5, else mit-han-lab/...-diffusers)."""
    from dcae_jax.autoencoder.model import REPO_IDS

    return REPO_IDS.get(name, f"mit-han-lab/{name}-diffusers")


def get_release(name: str) -> Release:
    if name not in RELEASED:
        raise KeyError(f"unknown released DC-AE diffusion model {name!r}; valid names: {sorted(RELEASED)}")
    return RELEASED[name]


def model_config(release: Release, name: str):
    """Our UViT / DiT config of a release (patch 1, latent grid of a 512x512 image); a UViT on a structured
    (DC-AE 1.5) latent has adaptive channels."""
    from dcae_jax.autoencoder import model as dcae

    h, _, c = release.latent_shape
    if release.model.startswith("dit"):
        from dcae_jax.diffusion.dit import get_dit_config

        return dataclasses.replace(get_dit_config(release.model, in_channels=c, input_size=h), name=name)
    from dcae_jax.diffusion.uvit import get_uvit_config

    adaptive = dcae.get_config(release.autoencoder).adaptive_latent
    return get_uvit_config(release.model, in_channels=c, input_size=h, adaptive_channels=adaptive, name=name)


def _model_name(root: pathlib.Path, hint: str) -> str:
    """The release name: config.json's `model_name`, else the folder / repo name."""
    cfg = root / "config.json" if root.is_dir() else root.parent / "config.json"
    if cfg.exists():
        name = json.loads(cfg.read_text()).get("model_name")
        if name:
            return name
    for candidate in (pathlib.PurePath(hint).name, root.name):
        if candidate in RELEASED:
            return candidate
    raise ValueError(
        f"{root}: neither a dcae_jax diffusion export (no diffusion_config.json) nor a released DC-AE diffusion "
        f"checkpoint (no config.json with model_name, and the folder name is none of {sorted(RELEASED)})"
    )


def _bundled_autoencoder(weights: pathlib.Path, release: Release, dtype: Any):
    """The DC-AE stored in the same file under `autoencoder.` (efficientvit's layout), else None."""
    from dcae_jax.autoencoder import model as dcae
    from dcae_jax.autoencoder.pretrained import DCAE
    from dcae_jax.runtime.state_dict import LazySafetensors, PrefixView

    if weights.suffix != ".safetensors":
        return None
    state = LazySafetensors(weights)
    if not any(k.startswith("autoencoder.") for k in state):
        return None
    return DCAE._from_state(
        dcae.get_config(release.autoencoder), PrefixView(state, "autoencoder."), "efficientvit", weights, dtype
    )


def load(path_or_repo_id: str | os.PathLike, *, autoencoder: Any = None, dtype: Any = jnp.float32):
    """A released checkpoint (local folder / file, or a repo id fetched with huggingface_hub) as DCAEDiffusion."""
    from dcae_jax.autoencoder.pretrained import _resolve
    from dcae_jax.diffusion import convert
    from dcae_jax.diffusion.pipeline import DCAEDiffusion

    root = _resolve(path_or_repo_id)
    name = _model_name(root, str(path_or_repo_id))
    release = get_release(name)
    config = model_config(release, name)
    weights = convert._find_weights_file(root) if root.is_dir() else root
    params = convert.load_diffusion_params(weights, config)
    if autoencoder is None:
        autoencoder = _bundled_autoencoder(weights, release, dtype) or dcae_repo_id(release.autoencoder)
    return DCAEDiffusion(
        config,
        params,
        objective=release.objective,
        scaling_factor=release.scaling_factor,
        sampler={"guidance_scale": release.guidance_scale},
        autoencoder=autoencoder,
        dtype=dtype,
    )
