"""Held-out reconstruction metrics for the study: PSNR/SSIM, a high-frequency spectral error, LPIPS/rFID.

PSNR and SSIM come from `dcae_jax.metrics.image` (the reference evaluator's conventions). They reward
blur, so phase 3 (GAN refinement) needs a weight-free measure of lost detail as well: the spectral
error compares the radially averaged power spectra of reconstruction and original in the upper half
of the frequency band. LPIPS and rFID use the genuine networks (`dcae_jax.metrics.weights`).

rFID on a few hundred images is biased upward (2048-dimensional features, far fewer samples), so the study
computes it on several crops per held-out photo (`rfid_views`), identical for every model, and compares models
on those same views; `rfid_floor` gives the level two disjoint halves of the real views reach against each other.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from dcae_jax.autoencoder.model import DCAEConfig, DCAEModel
from dcae_jax.autoencoder.pretrained import DCAE
from dcae_jax.data import images as image_io
from dcae_jax.data import pipeline as input_pipeline
from dcae_jax.metrics import image as image_metrics

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


def adm_views(pil_img, size: int, count: int, zoom: float = 1.5) -> list[np.ndarray]:
    """`count` size x size crops of one photo, in [-1, 1]: resized ADM-style (BOX halvings, then BICUBIC) so the short
    side is round(size * zoom), crops evenly spaced along the long side, centered on the short side.

    `count=1, zoom=1` is exactly `center_crop_adm`.
    """
    from PIL import Image

    short = max(size, round(size * zoom))
    while min(*pil_img.size) >= 2 * short:
        pil_img = pil_img.resize(tuple(x // 2 for x in pil_img.size), resample=Image.BOX)
    scale = short / min(*pil_img.size)
    pil_img = pil_img.resize(tuple(round(x * scale) for x in pil_img.size), resample=Image.BICUBIC)
    w, h = pil_img.size
    out = []
    for i in range(count):
        if count == 1:
            left, top = (w - size) // 2, (h - size) // 2
        else:
            along = round((max(w, h) - size) * i / (count - 1))
            left, top = (along, (h - size) // 2) if w >= h else ((w - size) // 2, along)
        out.append(image_io.pil_to_array(pil_img.crop((left, top, left + size, top + size))))
    return out


@functools.lru_cache(maxsize=8)
def rfid_views(data: str, resolution: int, count: int, zoom: float = 1.5, limit: int = 0) -> np.ndarray:
    """(N * count, R, R, 3) in [-1, 1]: `adm_views` of the first `limit` (0: all) held-out photos, photo-major."""
    source = input_pipeline.make_source(f"folder:{data}", "val")
    views = []
    for path in source.paths[: limit or None]:
        try:
            img = image_io.open_image(path)
        except image_io.ImageReadError as e:
            input_pipeline.warn_skipped_once(str(path), f"skipped {path}: {e}")
            continue
        views.extend(adm_views(img, resolution, count, zoom))
    return np.stack(views)


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


@functools.lru_cache(maxsize=4)
def _lpips_fn(module):
    return jax.jit(module.apply)


@jax.jit
def _resize_299(x: jax.Array) -> jax.Array:
    from dcae_jax.metrics import fid as fid_lib

    return fid_lib.resize_bilinear(fid_lib.to_model_range(x), (fid_lib.INPUT_SIZE,) * 2)


@jax.jit
def _inception_299(variables, x: jax.Array) -> jax.Array:
    """Inception on 299x299 inputs only: one compilation for every evaluation resolution and weights file."""
    from dcae_jax.metrics import fid as fid_lib

    return fid_lib.FIDInception(resize_input=False).apply(variables, x)


@dataclasses.dataclass
class Perceptual:
    """LPIPS and rFID from weights files (the study passes the genuine ones); an empty path leaves that metric out
    of the results (never faked)."""

    lpips_weights: str = ""
    fid_weights: str = ""

    @functools.cached_property
    def _lpips(self):
        from dcae_jax.metrics import lpips as lpips_lib

        module, variables = lpips_lib.load_lpips(self.lpips_weights)
        return functools.partial(_lpips_fn(module), variables)

    @functools.cached_property
    def _fid(self):
        from dcae_jax.metrics import fid as fid_lib

        _, variables = fid_lib.load_fid_inception(self.fid_weights)
        return lambda x: _inception_299(variables, _resize_299(x))

    def lpips(self, ref: np.ndarray, pred: np.ndarray) -> np.ndarray:
        return np.concatenate([np.asarray(self._lpips(a, b)) for a, b in zip(_batches(ref, 16), _batches(pred, 16))])[
            : len(ref)
        ]

    def features(self, images: np.ndarray) -> Reference:
        """Exact Inception pool3 statistics of `images` (the padded tail of the last batch is masked out)."""
        from dcae_jax.metrics import fid as fid_lib

        stats = fid_lib.FeatureStats()
        for i, chunk in enumerate(_batches(images, 16)):
            stats.update(np.asarray(self._fid(chunk)), np.arange(16) < len(images) - 16 * i)
        return Reference(stats)

    def rfid(self, ref: np.ndarray, pred: np.ndarray, reference: Reference | None = None) -> float:
        """FID between `ref` and `pred` (`reference`: `features(ref)`, reused between models)."""
        from dcae_jax.metrics import fid as fid_lib

        a = reference if reference is not None else self.features(ref)
        mu, sigma = self.features(pred).stats.mu_sigma()
        return fid_lib.frechet_distance_eig(a.mu, a.sigma, mu, sigma, sqrt_sigma1=a.sqrt_sigma)

    def rfid_floor(self, views: np.ndarray, per_photo: int) -> float:
        """FID between the real views of the first and the second half of the photos: what sampling alone gives."""
        half = len(views) // per_photo // 2 * per_photo
        if half < 2:
            return float("nan")  # a covariance needs two samples per side
        return self.rfid(views[:half], views[half : 2 * half])


class Reference:
    """Inception statistics of one real image set, with the square root of its covariance computed once."""

    def __init__(self, stats):
        self.stats = stats
        self.mu, self.sigma = stats.mu_sigma()

    @functools.cached_property
    def sqrt_sigma(self) -> np.ndarray:
        from dcae_jax.metrics import fid as fid_lib

        return fid_lib.sqrt_psd(self.sigma)


def evaluate(
    ae: DCAE,
    images: np.ndarray,
    perceptual: Perceptual | None = None,
    views: np.ndarray | None = None,
    view_stats: Reference | None = None,
) -> dict[str, Any]:
    """Mean metrics plus the per-image PSNR (kept for paired comparisons between models).

    PSNR, SSIM, the spectral error and LPIPS are on `images`; rFID on `views` (default: `images`), whose
    reference statistics `view_stats` may be passed in so that they are computed once per view set.
    """
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
        views = images if views is None else views
        recon_views = recon if views is images else reconstruct(ae, views)
        out["rfid"] = perceptual.rfid(views, recon_views, view_stats)
        out["rfid_images"] = len(views)
    return out


def load(export: str | pathlib.Path) -> DCAE:
    return DCAE.from_pretrained(export)


def baseline_side(resolution: int, factor: int, channels: int) -> int:
    """The largest RGB side whose 3 s^2 values do not exceed the latent's (R / f)^2 c."""
    return math.isqrt((resolution // factor) ** 2 * channels // 3)  # exact: 3 s^2 <= (R / f)^2 c


def bicubic_roundtrip(images: list[Image.Image], resolution: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(originals, round trips), both (N, R, R, 3) float in [-1, 1]."""
    xs, ys = [], []
    for img in images:
        x = image_io.center_crop_adm(img, resolution)
        y = x.resize((side, side), Image.BICUBIC).resize((resolution, resolution), Image.BICUBIC)
        xs.append(image_io.pil_to_array(x))
        ys.append(image_io.pil_to_array(y))
    return np.stack(xs), np.stack(ys)


def bicubic_baseline(
    data: str, split: str, resolution: int, factor: int, channels: int, lpips: bool = True
) -> dict[str, Any]:
    """The equal-size bicubic baseline of an f x f, c-channel autoencoder on `data`: a latent holds (R / f)^2 c
    values per R x R image, an RGB image of side s holds 3 s^2, so s = floor(R / f * sqrt(c / 3)) (never more
    values than the latent). ADM center crop, PIL bicubic down to s x s and back, the evaluation's PSNR / SSIM
    (uint8) and, with `lpips`, LPIPS (AlexNet, the genuine weights)."""

    source = input_pipeline.make_source(data, split)
    images = [image_io.open_image(source[i]) for i in range(len(source))]
    side = baseline_side(resolution, factor, channels)
    x, y = bicubic_roundtrip(images, resolution, side)
    psnr, ssim = (np.asarray(v, np.float64) for v in image_metrics.psnr_ssim(x, y))
    out = {
        "images": len(images),
        "resolution": resolution,
        "side": side,
        "values": 3 * side * side,
        "latent_values": (resolution // factor) ** 2 * channels,
        "psnr": float(psnr.mean()),
        "ssim": float(ssim.mean()),
    }
    if lpips:
        from dcae_jax.metrics import lpips as lpips_lib
        from dcae_jax.metrics import weights

        net, variables = lpips_lib.load_lpips(weights.resolve("lpips_alex"))
        u8 = [image_metrics.quantize_uint8(v).astype(np.float32) / 127.5 - 1 for v in (x, y)]
        out["lpips"] = float(np.mean(np.asarray(net.apply(variables, u8[1], u8[0]))))
    return out
