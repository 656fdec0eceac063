"""Image-quality metrics computed like the DC-AE reference evaluator (efficientvit `aecore/evaluator.py`)."""

from dcae_jax.metrics.image import psnr, psnr_ssim, quantize_uint8, ssim

__all__ = ["psnr", "psnr_ssim", "quantize_uint8", "ssim"]
