"""Evaluate a DC-AE on a dataset: rFID, PSNR, SSIM, LPIPS and latent statistics, like the DC-AE reference evaluator.

    python -m dcae_jax.evaluate --model=mit-han-lab/dc-ae-f32c32-in-1.0-diffusers --data=tfds:imagenet2012 \\
        --resolution=256 --output=results.json [--ref_stats=imagenet_val_256.npz] [--batch_size=64] [--max_images=5000]

Protocol and metrics: `dcae_jax.metrics.evaluation` (the efficientvit evaluator's: ADM center crop, uint8
quantization, LPIPS AlexNet, pytorch-fid Inception; `--ref_stats` from `python -m dcae_jax.fid_stats`, else the
real images of the same pass). Writes the results .json and a .md table row beside it (process 0).
"""

from __future__ import annotations

import sys

from dcae_jax.runtime import cli


def define_flags(f: cli.Flags) -> None:
    f.string("model", None, "Hugging Face repo id or local checkpoint (any supported format).", required=True)
    f.string(
        "data",
        None,
        "folder:DIR, tfds:NAME[@DATA_DIR], arrayrecord:DIR (dcae_jax.pack) or bundled; DIR may be gs://.",
        required=True,
    )
    f.string("split", "validation", "Dataset split.")
    f.integer("resolution", None, "ADM center crop to R x R.", required=True)
    f.string("output", None, "Results .json (a .md with the table row is written beside it).", required=True)
    f.integer("batch_size", 32, "Global batch size (rounded up to the device count).")
    f.integer("max_images", None, "Only the first N records of the split.")
    f.string("lpips_weights", None, "LPIPS weights .npz (default: the genuine AlexNet file, fetch_weights).")
    f.string("fid_weights", None, "FID Inception .npz (default: the genuine file, fetch_weights).")
    f.string("ref_stats", None, "FID reference mu/sigma .npz (default: the real images of this pass).")
    f.enum("dtype", "float32", ["float32", "bfloat16"], "Autoencoder compute dtype.")
    f.integer("latent_channels", None, "Reconstruct from the first C latent channels only (DC-AE 1.5).", lower_bound=1)


def body(flags) -> int:
    from dcae_jax.metrics import evaluation

    r = evaluation.evaluate_dataset(**cli.values(flags, exclude=("output",)))
    written = evaluation.write_results(r, flags.output)  # process 0 only; [] elsewhere
    if written:
        z = r["latent"]
        print(r["markdown"])
        print(
            f"{r['num_images']} images ({r['num_skipped']} skipped) in {r['seconds']:.1f} s; latent "
            + ", ".join(f"{k} {'n/a' if z[k] is None else f'{z[k]:.4f}'}" for k in ("mean", "rms", "std"))
        )
        for note in r["notes"]:
            print(f"note: {note}", file=sys.stderr)
        print(f"wrote {' and '.join(map(str, written))}")
        print(
            f"see the reconstructions with python -m dcae_jax.reconstruct --model={flags.model} --input=PHOTOS --output=recon/"
        )
    return 0 if r["num_images"] else 1


def main(argv: list[str] | None = None) -> int:
    return cli.run("evaluate", __doc__, define_flags, body, argv, verbosity="warning")


if __name__ == "__main__":
    cli.exit_with(main())
