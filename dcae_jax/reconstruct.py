"""Reconstruct images with a DC-AE and report PSNR / SSIM per image.

    python -m dcae_jax.reconstruct --model=mit-han-lab/dc-ae-f32c32-in-1.0-diffusers \\
        --input=photos/ --output=recon/ [--resolution=512] [--dtype=bfloat16]

For every image under --input (a file, or a folder searched recursively) this writes
`OUTPUT/reconstructions/<name>.png` and `OUTPUT/comparisons/<name>.png` (original | reconstruction), then
`OUTPUT/results.md` and `OUTPUT/results.json` with per-image and mean PSNR / SSIM (computed on uint8-quantized
images like the DC-AE reference evaluator, see `dcae_jax.metrics.image`). With --resolution the images are
ADM-center-cropped to R x R (the DC-AE evaluation protocol); without it they are reconstructed at full size.
Files that cannot be read are reported on stderr and under "failed" in the JSON; the rest go on (an error, exit 2,
when none could be read).
"""

from __future__ import annotations

import sys

from dcae_jax.runtime import cli


def define_flags(f: cli.Flags) -> None:
    f.string("model", None, "Hugging Face repo id or local checkpoint (any supported format).", required=True)
    f.string("input", None, "An image file or a folder (searched recursively).", required=True)
    f.string("output", None, "Output folder.", required=True)
    f.integer(
        "resolution",
        None,
        "ADM-center-crop every image to R x R first (default: full size, padded by the model).",
        lower_bound=1,
    )
    f.enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")


def body(flags) -> None:
    from dcae_jax.autoencoder import inference
    from dcae_jax.data.images import list_images
    from dcae_jax.runtime import paths

    inp, out = paths.path(flags.input, "--input"), paths.path(flags.output, "--output")
    files = list_images(inp)
    if not files:
        raise FileNotFoundError(f"no images found under {inp}")
    results, md = inference.reconstruct_files(flags.model, inp, out, files, flags.resolution, flags.dtype)
    images, failed = results["images"], results["failed"]
    if not images:  # results.md / results.json under `out` list why
        raise ValueError(f"none of the {len(files)} images under {inp} could be read: see {out / 'results.md'}")
    print(md)
    if failed:
        print(f"{len(failed)} of {len(files)} images could not be read: {[f['name'] for f in failed]}", file=sys.stderr)
    print(f"wrote {len(images)} reconstructions and comparisons, results.md and results.json under {out}")
    print(
        f"score a whole dataset with python -m dcae_jax.evaluate --model={flags.model} --data=folder:DIR --resolution=R --output=r.json"
    )


def main(argv: list[str] | None = None) -> int:
    return cli.run("reconstruct", __doc__, define_flags, body, argv, verbosity="warning")


if __name__ == "__main__":
    cli.exit_with(main())
