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

from dcae_jax.runtime import cli


def define_flags(f: cli.Flags) -> None:
    f.string("model", None, "A DCAEDiffusion export, or a released checkpoint (folder or repo id).", required=True)
    f.string("autoencoder", None, "Overrides the autoencoder the model names (path or repo id).")
    f.string("out", None, "Output folder.", required=True)
    f.integer("num_samples", 64, "Samples to generate (50000 for the FID protocol).", lower_bound=1)
    f.list("classes", [], "Exact class ids to sample instead of random ones (a demo grid).")
    f.integer("batch_size", 32, "Samples per chunk (a multiple of the local device count is best).", lower_bound=1)
    f.float("guidance_scale", None, "Classifier-free guidance scale (default: the model's).")
    f.string("sampler", None, "dpm_solver_pp (UViT) | euler, heun, dopri5 (USiT) | ddpm (DiT).")
    f.integer("steps", None, "Sampler steps (default: the model's: 30 for DPM-Solver++).")
    f.integer(
        "latent_channels",
        None,
        "Sample only the first C latent channels (a USiT with adaptive channels on DC-AE 1.5; default: all).",
        lower_bound=1,
    )
    f.integer("seed", 0, "Seed of the class ids and the noise.")
    f.integer("grid", 64, "Samples shown in grid.png (the first ones).")
    f.string("fid_stats", None, "Reference statistics (.npz with mu, sigma) for FID.")
    f.string("fid_weights", None, "FID-Inception weights .npz (default: the genuine file, fetch_weights).")
    f.bool("save_images", False, "Keep every sample's uint8 pixels in the chunk files.")


def body(flags) -> None:
    from dcae_jax.diffusion import generate
    from dcae_jax.runtime import distributed, paths

    paths.path(flags.out, "--out")  # before joining a pod's other processes
    distributed.initialize_from_env()
    try:
        classes = tuple(int(c) for c in flags.classes)
    except ValueError:
        raise ValueError(f"--classes={','.join(flags.classes)}: expected integer class ids") from None
    fields = {f.name: flags[f.name].value for f in dataclasses.fields(generate.SampleRun) if f.name != "classes"}
    generate.run(generate.SampleRun(**fields, classes=classes))


def main(argv: list[str] | None = None) -> int:
    return cli.run("sample", __doc__, define_flags, body, argv, verbosity="warning")


if __name__ == "__main__":
    cli.exit_with(main())
