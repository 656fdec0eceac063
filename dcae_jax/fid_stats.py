"""Build FID reference statistics (pool3 mean / covariance) of a dataset's real images.

    python -m dcae_jax.fid_stats --data=tfds:imagenet2012 --resolution=256 --out=imagenet_val_256.npz \\
        [--fid_weights=fid_inception.npz] [--split=validation] [--batch_size=64] [--max_images=N]

Images go through exactly what `python -m dcae_jax.evaluate` does to the real images (ADM center crop to R x R,
uint8, `FIDInception`), so `--ref_stats` from this file gives the same rFID as computing the reference in the
evaluation pass. The output is pytorch-fid's `--save-stats` format (`mu`, `sigma`, float64): it can be passed to
pytorch-fid, and pytorch-fid's stats files can be passed to `--ref_stats`. Unreadable records are counted and
skipped. Runs jitted on all devices (a 1-D "data" mesh), multi-process safe; process 0 writes the file.
"""

from __future__ import annotations

import time

from dcae_jax.runtime import cli


def define_flags(f: cli.Flags) -> None:
    f.string(
        "data",
        None,
        "folder:DIR, tfds:NAME[@DATA_DIR], arrayrecord:DIR (dcae_jax.pack) or bundled; DIR may be gs://.",
        required=True,
    )
    f.string("split", "validation", "Dataset split.")
    f.integer("resolution", None, "ADM center crop to R x R.", required=True)
    f.string("out", None, "Output statistics .npz (mu, sigma).", required=True)
    f.string("fid_weights", None, "FID Inception .npz (default: the genuine file, fetch_weights).")
    f.integer("batch_size", 64, "Global batch size (rounded up to the device count).")
    f.integer("max_images", None, "Only the first N records of the split.")


def body(flags) -> int:
    import jax

    from dcae_jax.metrics import evaluation

    t_start = time.time()
    total, n_skipped = evaluation.reference_stats(**cli.values(flags, exclude=("out",)))
    if total.count < 2:
        raise ValueError(f"FID statistics need at least 2 readable images, {flags.data} gave {total.count}")
    if jax.process_index() == 0:
        total.save(flags.out)
        print(
            f"wrote {flags.out}: mu/sigma of {total.count} images ({n_skipped} skipped) of {flags.data} "
            f"[{flags.split}] at {flags.resolution}x{flags.resolution}, {time.time() - t_start:.1f} s; "
            f"use it with python -m dcae_jax.evaluate --ref_stats={flags.out} ... (rFID) or python -m dcae_jax.sample "
            f"--fid_stats={flags.out} ... (generation FID)"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run("fid_stats", __doc__, define_flags, body, argv, verbosity="warning")


if __name__ == "__main__":
    cli.exit_with(main())
