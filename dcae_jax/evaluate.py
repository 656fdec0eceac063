"""Evaluate a DC-AE on a dataset: rFID, PSNR, SSIM, LPIPS and latent statistics, like the DC-AE reference evaluator.

    python -m dcae_jax.evaluate --model mit-han-lab/dc-ae-f32c32-in-1.0-diffusers --data tfds:imagenet2012 \\
        --resolution 256 --output results.json [--ref_stats imagenet_val_256.npz] [--batch_size 64] [--max_images 5000] [--split validation]

Protocol and metrics: `dcae_jax.metrics.evaluation` (the efficientvit evaluator's: ADM center crop, uint8
quantization, LPIPS AlexNet, pytorch-fid Inception; `--ref_stats` from `python -m dcae_jax.fid_stats`, else the
real images of the same pass). Writes the results .json and a .md table row beside it (process 0).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax

from dcae_jax import cli


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dcae_jax.evaluate",
        description="Reconstruct a dataset with a DC-AE; report rFID, PSNR, SSIM, LPIPS and latent statistics.",
    )
    p.add_argument("--model", required=True, help="Hugging Face repo id or local checkpoint (any supported format)")
    p.add_argument("--data", required=True, help="folder:DIR, tfds:NAME[@DATA_DIR] or bundled")
    p.add_argument("--split", default="validation", help="dataset split (default: validation)")
    p.add_argument("--resolution", type=int, required=True, help="ADM center crop to R x R")
    p.add_argument("--output", required=True, help="results .json (a .md with the table row is written beside it)")
    p.add_argument("--batch_size", type=int, default=32, help="global batch size (rounded up to the device count)")
    p.add_argument("--max_images", type=int, default=None, help="only the first N records of the split")
    p.add_argument(
        "--lpips_weights", default=None, help="LPIPS weights .npz (default: the genuine AlexNet file, fetch_weights)"
    )
    p.add_argument("--fid_weights", default=None, help="FID Inception .npz (default: the genuine file, fetch_weights)")
    p.add_argument("--ref_stats", default=None, help="FID reference mu/sigma .npz (default: the real images)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="autoencoder compute dtype")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(cli.snake_case_flags(argv, "evaluate"))
    from dcae_jax import paths
    from dcae_jax.metrics import evaluation

    r = evaluation.evaluate_dataset(
        args.model,
        args.data,
        args.resolution,
        split=args.split,
        batch_size=args.batch_size,
        max_images=args.max_images,
        lpips_weights=args.lpips_weights,
        fid_weights=args.fid_weights,
        ref_stats=args.ref_stats,
        dtype=args.dtype,
    )
    if jax.process_index() == 0:
        out = pathlib.Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        paths.write_text_atomic(out, json.dumps(r, indent=2) + "\n")
        paths.write_text_atomic(out.with_suffix(".md"), r["markdown"] + "\n")
        z = r["latent"]
        print(r["markdown"])
        print(
            f"{r['num_images']} images ({r['num_skipped']} skipped) in {r['seconds']:.1f} s; latent mean "
            + ", ".join(f"{k} {'n/a' if z[k] is None else f'{z[k]:.4f}'}" for k in ("mean", "rms", "std"))
        )
        for note in r["notes"]:
            print(f"note: {note}", file=sys.stderr)
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0 if r["num_images"] else 1


if __name__ == "__main__":
    cli.run_argparse("evaluate", main)
