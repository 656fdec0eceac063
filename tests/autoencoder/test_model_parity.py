"""Parity of DCAE (JAX) against diffusers `AutoencoderDC` (PyTorch, fp32, random weights).

Every released architecture is checked at full size at a tiny resolution chosen so that both
LiteMLA paths run (quadratic where H*W <= 32 at a stage, linear elsewhere). Reduced-width copies of
each architecture cover the deepest stage on both sides of the H*W = 32 switch at low cost.
Tolerances (from the model issue): latents max|dz| <= 1e-4 * max|z|; images max|dy| <= 1e-5.
"""

from __future__ import annotations

import gc
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_autoencoder_dc_checkpoint_to_diffusers
from safetensors.torch import save_file
from torch_reference import make_torch_model, to_efficientvit_state_dict, torch_encode_decode

from dcae_jax import DCAE, VARIANTS, get_config
from dcae_jax.autoencoder.model import DCAEConfig


def _images(res: int, batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).uniform(-1, 1, (batch, res, res, 3)).astype(np.float32)


def _assert_close(ae: DCAE, x: np.ndarray, z_ref: np.ndarray, y_ref: np.ndarray) -> None:
    z = np.asarray(ae.encode(x))
    y = np.asarray(ae.decode(jnp.asarray(z_ref)))
    dz = np.abs(z - z_ref).max()
    dy = np.abs(y - y_ref).max()
    assert dz <= 1e-4 * np.abs(z_ref).max(), (dz, np.abs(z_ref).max())
    assert dy <= 1e-5, dy


def _check_diffusers_roundtrip(cfg: DCAEConfig, res: int, tmp_path, batch: int = 2) -> DCAE:
    model = make_torch_model(cfg)
    x = _images(res, batch)
    z_ref, y_ref = torch_encode_decode(model, x)
    ckpt = tmp_path / "diffusers"
    model.save_pretrained(ckpt)
    del model
    gc.collect()
    ae = DCAE.from_pretrained(ckpt, variant=cfg.name if cfg.name in VARIANTS else None)
    _assert_close(ae, x, z_ref, y_ref)
    shutil.rmtree(ckpt)  # released sizes are up to 4 GB each; CI disks are not unlimited
    return ae


# Smallest input at which each architecture runs both attention paths.
TINY_RESOLUTION = {32: 64, 64: 128, 128: 128}


def _tiny_resolution(cfg: DCAEConfig) -> int:
    """Both attention paths where the model has attention; else the smallest input (a 1x1 latent)."""
    has_attention = "EfficientViTBlock" in cfg.encoder_block_types + cfg.decoder_block_types
    f = cfg.spatial_compression_ratio
    return TINY_RESOLUTION[f] if has_attention else f


def _as_diffusers_writes_it(cfg: DCAEConfig) -> DCAEConfig:
    """diffusers' config needs a number: an unpublished scaling factor (None) is written as its default, 1.0."""
    return cfg.replace(scaling_factor=cfg.scaling_factor if cfg.scaling_factor is not None else 1.0)


def _architecture(cfg: DCAEConfig) -> DCAEConfig:
    return cfg.replace(name="", scaling_factor=None)


# The twelve released names have seven architectures (in/mix, sana 1.0/1.1 and the 256 px model share theirs and
# differ in name and scaling factor only). Each architecture's numbers are checked once at full size: three by the
# efficientvit-format test below, every other one (a new one too) by the diffusers-format test, under its first name;
# every name's config by the cheap test.
EFFICIENTVIT_CHECKED = {"dc-ae-f32c32-in-1.0": 64, "dc-ae-f32c32-sana-1.0": 64, "dc-ae-f32c128-1.5": 32}
_FIRST_NAME = {}
for _name in sorted(VARIANTS):
    _FIRST_NAME.setdefault(_architecture(VARIANTS[_name]), _name)
DIFFUSERS_CHECKED = sorted(
    name for arch, name in _FIRST_NAME.items() if arch not in {_architecture(VARIANTS[n]) for n in EFFICIENTVIT_CHECKED}
)


@pytest.mark.bigmem
@pytest.mark.parametrize("name", DIFFUSERS_CHECKED)
def test_released_architecture_matches_diffusers(name, tmp_path):
    cfg = get_config(name)
    ae = _check_diffusers_roundtrip(cfg, _tiny_resolution(cfg), tmp_path, batch=1)
    assert ae.config == _as_diffusers_writes_it(cfg)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_released_name_reads_back_from_diffusers_config(name, tmp_path):
    """diffusers' own config.json of each released model (an empty weights file: `load_config` reads key names
    lazily) gives its config exactly: name and scaling factor on top of an architecture checked at full size."""
    from diffusers import AutoencoderDC

    from dcae_jax.autoencoder.pretrained import load_config

    cfg = get_config(name)
    with torch.device("meta"):
        AutoencoderDC(**cfg.to_diffusers()).save_config(tmp_path)
    save_file({}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    assert load_config(tmp_path, variant=name) == _as_diffusers_writes_it(cfg)


@pytest.mark.bigmem
def test_f32c32_full_size_linear_attention_everywhere(tmp_path):
    # 256x256: the deepest stage is 8x8 = 64 > 32 tokens, so every LiteMLA takes the linear path.
    _check_diffusers_roundtrip(get_config("dc-ae-f32c32-in-1.0"), 256, tmp_path, batch=1)


def _narrow(cfg: DCAEConfig) -> DCAEConfig:
    """Same stages, depths, block types and shortcuts as `cfg`, at 1/8 width (head dim 8)."""
    return cfg.replace(
        encoder_block_out_channels=tuple(c // 8 for c in cfg.encoder_block_out_channels),
        decoder_block_out_channels=tuple(c // 8 for c in cfg.decoder_block_out_channels),
        latent_channels=cfg.latent_channels // 4,
        attention_head_dim=8,
        name="narrow-" + cfg.name,
    )


@pytest.mark.parametrize(
    "name",
    [
        "dc-ae-f32c32-in-1.0",
        "dc-ae-f64c128-in-1.0",
        "dc-ae-f128c512-in-1.0",
        "dc-ae-f32c32-sana-1.0",
        "dc-ae-lite-f32c32-sana-1.1",
        "dc-ae-f64c128-1.5",
    ],
)
@pytest.mark.parametrize("deepest_path", ["quadratic", "linear"])
def test_narrow_architectures_both_attention_paths(name, deepest_path, tmp_path):
    cfg = _narrow(get_config(name))
    f = cfg.spatial_compression_ratio
    # Deepest stage at 2x2 (4 tokens, <= head dim 8 -> quadratic) or 4x4 (16 tokens > 8 -> linear);
    # head dim 8 moves the switch from 32 to 8 tokens, as the reference's `N > dim` rule says.
    res = 2 * f if deepest_path == "quadratic" else 4 * f
    _check_diffusers_roundtrip(cfg, res, tmp_path, batch=2)


# DC-AE 1.5's original layout has no `.main.` around its latent layers (no shortcut there); no attention: 32x32.
@pytest.mark.bigmem
@pytest.mark.parametrize(("name", "res"), sorted(EFFICIENTVIT_CHECKED.items()))
def test_efficientvit_format_matches_diffusers(name, res, tmp_path):
    cfg = get_config(name)
    model = make_torch_model(cfg)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ev = to_efficientvit_state_dict(sd, cfg)
    # Validate the fixture with diffusers' own (independent) efficientvit -> diffusers converter.
    back = convert_autoencoder_dc_checkpoint_to_diffusers(dict(ev))
    assert set(back) == set(sd)
    assert all(torch.equal(back[k].reshape(sd[k].shape), sd[k]) for k in sd)
    x = _images(res, 1)
    z_ref, y_ref = torch_encode_decode(model, x)
    del model
    d = tmp_path / "ckpt"
    d.mkdir()
    save_file(ev, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_name": name}))
    ae = DCAE.from_pretrained(d)
    assert ae.config.name == name and ae.config.scaling_factor == cfg.scaling_factor
    _assert_close(ae, x, z_ref, y_ref)
    # A .pt state dict in the efficientvit training wrapper loads too (torch is installed here).
    torch.save({"state_dict": ev}, d / "model.pt")
    (d / "model.safetensors").unlink()
    ae_pt = DCAE.from_pretrained(d)
    _assert_close(ae_pt, x, z_ref, y_ref)
    # Saved from a PyTorch DDP run: every key under `module.`.
    torch.save({"state_dict": {f"module.{k}": v for k, v in ev.items()}}, d / "model.pt")
    _assert_close(DCAE.from_pretrained(d), x, z_ref, y_ref)


# Original-format key counts and parameter counts of the newer models, as DC-Gen's own modules have them
# (dc-ai-projects/DC-Gen dc_gen/aecore/models/dc_ae.py builders, counted from `state_dict()` / `parameters()`).
DC_GEN_COUNTS = {
    "dc-ae-lite-f32c32-sana-1.1": (275, 421_181_228),
    "dc-ae-f32c128-1.5": (296, 523_609_740),
    "dc-ae-f64c128-1.5": (340, 714_741_644),
}


@pytest.mark.parametrize("name", sorted(DC_GEN_COUNTS))
def test_newer_models_have_dc_gens_keys_and_sizes(name):
    from dcae_jax.autoencoder import convert
    from dcae_jax.autoencoder.model import DCAEModel, count_params

    cfg = get_config(name)
    keys = {k for e in convert.table(cfg, "efficientvit") for k in e.torch}
    n_keys, n_params = DC_GEN_COUNTS[name]
    assert len(keys) == n_keys
    shapes = jax.eval_shape(DCAEModel(cfg).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
    assert count_params(shapes["params"]) == n_params
    if "1.5" in name:  # no shortcut around the latent: no ResidualBlock wrapper (`.main.`) in the original keys
        assert {"encoder.project_out.op_list.0.conv.weight", "decoder.project_in.conv.weight"} <= keys
    else:
        assert {"encoder.project_out.main.op_list.0.conv.weight", "decoder.project_in.main.conv.weight"} <= keys
    assert get_config(name).decoder_conv_act_fn == "silu"


def test_every_name_of_lite_and_the_256px_model():
    lite = get_config("dc-ae-lite-f32c32-sana-1.1")
    for alias in ("dc-ai/dc-ae-lite-f32c32-diffusers", "mit-han-lab/dc-ae-turbo-f32c32-sana-1.1-diffusers"):
        assert get_config(alias) is lite
    sana = get_config("dc-ae-f32c32-sana-1.0")
    # Lite: sana-1.0's encoder (diffusion models trained on sana latents use it) and its scaling factor.
    assert lite.scaling_factor == sana.scaling_factor
    assert [getattr(lite, f) for f in ENCODER_FIELDS] == [getattr(sana, f) for f in ENCODER_FIELDS]
    in256 = get_config("dc-ae-f32c32-in-1.0-256px")
    assert in256.replace(name="x", scaling_factor=None) == get_config("dc-ae-f32c32-in-1.0").replace(
        name="x", scaling_factor=None
    )


ENCODER_FIELDS = (
    "encoder_block_out_channels",
    "encoder_layers_per_block",
    "encoder_block_types",
    "encoder_qkv_multiscales",
    "downsample_block_type",
    "encoder_out_shortcut",
    "latent_channels",
)
