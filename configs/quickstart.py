"""Quickstart: a small residual DC-AE through phases 1 -> 2 -> 3 on the bundled real photos (CPU).

    python -m dcae_jax.main --config=configs/quickstart.py --workdir=/tmp/dcae_quickstart \
        --config.phase1.loss.lpips_weights=/tmp/wts/lpips_vgg.npz --config.phase2.loss.lpips_weights=/tmp/wts/lpips_vgg.npz

(the LPIPS VGG16 file is found by default in $DCAE_JAX_WEIGHTS or ~/.cache/dcae_jax/weights, made by
`python -m dcae_jax.fetch_weights`; the flags above point at another copy.)

Each chain entry runs in `<workdir>/<name>` and starts from the previous entry's export; the final model
is exported to `<workdir>/export` (load it with `DCAE.from_pretrained`) and held-out reconstructions and
an evaluation table go to `<workdir>/eval.md`.

Chain (about 12 minutes on 2 CPU cores):
  phase1_l1  phase-1 warm-up: full model, L1 only, 64x64 crops, BatchNorm batch statistics, cosine LR.
  phase1     phase 1 continued with L1 + LPIPS (VGG16): LPIPS costs ~4.5x an L1 step at 64x64 on CPU,
             so it only runs for the last, short part of phase 1.
  phase2     latent-adjacent layers at 128x128 (the evaluation resolution), L1 + LPIPS.
  phase3     decoder head + PatchGAN at 64x64.
Held-out evaluation (3 bundled photos at 128x128): PSNR / SSIM / LPIPS (AlexNet). rFID is off: a Frechet
distance over 3 feature vectors is meaningless, and the Inception pass cost ~80 s per phase.
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

LPIPS_WEIGHT = 0.1


def phase_config(
    phase: int, steps: int, resolution: int, batch: int, lr: float, lpips: float = 0.0
) -> ml_collections.ConfigDict:
    c = common.base_config()
    c.model.variant = "tiny"
    c.model.overrides = MODEL_OVERRIDES
    common.apply_phase(c, phase, num_stages=5)
    c.optim.learning_rate = lr
    c.optim.weight_decay = 0.0
    if phase < 3:  # short linear warm-up, then cosine decay to 0 over the phase
        c.optim.warmup_steps = min(50, max(steps // 10, 1))
        c.optim.decay_steps = max(steps, 1)
    c.loss.lpips_weight = lpips
    c.resolution = resolution
    c.eval_resolution = 128
    c.global_batch_size = batch
    c.eval_batch_size = 4
    c.eval_rfid = False
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
    a = common.parse_arg(arg, steps0=900, steps1=100, steps2=80, steps3=150)
    c = ml_collections.ConfigDict()
    c.chain = ["phase1_l1", "phase1", "phase2", "phase3"]
    c.phase1_l1 = phase_config(1, a.steps0, resolution=64, batch=8, lr=1e-3)
    c.phase1 = phase_config(1, a.steps1, resolution=64, batch=8, lr=3e-4, lpips=LPIPS_WEIGHT)
    c.phase2 = phase_config(2, a.steps2, resolution=128, batch=4, lr=3e-4, lpips=LPIPS_WEIGHT)
    c.phase3 = phase_config(3, a.steps3, resolution=64, batch=8, lr=3e-4)
    return c
