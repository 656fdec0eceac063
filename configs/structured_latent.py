"""A small DC-AE 1.5-style model (no shortcut around its latent) on the bundled photos, with or without training its
structured latent: the measurement behind docs/training.md's "Structured latents" curve (CPU, ~3 min each).

    python -m dcae_jax.main --config=configs/structured_latent.py:sampled=True --workdir=/tmp/sl_sampled
    python -m dcae_jax.main --config=configs/structured_latent.py:sampled=False --workdir=/tmp/sl_plain
    python -m dcae_jax.evaluate --model=/tmp/sl_sampled/export --data=bundled --resolution=128 \\
        --latent_channels=4 --output=/tmp/sl_sampled_c4.json

Args: sampled (each step decodes the first c' of the 16 latent channels, c' uniform over 2, 4, ..., 16; False: all
16 every step), steps.
"""

import importlib.util
import pathlib

from dcae_jax.training import config as common


def _quickstart_model() -> dict:
    """configs/quickstart.py's f16c16 model (read from the file beside this one)."""
    spec = importlib.util.spec_from_file_location(
        "quickstart_config", pathlib.Path(__file__).with_name("quickstart.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.MODEL_OVERRIDES)


# The quickstart's model with DC-AE 1.5's latent layers: no averaging shortcut into the latent, no duplicating
# shortcut out of it, SiLU before the output conv; RMSNorm for BatchNorm (a prefix must not shift batch statistics).
MODEL = {
    **_quickstart_model(),
    "decoder_norm_types": ["rms_norm"] * 5,
    "decoder_act_fns": ["silu"] * 5,
    "encoder_out_shortcut": False,
    "decoder_in_shortcut": False,
    "decoder_conv_act_fn": "silu",
    "name": "structured-f16c16",
}


def get_config(arg: str = ""):
    a = common.parse_arg(arg, sampled=True, steps=1000)
    c = common.base_config()
    c.model.variant = "tiny"
    c.model.overrides = MODEL
    common.apply_phase(c, 1, num_stages=5)
    if a.sampled:
        c.latent_sampling.channels = (2, 4, 6, 8, 10, 12, 14, 16)
    # The quickstart's phase-1 recipe, L1 only (the comparison is between the two runs, not against the paper).
    c.optim.learning_rate, c.optim.weight_decay = 1e-3, 0.0
    c.optim.warmup_steps, c.optim.decay_steps = 50, a.steps
    c.data.channel_shuffle, c.data.crop_scale = True, (1.5, 3.0)
    c.resolution, c.eval_resolution = 64, 128
    c.global_batch_size, c.eval_batch_size = 8, 4
    c.num_steps = a.steps
    c.eval_lpips, c.eval_rfid = True, False
    c.log_every, c.checkpoint_every, c.eval_every = 50, 500, 0
    return c
