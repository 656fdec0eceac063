"""Class-conditional samples from a latent diffusion model: PNG grids and generation FID.

    python -m dcae_jax.sample --model=/runs/uvit/export --num_samples=50000 --batch_size=64 \\
        --fid_stats=imagenet_512_train.npz --out=/runs/uvit/fid50k
    # The DC-AE authors' demo: 16 ImageNet classes, guidance 6.0, seed 0, a 4x4 grid.
    python -m dcae_jax.sample --model=mit-han-lab/dc-ae-f64c128-in-1.0-uvit-h-in-512px-train2000k \\
        --classes=279,333,979,936,933,145,497,1,248,360,793,12,387,437,938,978 --guidance_scale=6 --seed=0 --out=demo

The protocol (class ids, noise, quantisation, resumable chunks, processes): `dcae_jax.diffusion.generate`.
"""

from __future__ import annotations

import dataclasses
import sys

from absl import app, flags, logging

from dcae_jax import cli
from dcae_jax.diffusion import generate

FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string(
        "model", None, "A DCAEDiffusion export, or a released checkpoint (folder or repo id).", required=True
    )
    flags.DEFINE_string("autoencoder", None, "Overrides the autoencoder the model names (path or repo id).")
    flags.DEFINE_string("out", None, "Output folder.", required=True)
    flags.DEFINE_integer("num_samples", 64, "Samples to generate (50000 for the FID protocol).")
    flags.DEFINE_list("classes", [], "Exact class ids to sample instead of random ones (a demo grid).")
    flags.DEFINE_integer("batch_size", 32, "Samples per chunk (a multiple of the local device count is best).")
    flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale (default: the model's).")
    flags.DEFINE_string("sampler", None, "dpm_solver_pp (UViT) | euler, heun, dopri5 (USiT) | ddpm (DiT).")
    flags.DEFINE_integer("steps", None, "Sampler steps (default: the model's: 30 for DPM-Solver++).")
    flags.DEFINE_integer("seed", 0, "Seed of the class ids and the noise.")
    flags.DEFINE_integer("grid", 64, "Samples shown in grid.png (the first ones).")
    flags.DEFINE_string("fid_stats", None, "Reference statistics (.npz with mu, sigma) for FID.")
    flags.DEFINE_string("fid_weights", None, "FID-Inception weights .npz (default: the genuine file, fetch_weights).")
    flags.DEFINE_bool("save_images", False, "Keep every sample's uint8 pixels in the chunk files.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    from dcae_jax import distributed, paths

    try:
        paths.local_dir(FLAGS.out, "--out")  # before joining a pod's other processes
        distributed.initialize_from_env()
        generate.run(
            generate.SampleRun(
                **{f.name: FLAGS[f.name].value for f in dataclasses.fields(generate.SampleRun) if f.name != "classes"},
                classes=tuple(int(c) for c in FLAGS.classes),
            )
        )
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"sample: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _define_flags()
    cli.run_absl("sample", main)
