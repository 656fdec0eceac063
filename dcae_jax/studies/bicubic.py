"""The equal-size bicubic baseline for an autoencoder: bicubic down to as many values as the latent holds, and back.

    python -m dcae_jax.studies.bicubic --data bundled --split validation --resolution 128 --factor 16 --channels 16

A latent of f x f spatial compression and c channels holds (R / f)^2 * c values per R x R image; an RGB image of side
s holds 3 s^2, so the baseline's side is s = floor(R / f * sqrt(c / 3)) (never more values than the latent). Images
are ADM-center-cropped like the evaluation, resized with PIL's bicubic filter down to s x s and back up to R x R,
and scored with the evaluation's PSNR / SSIM (uint8) and, where the genuine weights are available, LPIPS (AlexNet).
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
from PIL import Image

from dcae_jax import cli
from dcae_jax.data.images import center_crop_adm, pil_to_array
from dcae_jax.metrics import image as image_metrics


def baseline_side(resolution: int, factor: int, channels: int) -> int:
    """The largest RGB side whose 3 s^2 values do not exceed the latent's (R / f)^2 c."""
    return math.isqrt((resolution // factor) ** 2 * channels // 3)  # exact: 3 s^2 <= (R / f)^2 c


def bicubic_roundtrip(images: list[Image.Image], resolution: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(originals, round trips), both (N, R, R, 3) float in [-1, 1]."""
    xs, ys = [], []
    for img in images:
        x = center_crop_adm(img, resolution)
        y = x.resize((side, side), Image.BICUBIC).resize((resolution, resolution), Image.BICUBIC)
        xs.append(pil_to_array(x))
        ys.append(pil_to_array(y))
    return np.stack(xs), np.stack(ys)


def run(data: str, split: str, resolution: int, factor: int, channels: int, lpips: bool = True) -> dict:
    from dcae_jax import input_pipeline
    from dcae_jax.data.images import open_image

    source = input_pipeline.make_source(data, split)
    images = [open_image(source[i]) for i in range(len(source))]
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dcae_jax.studies.bicubic", description=__doc__.split("\n")[0])
    p.add_argument("--data", default="bundled", help="bundled | folder:DIR | DIR | tfds:NAME[@DATA_DIR]")
    p.add_argument("--split", default="validation")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--factor", type=int, default=16, help="the autoencoder's spatial compression f")
    p.add_argument("--channels", type=int, default=16, help="the autoencoder's latent channels c")
    p.add_argument("--no_lpips", action="store_true", help="skip LPIPS (no weights needed)")
    a = p.parse_args(cli.snake_case_flags(argv, "bicubic"))
    r = run(a.data, a.split, a.resolution, a.factor, a.channels, lpips=not a.no_lpips)
    print(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    cli.run_argparse("bicubic", main)
