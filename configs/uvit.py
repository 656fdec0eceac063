"""UViT / USiT on precomputed DC-AE latents: the DC-AE paper's ImageNet 512x512 recipe.

    python -m dcae_jax.precompute_latents --model=mit-han-lab/dc-ae-f64c128-in-1.0-diffusers \
        --data=tfds:imagenet2012 --resolution=512 --out=/data/latents/f64c128
    python -m dcae_jax.main --config=configs/uvit.py:model=uvit-h,latents=/data/latents/f64c128 --workdir=/runs/uvit-h

Args: `model` (uvit-s | uvit-h | uvit-2b), `objective` (epsilon: UViT, AdamW lr 2e-4, wd 0.03;
velocity: USiT, lr 1e-4, wd 0 — both betas (0.99, 0.99), 5000 warm-up steps, EMA 0.9999 with a
2000-step warm-up), `latents`, `autoencoder` (decodes the periodic sample grids), `batch` (global,
1024), `steps` (500k), `fsdp` (mesh size of the FSDP axis; 1 = pure data parallel), `depth` (0: the preset's). bf16 compute
with float32 parameters and per-block rematerialisation, as the reference trains.
`python -m dcae_jax.aot --config=configs/uvit.py:model=uvit-h --topology=v5p-64` checks the fit
first (it reads `data.latent_shape`, default f64c128 at 512: 8x8x128; `latent=f32c32` for 16x16x32).
"""

from dcae_jax.training import config as common

LATENT_SHAPES = {"f64c128": (8, 8, 128), "f32c32": (16, 16, 32), "f128c512": (4, 4, 512)}


def get_config(arg: str = ""):
    a = common.parse_arg(
        arg, model="uvit-h", objective="epsilon", latents="", autoencoder="", latent="f64c128", batch=1024,
        steps=500_000, fsdp=1, depth=0,
    )  # fmt: skip
    if a.latent not in LATENT_SHAPES:
        raise KeyError(f"latent={a.latent!r}; valid: {sorted(LATENT_SHAPES)}")
    c = common.diffusion_config()
    c.model.preset = a.model
    if a.depth:  # a shallower (or deeper) variant of the preset, e.g. for quick compile checks; named as such
        c.model.overrides = {"depth": a.depth, "name": f"{a.model}-depth{a.depth}"}
    c.objective = a.objective
    if a.objective == "velocity":
        c.optim.learning_rate, c.optim.weight_decay = 1e-4, 0.0
        c.sample.guidance_scale = 1.2
    c.data.latents = a.latents
    c.data.latent_shape = LATENT_SHAPES[a.latent]
    c.autoencoder = a.autoencoder
    c.global_batch_size = a.batch
    c.num_steps = a.steps
    c.mesh.shape = (-1, a.fsdp)
    return c
