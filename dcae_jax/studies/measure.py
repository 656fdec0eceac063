"""Held-out reconstruction metrics for the study: PSNR/SSIM, a high-frequency spectral error, LPIPS/rFID.

PSNR and SSIM come from `dcae_jax.metrics.image` (the reference evaluator's conventions). They reward
blur, so phase 3 (GAN refinement) needs a weight-free measure of lost detail as well: the spectral
error compares the radially averaged power spectra of reconstruction and original in the upper half
of the frequency band. LPIPS and rFID need converted weights files and are computed only when given.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dcae_jax import input_pipeline
from dcae_jax.metrics import image as image_metrics
from dcae_jax.models.dcae import DCAEConfig, DCAEModel
from dcae_jax.pretrained import DCAE

# Radial frequencies (fraction of Nyquist) that count as "high": the upper half of the band.
HF_BAND = (0.5, 1.0)


@functools.lru_cache(maxsize=8)
def eval_images(data: str, resolution: int, limit: int = 0) -> np.ndarray:
    """The held-out split (`val/` or `validation/` of `data`), ADM center-cropped: (N, R, R, 3) in [-1, 1]."""
    source = input_pipeline.make_source(f"folder:{data}", "val")
    images = []
    for batch in input_pipeline.make_eval_loader(source, resolution=resolution, batch_size=16):
        images.extend(np.asarray(batch["image"])[np.asarray(batch["mask"]) > 0])
    out = np.stack(images)
    return out[:limit] if limit else out


@functools.lru_cache(maxsize=32)
def _apply_fn(cfg: DCAEConfig, method: str):
    """One jitted function per architecture: models of one config (seeds, phases, arms) share compilations."""
    model = DCAEModel(cfg)
    if method == "encode":
        return jax.jit(lambda v, x: model.apply(v, x, method=DCAEModel.encode))
    return jax.jit(lambda v, x: model.apply(v, x)[0])


def _run(ae: DCAE, method: str, images: np.ndarray, batch_size: int) -> np.ndarray:
    f = ae.config.spatial_compression_ratio
    if images.shape[1] % f or images.shape[2] % f:
        raise ValueError(f"image size {images.shape[1:3]} is not a multiple of the compression factor {f}")
    fn = _apply_fn(ae.config, method)
    return np.concatenate([np.asarray(fn(ae.variables, chunk)) for chunk in _batches(images, batch_size)])[
        : len(images)
    ]


def reconstruct(ae: DCAE, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """decode(encode(x)) in fixed-shape batches (one compilation per architecture and resolution)."""
    return _run(ae, "reconstruct", images, batch_size)


def encode(ae: DCAE, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    return _run(ae, "encode", images, batch_size)


def _batches(images: np.ndarray, batch_size: int):
    """Fixed-size chunks; the last one is padded by repeating its final image (cropped off by the caller)."""
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        if len(chunk) < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)])
        yield chunk


@jax.jit
def _radial_log_power(x: jax.Array) -> jax.Array:
    """(B, R, R, 3) in [-1, 1] -> (B, R // 2) log10 power of the luma, averaged over rings of equal frequency."""
    gray = jnp.tensordot(
        image_metrics.quantize_uint8(x).astype(jnp.float32) / 255.0, jnp.array([0.299, 0.587, 0.114]), 1
    )
    gray = gray - gray.mean(axis=(1, 2), keepdims=True)
    n = gray.shape[1]
    power = jnp.abs(jnp.fft.fft2(gray)) ** 2
    f = jnp.fft.fftfreq(n)
    radius = jnp.sqrt(f[:, None] ** 2 + f[None, :] ** 2) / 0.5  # 1.0 = Nyquist
    ring = jnp.clip(jnp.floor(radius * (n // 2)).astype(jnp.int32), 0, n // 2 - 1)
    onehot = jax.nn.one_hot(ring.ravel(), n // 2)  # (R*R, R//2)
    ring_power = power.reshape(power.shape[0], -1) @ onehot / onehot.sum(0)
    return jnp.log10(ring_power + 1e-10)


def spectral_error(ref: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image: (mean |10 log10 P_pred / P_ref|, mean 10 log10 P_pred / P_ref) in dB over the HF band.

    The signed value is negative when the reconstruction lacks high-frequency energy (blur).
    """
    lr, lp = np.asarray(_radial_log_power(jnp.asarray(ref))), np.asarray(_radial_log_power(jnp.asarray(pred)))
    freqs = (np.arange(lr.shape[1]) + 0.5) / lr.shape[1]
    band = (freqs >= HF_BAND[0]) & (freqs <= HF_BAND[1])
    diff_db = 10.0 * (lp - lr)[:, band]
    return np.abs(diff_db).mean(axis=1), diff_db.mean(axis=1)


@dataclasses.dataclass
class Perceptual:
    """Optional weight-based metrics; absent weights leave them out of the results (never faked)."""

    lpips_weights: str = ""
    fid_weights: str = ""

    @functools.cached_property
    def _lpips(self):
        from dcae_jax.metrics import lpips as lpips_lib

        module, variables = lpips_lib.load_lpips(self.lpips_weights)
        return jax.jit(lambda a, b: module.apply(variables, a, b))

    @functools.cached_property
    def _fid(self):
        from dcae_jax.metrics import fid as fid_lib

        module, variables = fid_lib.load_fid_inception(self.fid_weights)
        return jax.jit(lambda x: module.apply(variables, x))

    def lpips(self, ref: np.ndarray, pred: np.ndarray) -> np.ndarray:
        return np.concatenate([np.asarray(self._lpips(a, b)) for a, b in zip(_batches(ref, 16), _batches(pred, 16))])[
            : len(ref)
        ]

    def rfid(self, ref: np.ndarray, pred: np.ndarray) -> float:
        from dcae_jax.metrics import fid as fid_lib

        stats = []
        for images in (ref, pred):
            s = fid_lib.FeatureStats()
            for chunk in _batches(images, 16):
                s.update(np.asarray(self._fid(chunk)))
            stats.append(s)
        # The padded tail repeats one image: negligible for a summary, exact when N is a multiple of 16.
        return fid_lib.frechet_distance(*stats[0].mu_sigma(), *stats[1].mu_sigma())


def evaluate(ae: DCAE, images: np.ndarray, perceptual: Perceptual | None = None) -> dict[str, Any]:
    """Mean metrics plus the per-image PSNR (kept for paired comparisons between models)."""
    recon = reconstruct(ae, images)
    psnr, ssim = (np.asarray(v) for v in image_metrics.psnr_ssim(images, recon))
    hf_abs, hf_signed = spectral_error(images, recon)
    out: dict[str, Any] = {
        "psnr": float(psnr.mean()),
        "ssim": float(ssim.mean()),
        "hf_error_db": float(hf_abs.mean()),
        "hf_bias_db": float(hf_signed.mean()),
        "num_images": len(images),
        "resolution": int(images.shape[1]),
        "psnr_per_image": [round(float(v), 4) for v in psnr],
    }
    if perceptual is not None and perceptual.lpips_weights:
        out["lpips"] = float(perceptual.lpips(images, recon).mean())
    if perceptual is not None and perceptual.fid_weights:
        out["rfid"] = perceptual.rfid(images, recon)
    return out


def load(export: str | pathlib.Path) -> DCAE:
    return DCAE.from_pretrained(export)
