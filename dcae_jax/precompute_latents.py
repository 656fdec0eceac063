"""Encode a dataset into DC-AE latents for diffusion training (the reference's `dc_ae_generate_latent.py` step).

    python -m dcae_jax.precompute_latents --model mit-han-lab/dc-ae-f32c32-in-1.0-diffusers \\
        --data tfds:imagenet2012 --resolution 512 --out /data/latents/f32c32-in-512 \\
        [--split train] [--batch_size 64] [--shard_size 1024] [--scaling_factor auto|0.3189] [--max_images N]

What is stored, labels, the scaling factor, the shard layout and resume: `dcae_jax.data.precompute`.
"""

from __future__ import annotations

from dcae_jax.runtime import cli


def define_flags(f: cli.Flags) -> None:
    from dcae_jax.data import precompute

    f.string("model", None, "DC-AE: Hugging Face repo id or local checkpoint (any supported format).", required=True)
    f.string(
        "data",
        None,
        "folder:DIR, tfds:NAME[@DATA_DIR], arrayrecord:DIR (dcae_jax.pack) or bundled; DIR may be gs://.",
        required=True,
    )
    f.integer("resolution", None, "ADM center crop to R x R.", required=True, lower_bound=1)
    f.string("out", None, "Output folder (created; rerun with the same settings to resume).", required=True)
    f.string("split", "train", "Dataset split.")
    f.integer("batch_size", 32, "Images per process and step (rounded up to the local device count).", lower_bound=1)
    f.integer(
        "shard_size",
        1024,
        "Source records per shard; each starts a new batch, so a multiple of --batch_size pads none.",
        lower_bound=1,
    )
    f.integer("max_images", None, "Only the first N records of the split.")
    f.string("scaling_factor", None, "A number, or 'auto' (1/RMS); default: the model's, else auto.")
    f.integer("auto_scale_examples", 2048, "Records (spread over the split) that 'auto' measures.", lower_bound=1)
    f.enum("dtype", "float32", list(precompute.DTYPES), "Autoencoder compute dtype (latents are stored float32).")
    f.integer("read_threads", 16, "Image decoding threads per process.", lower_bound=1)
    f.integer(
        "latent_channels", None, "Keep only the first C latent channels (DC-AE 1.5's structured latent).", lower_bound=1
    )


def body(flags) -> None:
    import jax

    from dcae_jax.data import precompute
    from dcae_jax.runtime import distributed, paths

    paths.path(flags.out, "--out")  # before joining a pod's other processes
    distributed.initialize_from_env()
    precompute.precompute(**cli.values(flags))
    if jax.process_index() == 0:
        print(
            f"next: python -m dcae_jax.main --config=configs/uvit.py:model=uvit-h,batch=1024,latents={flags.out},"
            f"autoencoder={flags.model} --workdir=RUNDIR   (the paper's recipe, for a pod: on one small device try "
            "model=uvit-s,batch=32; python -m dcae_jax.aot checks the fit)"
        )


def main(argv: list[str] | None = None) -> int:
    return cli.run("precompute_latents", __doc__, define_flags, body, argv, verbosity="warning")


if __name__ == "__main__":
    cli.exit_with(main())
