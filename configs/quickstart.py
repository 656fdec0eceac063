"""Quickstart: a small residual DC-AE through phases 1 -> 2 -> 3 on the bundled real photos (CPU).

    python -m dcae_jax.main --config=configs/quickstart.py --workdir=/tmp/dcae_quickstart

Each phase runs in `<workdir>/phase{1,2,3}` and starts from the previous phase's export; the final
model is exported to `<workdir>/export` (load it with `DCAE.from_pretrained`) and held-out
reconstructions and an evaluation table go to `<workdir>/eval.md`. L1 only: LPIPS needs weights
files that cannot be downloaded here (pass --config.phase1.loss.lpips_weights=... to add it).
"""

import ml_collections

from configs import common

# f16 residual DC-AE: 5 stages (ResBlocks, then EfficientViT blocks), 16 latent channels.
MODEL_OVERRIDES = {
    "latent_channels": 16,
    "encoder_block_out_channels": [16, 32, 64, 128, 128],
    "decoder_block_out_channels": [16, 32, 64, 128, 128],
    "encoder_layers_per_block": [0, 1, 1, 1, 1],
    "decoder_layers_per_block": [0, 1, 1, 1, 1],
    "encoder_block_types": ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
    "decoder_block_types": ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
    "encoder_qkv_multiscales": [[], [], [], [], []],
    "decoder_qkv_multiscales": [[], [], [], [], []],
    "decoder_norm_types": ["batch_norm", "batch_norm", "batch_norm", "rms_norm", "rms_norm"],
    "decoder_act_fns": ["relu", "relu", "relu", "silu", "silu"],
    "attention_head_dim": 16,
    "name": "quickstart-f16c16",
}


def phase_config(phase: int, steps: int, resolution: int, batch: int) -> ml_collections.ConfigDict:
    c = common.base_config()
    c.model.variant = "tiny"
    c.model.overrides = MODEL_OVERRIDES
    common.apply_phase(c, phase, num_stages=5)
    c.optim.learning_rate = {1: 1e-3, 2: 3e-4, 3: 3e-4}[phase]
    c.optim.weight_decay = 0.0
    c.resolution = resolution
    c.eval_resolution = 128
    c.global_batch_size = batch
    c.eval_batch_size = 4
    c.num_steps = steps
    c.log_every = 20
    c.checkpoint_every = 100
    c.eval_every = 0
    if phase == 3:
        c.disc.base_features, c.disc.num_layers = 16, 2
        c.disc.learning_rate = 2e-4
        c.loss.gan_weight = 0.1
    return c


def get_config(arg: str = ""):
    a = common.parse_arg(arg, steps1=1000, steps2=200, steps3=200)
    c = ml_collections.ConfigDict()
    c.chain = ["phase1", "phase2", "phase3"]
    c.phase1 = phase_config(1, a.steps1, resolution=64, batch=8)
    c.phase2 = phase_config(2, a.steps2, resolution=128, batch=4)
    c.phase3 = phase_config(3, a.steps3, resolution=64, batch=8)
    return c
