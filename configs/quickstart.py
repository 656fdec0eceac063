"""Quickstart: a small residual DC-AE through phases 1 -> 2 -> 3 on the bundled real photos (CPU, ~12 min on 2 cores; docs/training.md).

    python -m dcae_jax.main --config=configs/quickstart.py --workdir=/tmp/dcae_quickstart

Each phase runs in `<workdir>/phase{1,2,3}` and starts from the previous phase's export; the final model is
exported to `<workdir>/export` (load it with `DCAE.from_pretrained`) and held-out reconstructions and an
evaluation table go to `<workdir>/eval.md`.

Losses: L1 + LPIPS (VGG16, weight 0.1) in phases 1-2, + PatchGAN in phase 3. The LPIPS file is found in
$DCAE_JAX_WEIGHTS or ~/.cache/dcae_jax/weights (`python -m dcae_jax.fetch_weights`), or pass e.g.
`--config.phase1.loss.lpips_weights=/path/lpips_vgg.npz --config.phase2.loss.lpips_weights=/path/lpips_vgg.npz`.
An LPIPS step costs 2.3-4.5x an L1 step at 64x64 on 2 CPU cores, so phase 1 runs L1 only until `loss.lpips_start`.

Only 8 training photos (mostly red/orange: retina, flower, astronaut, ihc...) and 3 held-out ones:
* channel_shuffle (a random RGB order per crop) stops the decoder from learning the training set's palette
  (held-out colour cast);
* crop_scale=(1.5, 3): 64x64 training windows cut from images resized to 96-192 px, i.e. at the scale of the
  128x128 held-out evaluation (the default crop resizes the whole photo to 64-80 px).
Held-out metrics (eval.md): PSNR, SSIM and LPIPS (AlexNet) after every phase; rFID after the final phase only,
as a patch rFID (3 held-out photos x 9 aligned 64x64 crops at 128x128: 27 feature vectors per side, so it is
biased and noisy; compare runs, not papers). Each phase's Inception pass costs ~1-1.5 min of compile and run on
2 CPU cores, hence the final phase only.
"""

import ml_collections

from dcae_jax.training import config as common

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

LEARNING_RATES = {1: 1e-3, 2: 3e-4, 3: 3e-4}
LPIPS_WEIGHT = 0.1


def phase_config(
    phase: int, steps: int, resolution: int, batch: int, lpips_steps: int = 0
) -> ml_collections.ConfigDict:
    """One phase; `lpips_steps` > 0 adds LPIPS for the last `lpips_steps` steps (all of them when >= steps)."""
    c = common.base_config()
    c.model.variant = "tiny"
    c.model.overrides = MODEL_OVERRIDES
    common.apply_phase(c, phase, num_stages=5)
    c.optim.learning_rate = LEARNING_RATES[phase]
    c.optim.weight_decay = 0.0
    if phase < 3:  # short linear warm-up, then cosine decay to 0 over the phase
        c.optim.warmup_steps = min(50, max(steps // 10, 1))
        c.optim.decay_steps = max(steps, 1)
    if lpips_steps > 0:
        c.loss.lpips_weight = LPIPS_WEIGHT
        c.loss.lpips_start = max(steps - lpips_steps, 0)
    c.data.channel_shuffle = True
    if resolution < 128:
        c.data.crop_scale = (1.5, 3.0)
    c.resolution = resolution
    c.eval_resolution = 128
    c.global_batch_size = batch
    c.eval_batch_size = 4
    c.eval_rfid = phase == 3  # the final model only (see the module docstring)
    c.eval_rfid_crop = 64
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
    a = common.parse_arg(arg, steps1=2500, steps2=60, steps3=150, lpips_steps1=100)
    c = ml_collections.ConfigDict()
    c.chain = ["phase1", "phase2", "phase3"]
    c.phase1 = phase_config(1, a.steps1, resolution=64, batch=8, lpips_steps=a.lpips_steps1)
    c.phase2 = phase_config(2, a.steps2, resolution=128, batch=4, lpips_steps=a.steps2)
    c.phase3 = phase_config(3, a.steps3, resolution=64, batch=8)
    return c
