"""Build FID reference statistics (pool3 mean / covariance) of a dataset's real images.

    python -m dcae_jax.fid_stats --data tfds:imagenet2012 --resolution 256 --out imagenet_val_256.npz \\
        [--fid_weights fid_inception.npz] [--split validation] [--batch_size 64] [--max_images N]

Images go through exactly what `python -m dcae_jax.evaluate` does to the real images (ADM center crop to R x R,
uint8, `FIDInception`), so `--ref_stats` from this file gives the same rFID as computing the reference in the
evaluation pass. The output is pytorch-fid's `--save-stats` format (`mu`, `sigma`, float64): it can be passed to
pytorch-fid, and pytorch-fid's stats files can be passed to `--ref_stats`. Unreadable records are counted and
skipped. Runs jitted on all devices (a 1-D "data" mesh), multi-process safe; process 0 writes the file.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax

from dcae_jax import cli


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dcae_jax.fid_stats", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="folder:DIR, tfds:NAME[@DATA_DIR] or bundled")
    p.add_argument("--split", default="validation", help="dataset split (default: validation)")
    p.add_argument("--resolution", type=int, required=True, help="ADM center crop to R x R")
    p.add_argument("--out", required=True, help="output stats .npz (mu, sigma)")
    p.add_argument("--fid_weights", default=None, help="FID Inception .npz (default: the genuine file, fetch_weights)")
    p.add_argument("--batch_size", type=int, default=64, help="global batch size (rounded up to the device count)")
    p.add_argument("--max_images", type=int, default=None, help="only the first N records of the split")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(cli.snake_case_flags(argv, "fid_stats"))
    from dcae_jax.metrics import evaluation

    t_start = time.time()
    total, n_skipped = evaluation.reference_stats(
        args.data,
        args.resolution,
        split=args.split,
        batch_size=args.batch_size,
        max_images=args.max_images,
        fid_weights=args.fid_weights,
    )
    if total.count < 2:
        print(f"error: FID statistics need at least 2 readable images, have {total.count}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        total.save(args.out)
        print(
            f"wrote {args.out}: mu/sigma of {total.count} images ({n_skipped} skipped) of {args.data} "
            f"[{args.split}] at {args.resolution}x{args.resolution}, {time.time() - t_start:.1f} s"
        )
    return 0


if __name__ == "__main__":
    cli.run_argparse("fid_stats", main)
