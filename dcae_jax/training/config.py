"""The trainers' config schema and recipes: `base_config()` (every field the autoencoder trainer reads), the phase
layer sets (`trainable_rules`, `apply_phase`), `diffusion_config()`, and `parse_arg` for `--config=file.py:arg`.

Config files (`configs/*.py`, or your own anywhere) build on these: `from dcae_jax.training import config as common`.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder


def parse_arg(arg: str, **defaults):
    """'variant=f32c32,phase=2' -> ConfigDict, typed by the defaults; unknown keys raise."""
    cfg = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise KeyError(f"unknown config arg {key!r}; valid: {sorted(defaults)}")
        kind = type(defaults[key])
        cfg[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return cfg


def trainable_rules(phase: int, num_stages: int, adapt_stages: int = 0, head_stages: int = 0) -> list:
    """Ordered (regex, train|freeze) rules for a phase.

    Our choice (the paper does not publish the layer sets): phase 2 trains the latent-adjacent
    layers, the encoder's `project_out` and the decoder's `project_in`, plus `adapt_stages`
    deepest stages on each side; phase 3 trains the decoder head (RMSNorm + final conv) plus
    `head_stages` shallowest decoder stages. Everything the encoder computes is frozen in phase 3,
    so latents are bit-identical before and after.
    """
    if phase == 1:
        return [(".*", "train")]
    if phase == 2:
        deep = "|".join(str(i) for i in range(num_stages - adapt_stages, num_stages))
        rules = [("encoder/project_out/.*", "train"), ("decoder/project_in/.*", "train")]
        if adapt_stages:
            rules += [(f"(encoder|decoder)/stage_({deep})_.*", "train")]
        return [*rules, (".*", "freeze")]
    if phase == 3:
        rules = [("decoder/head_(norm|conv)/.*", "train")]
        if head_stages:
            shallow = "|".join(str(i) for i in range(head_stages + 1))  # stage 0 may be empty
            rules += [(f"decoder/stage_({shallow})_.*", "train")]
        return [*rules, (".*", "freeze")]
    raise ValueError(f"phase must be 1, 2 or 3, got {phase}")


def base_config() -> ml_collections.ConfigDict:
    """Every field the trainer reads, with defaults; experiment configs override."""
    c = ml_collections.ConfigDict()
    c.phase = 1
    c.seed = 0
    # dtype: compute dtype (float32 | bfloat16; parameters stay float32); remat: per-block recomputation policy
    # (none | full | dots | dots_no_batch); both in dcae_jax/runtime/compute.py.
    c.model = ml_collections.ConfigDict({"variant": "tiny", "overrides": {}, "dtype": "float32", "remat": "none"})
    c.init_from = ""  # export dir of the previous phase (params only; not a resume)
    c.trainable = [(".*", "train")]
    c.train_batch_norm = True  # phase 1: batch statistics (global over data parallel); else frozen
    c.resolution = 256
    c.eval_resolution = 0  # 0: same as resolution
    c.global_batch_size = 8
    c.eval_batch_size = 8
    c.num_steps = 1000
    c.data = ml_collections.ConfigDict(
        {
            "train": "bundled",
            "train_split": "train",
            "eval": "bundled",
            "eval_split": "validation",
            "num_workers": 0,
            "crop_scale": (),  # () = ADM random crop (short side 1-1.25x resolution); (lo, hi) = lo-hi x resolution
            "channel_shuffle": False,  # a random RGB order per training image (colour augmentation)
            "decoded_cache_mb": 256,  # decoded training images kept in memory while all fit (0: off)
        }
    )
    c.optim = ml_collections.ConfigDict(
        {
            "learning_rate": 6.4e-5,
            "weight_decay": 0.1,
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "warmup_steps": 0,
            "decay_steps": 0,
            "grad_clip": 0.0,
        }
    )
    c.loss = ml_collections.ConfigDict(
        {
            "l1_weight": 1.0,
            "lpips_weight": 0.0,
            "lpips_start": 0,  # steps of L1 only before the LPIPS term starts (it costs ~4x an L1 step on CPU)
            "lpips_weights": "",  # empty: the genuine VGG16 file (python -m dcae_jax.fetch_weights), made on first use
            "gan_weight": 0.0,
            "gan_loss": "hinge",
            "adaptive_gan_weight": True,
            "disc_start": 0,
        }
    )
    c.disc = ml_collections.ConfigDict(
        {
            "enabled": False,
            "base_features": 64,
            "num_layers": 3,
            "norm": "group",
            "learning_rate": 5.4e-5,
            "b1": 0.5,
            "b2": 0.9,
        }
    )
    # Held-out evaluation beside PSNR/SSIM: LPIPS (AlexNet) and rFID with the genuine networks (fetch_weights).
    c.eval_lpips = True
    c.eval_rfid = True
    c.eval_rfid_crop = 0  # 0: whole images; s > 0: s x s crops on a stride-s/2 grid (patch rFID, tiny eval sets)
    # DC-AE 1.5's structured latent: each step decodes only the first c' latent channels, c' drawn per step from
    # `channels` with `probs` (empty: uniform), e.g. (16, 32, ..., 128). Needs a model without the shortcuts around
    # its latent (encoder_out_shortcut = decoder_in_shortcut = False). Empty: every step uses all channels.
    c.latent_sampling = ml_collections.ConfigDict({"channels": (), "probs": ()})
    c.ema_decay = 0.0
    c.mesh = ml_collections.ConfigDict({"shape": (-1, 1), "axes": ("data", "fsdp"), "num_devices": 0})  # 0: all
    # Parameter sharding: ordered (regex, "fsdp"|"replicate") rules; FSDP splits over the mesh axis `fsdp_axis`.
    c.sharding = ml_collections.ConfigDict({"rules": [(".*", "fsdp")], "min_size": 2**14, "fsdp_axis": "fsdp"})
    c.donate_state = True  # the step reuses the old state's device buffers (one state in memory, not two)
    c.log_every = 50
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.eval_every = 0
    return c


def apply_phase(
    c: ml_collections.ConfigDict, phase: int, num_stages: int, adapt_stages: int = 0, head_stages: int = 0
) -> ml_collections.ConfigDict:
    """Phase-specific layers, BatchNorm mode, losses and optimizer (reference hyper-parameters)."""
    c.phase = phase
    c.trainable = trainable_rules(phase, num_stages, adapt_stages, head_stages)
    c.train_batch_norm = phase == 1
    if phase == 2:
        c.optim.learning_rate, c.optim.weight_decay = 1.6e-5, 0.001
    if phase == 3:
        c.optim.learning_rate, c.optim.b1, c.optim.b2 = 5.4e-5, 0.5, 0.9
        c.disc.enabled = True
        c.loss.gan_weight = 0.1
    return c


def diffusion_config() -> ml_collections.ConfigDict:
    """Every field the diffusion trainer reads, with the reference UViT recipe (ImageNet 512, DC-AE latents)."""
    c = ml_collections.ConfigDict()
    c.trainer = "diffusion"
    c.seed = 0
    c.objective = "epsilon"  # UViT; "velocity" for USiT
    # attention: auto (cuDNN's fused kernel on a GPU where it applies, XLA elsewhere) | xla | cudnn.
    c.model = ml_collections.ConfigDict(
        {
            "preset": "uvit-h",
            "patch_size": 1,
            "overrides": {},
            "dtype": "bfloat16",
            "remat": "full",
            "attention": "auto",
        }
    )
    c.autoencoder = ""  # DC-AE that decodes sample grids (and encodes config.data.images when no latents given)
    c.data = ml_collections.ConfigDict(
        {
            "latents": "",  # a `python -m dcae_jax.precompute_latents` folder
            "images": "",  # else: encode these images into <workdir>/latents first (bundled | folder:DIR | tfds:NAME)
            "images_split": "train",
            "resolution": 512,
            "encode_batch_size": 8,
            "scaling_factor": "",  # for encoding images: "" = the autoencoder's, "auto" = 1/RMS, or a number
            "latent_channels": 0,  # for encoding images: 0 = all, c = the first c (a DC-AE 1.5 structured latent)
            "latent_shape": (8, 8, 128),  # only for `dcae_jax.aot` (training reads the shape from the latents)
            "num_workers": 0,
        }
    )
    c.optim = ml_collections.ConfigDict(
        {"learning_rate": 2e-4, "weight_decay": 0.03, "b1": 0.99, "b2": 0.99, "eps": 1e-8, "warmup_steps": 5000}
    )
    c.ema = ml_collections.ConfigDict({"decay": 0.9999, "warmup_steps": 2000})
    c.global_batch_size = 1024
    c.num_steps = 500_000
    # Sample grids every `every` steps (0: none) and the export's sampler: `name` and `steps` unset = the objective's
    # default (DPM-Solver++ 30 steps for epsilon, adaptive Dopri5 for velocity; pipeline.SAMPLER_DEFAULTS).
    c.sample = ml_collections.ConfigDict(
        {"every": 20_000, "guidance_scale": 1.5, "name": placeholder(str), "steps": placeholder(int)}
    )
    c.mesh = ml_collections.ConfigDict({"shape": (-1, 1), "axes": ("data", "fsdp"), "num_devices": 0})
    # Parameter sharding: ordered (regex, "fsdp"|"replicate") rules; FSDP splits over the mesh axis `fsdp_axis`.
    c.sharding = ml_collections.ConfigDict({"rules": [(".*", "fsdp")], "min_size": 2**14, "fsdp_axis": "fsdp"})
    c.donate_state = True
    c.log_every = 100
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    return c
