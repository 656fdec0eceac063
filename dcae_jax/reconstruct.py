"""Reconstruct images with a DC-AE and report PSNR / SSIM per image.

    python -m dcae_jax.reconstruct --model mit-han-lab/dc-ae-f32c32-in-1.0-diffusers \\
        --input photos/ --output recon/ [--resolution 512] [--dtype bfloat16]

For every image under --input (a file, or a folder searched recursively) this writes
`OUTPUT/reconstructions/<name>.png` and `OUTPUT/comparisons/<name>.png` (original | reconstruction), then
`OUTPUT/results.md` and `OUTPUT/results.json` with per-image and mean PSNR / SSIM (computed on uint8-quantized
images like the DC-AE reference evaluator, see `dcae_jax.metrics.image`). With --resolution the images are
ADM-center-cropped to R x R (the DC-AE evaluation protocol); without it they are reconstructed at full size.
Files that cannot be read are reported on stderr and under "failed" in the JSON; the rest go on.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from dcae_jax import cli
from dcae_jax.data.images import list_images


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dcae_jax.reconstruct",
        description="Reconstruct images with a DC-AE and report PSNR / SSIM.",
    )
    p.add_argument("--model", required=True, help="Hugging Face repo id or local checkpoint (any supported format)")
    p.add_argument("--input", required=True, help="an image file or a folder (searched recursively)")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="ADM-center-crop every image to R x R first (default: full size, padded/cropped by the model)",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(cli.snake_case_flags(argv, "reconstruct"))
    from dcae_jax import inference

    inp = pathlib.Path(args.input).expanduser()
    out = pathlib.Path(args.output).expanduser()
    if args.resolution is not None and args.resolution <= 0:
        print(f"error: --resolution must be positive, got {args.resolution}", file=sys.stderr)
        return 2
    try:
        paths = list_images(inp)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not paths:
        print(f"error: no images found under {inp}", file=sys.stderr)
        return 2

    results, md = inference.reconstruct_files(args.model, inp, out, paths, args.resolution, args.dtype)
    images, failed = results["images"], results["failed"]
    print(md)
    if failed:
        print(f"{len(failed)} of {len(paths)} images could not be read: {[f['name'] for f in failed]}", file=sys.stderr)
    return 0 if images else 1


if __name__ == "__main__":
    cli.run_argparse("reconstruct", main)
