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
import json
import math
import pathlib
import sys
from typing import Any

import numpy as np
from tqdm import tqdm

from dcae_jax import cli
from dcae_jax.data.images import ImageReadError, list_images, load_image, save_image, to_uint8
from dcae_jax.metrics.image import SSIM_WINDOW, psnr, psnr_ssim


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


def _output_names(paths: list[pathlib.Path], root: pathlib.Path) -> list[pathlib.Path]:
    """Relative output paths (.png) that keep the folder structure and never collide."""
    rels = [p.relative_to(root) if root.is_dir() else pathlib.Path(p.name) for p in paths]
    stems = [r.with_suffix("") for r in rels]
    dup = {s for s in stems if stems.count(s) > 1}
    return [
        (s.with_name(f"{s.name}_{r.suffix.lstrip('.').lower()}") if s in dup else s).with_suffix(".png")
        for r, s in zip(rels, stems, strict=True)
    ]


def _fmt(v: float | None, digits: int) -> str:
    if v is None:
        return "n/a"
    return "inf" if math.isinf(v) else f"{v:.{digits}f}"


def _json_num(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else v


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def results_markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# Reconstruction: {results['model']}",
        "",
        (
            f"resolution: {results['resolution'] or 'full size'}, dtype: {results['dtype']}, "
            f"{len(results['images'])} images, {len(results['failed'])} failed"
        ),
        "",
        "| image | size | PSNR (dB) | SSIM |",
        "|---|---|---:|---:|",
    ]
    for r in results["images"]:
        lines.append(f"| {r['name']} | {r['width']}x{r['height']} | {_fmt(r['psnr'], 2)} | {_fmt(r['ssim'], 4)} |")
    m = results["mean"]
    lines.append(f"| **mean** | | **{_fmt(m['psnr'], 2)}** | **{_fmt(m['ssim'], 4)}** |")
    if results["failed"]:
        lines += ["", "Failed:", ""] + [f"- {f['name']}: {f['error']}" for f in results["failed"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import jax.numpy as jnp

    from dcae_jax.pretrained import DCAE

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

    ae = DCAE.from_pretrained(args.model, dtype=getattr(jnp, args.dtype))
    names = _output_names(paths, inp)
    images: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    for path, rel in zip(tqdm(paths, desc="reconstruct", unit="img", file=sys.stderr), names, strict=True):
        name = path.relative_to(inp).as_posix() if inp.is_dir() else path.name
        try:
            x = load_image(path, resolution=args.resolution)
        except ImageReadError as err:
            tqdm.write(f"skipped {name}: {err.reason}", file=sys.stderr)
            failed.append({"name": name, "error": err.reason})
            continue
        rec = np.asarray(ae.reconstruct(x[None]).astype(jnp.float32))[0]
        if not np.isfinite(rec).all():  # NaN would quantize to black and be scored; a broken model is an error
            raise ValueError(
                f"{args.model}: non-finite (NaN/inf) reconstruction of {name}; nothing scored (a diverged or corrupt model?)"
            )
        orig_u8, rec_u8 = to_uint8(x), to_uint8(rec)
        if min(x.shape[:2]) >= SSIM_WINDOW:
            p, s = (float(v[0]) for v in psnr_ssim(orig_u8[None], rec_u8[None]))
        else:  # SSIM's 11x11 window does not fit
            p, s = float(psnr(orig_u8[None], rec_u8[None])[0]), None
        rec_path = save_image(rec_u8, out / "reconstructions" / rel)
        cmp_path = save_image(np.concatenate([orig_u8, rec_u8], axis=1), out / "comparisons" / rel)
        images.append(
            {
                "name": name,
                "width": int(x.shape[1]),
                "height": int(x.shape[0]),
                "psnr": p,
                "ssim": s,
                "reconstruction": str(rec_path.relative_to(out)),
                "comparison": str(cmp_path.relative_to(out)),
            }
        )

    results = {
        "model": str(args.model),
        "resolution": args.resolution,
        "dtype": args.dtype,
        "images": images,
        "mean": {"psnr": _mean([r["psnr"] for r in images]), "ssim": _mean([r["ssim"] for r in images])},
        "failed": failed,
    }
    out.mkdir(parents=True, exist_ok=True)
    md = results_markdown(results)
    (out / "results.md").write_text(md)
    as_json = {
        **results,
        "images": [{**r, "psnr": _json_num(r["psnr"]), "ssim": _json_num(r["ssim"])} for r in images],
        "mean": {k: _json_num(v) for k, v in results["mean"].items()},
    }
    (out / "results.json").write_text(json.dumps(as_json, indent=2) + "\n")
    print(md)
    if failed:
        print(f"{len(failed)} of {len(paths)} images could not be read: {[f['name'] for f in failed]}", file=sys.stderr)
    return 0 if images else 1


if __name__ == "__main__":
    cli.run_argparse("reconstruct", main)
