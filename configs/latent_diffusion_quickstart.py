"""Latent diffusion end to end on CPU: a small DC-AE, its latents, a small UViT, sample grids.

    python -m dcae_jax.main --config=configs/latent_diffusion_quickstart.py --workdir=/tmp/ldm_quickstart
    python -m dcae_jax.sample --model=/tmp/ldm_quickstart/export --num_samples=16 --out=/tmp/ldm_quickstart/grid

Chain: `autoencoder` trains the quickstart's f16c16 residual DC-AE (phase 1, 64x64 crops of the
bundled real photos); `diffusion` encodes the bundled photos at 128x128 with it (8x8x16 latents, the
token grid of DC-AE-f64 at 512), stores them scaled by 1/RMS, trains a 6-block UViT (epsilon
objective, DPM-Solver++ sampling with guidance) and writes `diffusion/samples/*.png`. It shows the
pipeline, not image quality: at this budget the UViT learns the photos' colours and rough layout, not
their detail (docs/diffusion.md has the measured numbers). The UViT's label table has the data's classes, and
sampling draws only the classes that have training images. Its export bundles the autoencoder, so it loads from
anywhere. Args: ae_steps, steps, batch, width (UViT hidden size), depth, sample_every, ae (a finished autoencoder
export to reuse instead of training one, e.g. ae=/tmp/dcae_quickstart/export).
"""

import ml_collections

from configs import quickstart
from dcae_jax.training import config as common


def get_config(arg: str = ""):
    a = common.parse_arg(arg, ae_steps=1000, steps=1500, batch=16, width=128, depth=6, sample_every=500, ae="")
    c = ml_collections.ConfigDict()
    if a.ae:  # reuse a finished autoencoder: the chain is the diffusion phase only
        c.chain = ["diffusion"]
    else:
        c.chain = ["autoencoder", "diffusion"]
        c.autoencoder = quickstart.phase_config(1, a.ae_steps, resolution=64, batch=8)
    d = common.diffusion_config()
    d.autoencoder = a.ae
    d.model.preset = "uvit-s"  # its layout; the size is set below (num_classes: the data's)
    d.model.overrides = {"hidden_size": a.width, "depth": a.depth, "num_heads": 4, "name": f"uvit-{a.width}x{a.depth}"}
    d.model.dtype, d.model.remat = "float32", "none"
    d.data.images, d.data.images_split = "bundled", "train"
    d.data.resolution, d.data.encode_batch_size = 128, 4
    d.data.scaling_factor = "auto"  # a freshly trained autoencoder: scale the latents to unit RMS
    d.optim.learning_rate, d.optim.weight_decay, d.optim.warmup_steps = 1e-3, 0.0, 100
    d.ema.decay, d.ema.warmup_steps = 0.999, 100
    d.global_batch_size = a.batch
    d.num_steps = a.steps
    d.sample.every = a.sample_every
    d.log_every, d.checkpoint_every = 50, 500
    c.diffusion = d
    return c
