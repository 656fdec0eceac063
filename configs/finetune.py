"""Fine-tune a released DC-AE (or any DC-AE checkpoint) on your own images: three recipes.

    python -m dcae_jax.main --config=configs/finetune.py:recipe=decoder,model=dc-ae-f32c32-sana-1.1,data=folder:/data/mine \
        --workdir=/tmp/ft_decoder

Args:
  recipe   decoder: the decoder only, encoder frozen: every image's latent is bit-identical before and after, so a
                    diffusion model trained on the released latents keeps working (use this one if you have one);
           full:    every layer, at the training resolution (the latent space moves: re-encode your latents);
           highres: phase-2-style adaptation of the latent-adjacent layers (encoder project_out, decoder
                    project_in, + `adapt_stages` deepest stages) to a new, larger `resolution`.
  model    a released name (e.g. dc-ae-f32c32-sana-1.1, dc-ae-lite-f32c32, dc-ae-f64c128-1.5; converted on the fly
           from its Hugging Face repo, so the first run needs to be online), a repo id, or a local directory:
           diffusers, efficientvit or a dcae_jax export (`python -m dcae_jax.convert` once offline).
  data     folder:DIR (with train/ and val/ subfolders, else the same images are used to evaluate),
           tfds:NAME[@DATA_DIR], or bundled.
  gan      also train against the PatchGAN (the paper's phase 3 loss); sharper textures, slower steps.
  resolution, steps, batch, lr   0 = the recipe's default (below).
  adapt_stages   highres: how many deepest stages on each side also train (default 0).
  fsdp     size of the FSDP mesh axis (parameters and optimizer state sharded over it); 1 = data parallel.
  runlocal tiny batch and steps at the smallest resolution the model takes: checks that everything runs.
"""

from dcae_jax.autoencoder.model import REPO_IDS, canonical_name
from dcae_jax.autoencoder.model import get_config as model_config
from dcae_jax.training import config as common

RECIPES = ("decoder", "full", "highres")


def get_config(arg: str = ""):
    a = common.parse_arg(
        arg,
        recipe="decoder",
        model="dc-ae-f32c32-sana-1.1",
        data="bundled",
        gan=False,
        resolution=0,
        steps=0,
        batch=0,
        lr=0.0,
        adapt_stages=0,
        fsdp=1,
        runlocal=False,
    )
    if a.recipe not in RECIPES:
        raise KeyError(f"recipe={a.recipe!r}; valid: {list(RECIPES)}")
    c = common.base_config()
    c.recipe = a.recipe
    # A released name: its architecture is known, its weights come from the hub repo. Anything else: the trainer
    # reads the architecture from the checkpoint itself (model.variant empty).
    released = canonical_name(a.model) if "/" not in a.model else None
    if released:
        c.model.variant, c.init_from = released, REPO_IDS[released]
    else:
        c.model.variant, c.init_from = "", a.model
    c.data.train = c.data.eval = a.data

    # Which layers train. The released models are converged: BatchNorm statistics (where a model has any) stay as
    # released, since small fine-tuning batches would only add noise to them.
    c.train_batch_norm = False
    if a.recipe == "decoder":
        c.phase = 3
        c.trainable = [("decoder/.*", "train"), (".*", "freeze")]  # the encoder computes exactly what it did
    elif a.recipe == "full":
        c.phase = 1
        c.trainable = [(".*", "train")]
    else:
        c.phase = 2
        num_stages = 0  # the stage count matters only to adapt_stages; a checkpoint's is read from its config
        if a.adapt_stages:
            from dcae_jax.autoencoder.pretrained import load_config

            num_stages = len((model_config(released) if released else load_config(a.model)).encoder_block_out_channels)
        c.trainable = common.trainable_rules(2, num_stages, a.adapt_stages)

    # Losses: L1 + LPIPS (VGG16), the loss the released models were trained with; a fine-tune with L1 alone blurs
    # them. The GAN only when asked (below).
    c.loss.l1_weight, c.loss.lpips_weight = 1.0, 1.0

    # Resolution: the phase-1 resolution (256) for decoder and full fine-tuning, the target one for highres.
    c.resolution = a.resolution or (1024 if a.recipe == "highres" else 256)
    c.eval_resolution = c.resolution
    # Batch (global): 32 at 256², e.g. 4 images per device on 8 devices; activations take ~6-7.4 GiB per 512² image
    # with the LPIPS loss (AOT, docs/finetune.md), so ~1.5-1.9 GiB per 256² image. Highres images are 16x larger: 8.
    c.global_batch_size = a.batch or (8 if a.recipe == "highres" else 32)
    c.eval_batch_size = min(c.global_batch_size, 16)
    # Steps: fine-tuning adapts, it does not retrain; a few thousand steps on a new domain, fewer for the decoder.
    c.num_steps = a.steps or {"decoder": 3000, "full": 5000, "highres": 5000}[a.recipe]
    # Optimizer: a sixth of phase 1's learning rate (6.4e-5 at batch 256): larger steps first destroy what the
    # released model knows. Short warm-up (Adam's moments start at zero on converged weights), cosine decay to 0
    # over the run, and no weight decay (it would pull released weights towards zero, not towards the domain).
    c.optim.learning_rate = a.lr or {"decoder": 1e-5, "full": 1e-5, "highres": 1.6e-5}[a.recipe]
    c.optim.weight_decay = 0.0
    c.optim.warmup_steps = min(200, c.num_steps // 10)
    c.optim.decay_steps = c.num_steps
    if a.gan:
        # As phase 3: the decoder is already good, so the GAN (hinge, adaptive weight 0.1) counts from step 0.
        c.disc.enabled, c.loss.gan_weight = True, 0.1
        c.optim.b1, c.optim.b2 = 0.5, 0.9  # GAN training's Adam betas (phase 3)

    c.data.num_workers = 8
    c.eval_every = max(500, c.num_steps // 5)
    c.checkpoint_every = 500
    c.log_every = 50
    c.mesh.shape = (-1, a.fsdp)
    if a.runlocal:
        smallest = model_config(a.model).spatial_compression_ratio if released else 64
        c.resolution = c.eval_resolution = a.resolution or max(64, smallest) * (2 if a.recipe == "highres" else 1)
        c.global_batch_size = c.eval_batch_size = a.batch or 2
        c.num_steps = a.steps or 10
        c.optim.warmup_steps, c.optim.decay_steps = 0, c.num_steps
        c.data.num_workers, c.log_every, c.checkpoint_every, c.eval_every = 0, 1, 5, 0
    return c
