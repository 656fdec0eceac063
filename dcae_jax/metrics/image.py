"""PSNR and SSIM per image, jitted and batched, computed like the DC-AE reference evaluator.

The reference (efficientvit `aecore/evaluator.py`) quantizes both images to uint8 first,
`(255 * (x + 1) / 2 + 0.5).clamp(0, 255).to(uint8)` (round half up), then computes PSNR on [0, 255]
per image (`apps/metrics/psnr`), and SSIM with torchmetrics' `StructuralSimilarityIndexMeasure(data_range=(0,
255))`: 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, reflect padding, the SSIM map averaged over
the whole image. `style="skimage"` gives `skimage.metrics.structural_similarity(gaussian_weights=True,
sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=-1)` instead (valid region only).

Every function takes NHWC batches (an HWC image is treated as a batch of one) that are either float
images in [-1, 1] (quantized to uint8 as above) or already uint8, and returns one value per image.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # skimage's choice: radius int(3.5 * 1.5 + 0.5) = 5, an 11-tap window
SSIM_K1 = 0.01
SSIM_K2 = 0.03
DATA_RANGE = 255.0


def _gaussian_taps(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> np.ndarray:
    """The 1-D kernel of `scipy.ndimage.gaussian_filter` (normalized, radius int(truncate*sigma + 0.5))."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


SSIM_WINDOW = int(_gaussian_taps().size)  # 11


@jax.jit
def quantize_uint8(x: Array) -> Array:
    """[-1, 1] floats -> uint8 like the reference: clip(floor(255 * (x + 1) / 2 + 0.5), 0, 255)."""
    x = jnp.asarray(x).astype(jnp.float32)
    return jnp.clip(jnp.floor(255.0 * ((x + 1.0) / 2.0) + 0.5), 0.0, 255.0).astype(jnp.uint8)


def _as_uint8_batch(x) -> Array:
    x = jnp.asarray(x)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected NHWC (or HWC) images, got shape {tuple(x.shape)}")
    return x if x.dtype == jnp.uint8 else quantize_uint8(x)


def _check_pair(a: Array, b: Array) -> None:
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")


def _psnr_u8(a: Array, b: Array) -> Array:
    d = a.astype(jnp.int32) - b.astype(jnp.int32)
    # Exact integer sums per row (< 2**31 for rows up to ~11k pixels x 3 channels), then float32.
    row = jnp.sum(d * d, axis=(2, 3)).astype(jnp.float32)  # (B, H)
    mse = jnp.sum(row, axis=1) / (a.shape[1] * a.shape[2] * a.shape[3])
    return 10.0 * jnp.log10(DATA_RANGE**2 / mse)  # inf where the images are equal, as in the reference


def _filter_valid(x: Array, taps: tuple[float, ...]) -> Array:
    """Separable Gaussian filter over H and W of (N, H, W, C), keeping only the valid region.

    Shifted-slice sums instead of a convolution: exact float32 arithmetic on every backend (no TF32).
    """
    k = len(taps)
    h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
    y = sum(t * x[:, i : i + h] for i, t in enumerate(taps))
    return sum(t * y[:, :, j : j + w] for j, t in enumerate(taps))


def _ssim_u8(a: Array, b: Array, style: str = "torchmetrics") -> Array:
    if min(a.shape[1], a.shape[2]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {a.shape[1:3]}")
    taps = tuple(float(t) for t in _gaussian_taps())
    # Centering leaves (co)variances unchanged and lowers float32 cancellation in E[x^2] - E[x]^2.
    x = a.astype(jnp.float32) - 127.5
    y = b.astype(jnp.float32) - 127.5
    stacked = jnp.concatenate([x, y, x * x, y * y, x * y], axis=-1)  # one filtering pass for all five maps
    if style == "torchmetrics":  # reflect-pad so the SSIM map covers the whole image, border included
        r = SSIM_WINDOW // 2
        stacked = jnp.pad(stacked, ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")
    mx, my, mxx, myy, mxy = jnp.split(_filter_valid(stacked, taps), 5, axis=-1)
    vx, vy, vxy = mxx - mx * mx, myy - my * my, mxy - mx * my
    if style == "torchmetrics":
        vx, vy = jnp.maximum(vx, 0.0), jnp.maximum(vy, 0.0)
    ux, uy = mx + 127.5, my + 127.5
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return jnp.mean(s, axis=(1, 2, 3))  # map mean per channel, then over channels (equal sizes)


SSIM_STYLES = ("torchmetrics", "skimage")


def _check_style(style: str) -> str:
    if style not in SSIM_STYLES:
        raise ValueError(f"unknown SSIM style {style!r}; valid: {list(SSIM_STYLES)}")
    return style


_psnr_jit = jax.jit(_psnr_u8)
_ssim_jit = jax.jit(_ssim_u8, static_argnames="style")


@functools.partial(jax.jit, static_argnames="style")
def _both_jit(a: Array, b: Array, style: str) -> tuple[Array, Array]:
    return _psnr_u8(a, b), _ssim_u8(a, b, style)


def psnr(ref, pred) -> Array:
    """Per-image PSNR in dB on uint8-quantized images, data range 255: (B, H, W, C) x2 -> (B,)."""
    a, b = _as_uint8_batch(ref), _as_uint8_batch(pred)
    _check_pair(a, b)
    return _psnr_jit(a, b)


def ssim(ref, pred, style: str = "torchmetrics") -> Array:
    """Per-image SSIM, 11x11 Gaussian window (sigma 1.5), on uint8-quantized images: (B, H, W, C) x2 -> (B,).

    style="torchmetrics" (default): the DC-AE reference evaluator's `StructuralSimilarityIndexMeasure`
    (reflect padding, mean over the whole map, variances clamped at 0). style="skimage":
    `skimage.metrics.structural_similarity(gaussian_weights=True, use_sample_covariance=False)`,
    mean over the valid region only. They differ by ~0.0025 at 256x256 (the border's share).
    """
    a, b = _as_uint8_batch(ref), _as_uint8_batch(pred)
    _check_pair(a, b)
    return _ssim_jit(a, b, style=_check_style(style))


def psnr_ssim(ref, pred, ssim_style: str = "torchmetrics") -> tuple[Array, Array]:
    """(psnr, ssim), each of shape (B,), in one jitted call."""
    a, b = _as_uint8_batch(ref), _as_uint8_batch(pred)
    _check_pair(a, b)
    return _both_jit(a, b, _check_style(ssim_style))


def format_metric(v: float | None, digits: int) -> str:
    """A metric for a markdown table: `digits` decimals, "inf" (PSNR of identical images), "n/a" when absent."""
    if v is None:
        return "n/a"
    return "inf" if math.isinf(v) else f"{v:.{digits}f}"


def json_metric(v: float | None) -> float | None:
    """A metric for JSON, which has no inf or NaN: those (and absent ones) become null."""
    return None if v is None or not math.isfinite(v) else float(v)


__all__ = ["format_metric", "json_metric", "psnr", "psnr_ssim", "quantize_uint8", "ssim"]
