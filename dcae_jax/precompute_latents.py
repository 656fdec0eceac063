"""Encode a dataset into DC-AE latents for diffusion training (the reference's `dc_ae_generate_latent.py` step).

    python -m dcae_jax.precompute_latents --model mit-han-lab/dc-ae-f32c32-in-1.0-diffusers \\
        --data tfds:imagenet2012 --resolution 512 --out /data/latents/f32c32-in-512 \\
        [--split train] [--batch_size 64] [--shard_size 1024] [--scaling_factor auto|0.3189] [--max_images N]

What is stored, labels, the scaling factor, the shard layout and resume: `dcae_jax.data.precompute`.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from dcae_jax import cli
from dcae_jax.data import precompute

FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("model", None, "DC-AE: Hugging Face repo id or local checkpoint (any supported format).")
    flags.DEFINE_string("data", None, "folder:DIR, tfds:NAME[@DATA_DIR] or bundled.")
    flags.DEFINE_integer("resolution", None, "ADM center crop to R x R.")
    flags.DEFINE_string("out", None, "Output folder (created; rerun with the same settings to resume).")
    flags.DEFINE_string("split", "train", "Dataset split.")
    flags.DEFINE_integer("batch_size", 32, "Images per process and step (rounded up to the local device count).")
    flags.DEFINE_integer("shard_size", 1024, "Source records per shard.")
    flags.DEFINE_integer("max_images", None, "Only the first N records of the split.")
    flags.DEFINE_string("scaling_factor", None, "A number, or 'auto' (1/RMS); default: the model's, else auto.")
    flags.DEFINE_integer("auto_scale_examples", 2048, "Records (spread over the split) that 'auto' measures.")
    flags.DEFINE_enum(
        "dtype", "float32", list(precompute.DTYPES), "Autoencoder compute dtype (latents are stored float32)."
    )
    flags.DEFINE_integer("read_threads", 16, "Image decoding threads per process.")
    for name in ("model", "data", "resolution", "out"):
        flags.mark_flag_as_required(name)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax's INFO lines would bury the report
    from dcae_jax import distributed, paths

    try:
        paths.local_dir(FLAGS.out, "--out")  # before joining a pod's other processes
        distributed.initialize_from_env()
        precompute.precompute(
            FLAGS.model,
            FLAGS.data,
            FLAGS.resolution,
            FLAGS.out,
            split=FLAGS.split,
            batch_size=FLAGS.batch_size,
            shard_size=FLAGS.shard_size,
            max_images=FLAGS.max_images,
            scaling_factor=FLAGS.scaling_factor,
            auto_scale_examples=FLAGS.auto_scale_examples,
            dtype=FLAGS.dtype,
            read_threads=FLAGS.read_threads,
        )
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"precompute_latents: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _define_flags()
    cli.run_absl("precompute_latents", main)
