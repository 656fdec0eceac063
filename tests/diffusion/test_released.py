"""Loading released DC-AE diffusion checkpoints (reference key names, HF layout) into DCAEDiffusion."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from reference_layout import dit_params_to_state_dict, uvit_params_to_state_dict
from safetensors.numpy import save_file

from dcae_jax import DCAEDiffusion
from dcae_jax.autoencoder import model as dcae
from dcae_jax.autoencoder.pretrained import DCAE
from dcae_jax.diffusion import released
from dcae_jax.diffusion.dit import init_dit_params
from dcae_jax.diffusion.uvit import count_params, init_uvit_params


def test_registry_matches_the_reference_table():
    assert len(released.RELEASED) == 13
    r = released.get_release("dc-ae-f64c128-in-1.0-uvit-h-in-512px-train2000k")
    assert (r.latent_shape, r.scaling_factor, r.objective, r.guidance_scale) == ((8, 8, 128), 0.2889, "epsilon", 1.5)
    assert released.get_release("dc-ae-f32c32-in-1.0-usit-2b-in-512px").objective == "velocity"
    cfg = released.model_config(released.get_release("dc-ae-f32c32-in-1.0-uvit-h-in-512px"), "x")
    assert round(count_params(cfg) / 1e6, 2) == 500.87 and cfg.seq_len == 258
    with pytest.raises(KeyError, match="valid names"):
        released.get_release("dc-ae-f32c32-in-1.0-uvit-xl")


def _narrow_f32c32(monkeypatch, name: str, **changes) -> dcae.DCAEConfig:
    """A narrow f32c32 DC-AE (16x16x32 latents at 512, as the real one), registered as `name` for this test."""
    ae_cfg = dcae.get_config("dc-ae-f32c32-in-1.0").replace(
        encoder_block_out_channels=(8, 8, 16, 16, 32, 32),
        decoder_block_out_channels=(8, 8, 16, 16, 32, 32),
        encoder_layers_per_block=(0, 1, 1, 1, 1, 1),
        decoder_layers_per_block=(0, 1, 1, 1, 1, 1),
        attention_head_dim=8,
        name=name,
        **changes,
    )
    real_get_config = dcae.get_config
    monkeypatch.setattr(dcae, "get_config", lambda n: ae_cfg if n == name else real_get_config(n))
    return ae_cfg


@pytest.fixture(params=["uvit", "dit"])
def tiny_release(monkeypatch, request):
    """A release entry whose autoencoder is a narrow f32c32 DC-AE (16x16x32 latents at 512, as the real one)."""
    ae_cfg = _narrow_f32c32(monkeypatch, "tiny-ae", scaling_factor=0.7)
    name = f"tiny-ae-{request.param}-tiny-in-512px"
    objective = "epsilon" if request.param == "uvit" else "dit"
    release = released.Release("tiny-ae", 0.7, f"{request.param}-tiny", objective, 1.5, (0.0, 0.0))
    monkeypatch.setitem(released.RELEASED, name, release)
    return name, release, ae_cfg


def _write_release(root, name, release, ae_cfg, *, bundle_ae: bool):
    """config.json + model.safetensors as DCAE_Diffusion_HF saves it (reference key names)."""
    cfg = released.model_config(release, name)
    if release.objective == "dit":
        params = init_dit_params(cfg, jax.random.key(3))
        state = dit_params_to_state_dict(params, cfg)
    else:
        params = init_uvit_params(cfg, jax.random.key(3))
        state = uvit_params_to_state_dict(params, cfg)
    tensors = {f"diffusion_model.{k}": np.ascontiguousarray(v) for k, v in state.items()}
    if bundle_ae:  # efficientvit's DC-AE keys, from a diffusers model with random weights
        from torch_reference import make_torch_model, to_efficientvit_state_dict

        ev = to_efficientvit_state_dict(make_torch_model(ae_cfg).state_dict(), ae_cfg)
        tensors.update({f"autoencoder.{k}": v.detach().numpy().copy() for k, v in ev.items()})
    root.mkdir()
    save_file(tensors, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"model_name": name}))
    return params


def test_released_uvit_with_bundled_autoencoder_loads_and_samples(tiny_release, tmp_path):
    name, release, ae_cfg = tiny_release
    params = _write_release(tmp_path / "ckpt", name, release, ae_cfg, bundle_ae=True)
    pipe = DCAEDiffusion.from_pretrained(tmp_path / "ckpt")
    assert pipe.objective == release.objective and pipe.scaling_factor == 0.7 and pipe.sampler["guidance_scale"] == 1.5
    for a, b in zip(jax.tree_util.tree_leaves(pipe.params), jax.tree_util.tree_leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert pipe.autoencoder.config.name == "tiny-ae"  # the bundled one, no download
    assert isinstance(pipe.autoencoder, DCAE)
    images = pipe.generate([999], seed=0, steps=2)
    assert images.shape == (1, 512, 512, 3) and np.all(np.isfinite(images))


def test_released_without_bundled_autoencoder_names_the_diffusers_repo(tiny_release, tmp_path):
    name, release, ae_cfg = tiny_release
    _write_release(tmp_path / name, name, release, ae_cfg, bundle_ae=False)
    (tmp_path / name / "config.json").unlink()  # the folder name identifies the release
    pipe = DCAEDiffusion.from_pretrained(tmp_path / name)
    assert pipe._autoencoder == "mit-han-lab/tiny-ae-diffusers"


def test_wrong_keys_name_the_file(tiny_release, tmp_path):
    name, release, ae_cfg = tiny_release
    _write_release(tmp_path / "ckpt", name, release, ae_cfg, bundle_ae=False)
    from safetensors.numpy import load_file

    tensors = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    missing = next(k for k in tensors if k.endswith("blocks.0.attn.qkv.weight"))
    tensors.pop(missing)
    save_file(tensors, str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"(?s)model\.safetensors.*attn\.qkv\.weight"):
        DCAEDiffusion.from_pretrained(tmp_path / "ckpt")


@pytest.mark.parametrize(("name", "depth", "millions"), [("2b", 28, 1580.40), ("3b", 56, 3107.73)])
def test_dc_ae_1_5_usit_releases(name, depth, millions):
    """DC-Gen's `dc_ae_1_5_usit_{2b,3b}_in_512px`: UViT with adaptive channels on dc-ae-f64c128-1.5 latents
    (8x8x128 at 512 px, scaling 0.5935), velocity objective; no guidance scale or FID published."""
    name = f"dc-ae-f64c128-1.5-usit-{name}-in-512px"
    r = released.get_release(name)
    assert (r.latent_shape, r.scaling_factor, r.objective, r.guidance_scale, r.fid) == (
        (8, 8, 128),
        0.5935,
        "velocity",
        1.0,
        None,
    )
    cfg = released.model_config(r, name)
    assert cfg.adaptive_channels and cfg.name == name
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size, cfg.seq_len) == (depth, 2048, 32, 1, 66)
    assert round(count_params(cfg) / 1e6, 2) == millions
    assert released.dcae_repo_id(r.autoencoder) == "dc-ai/dc-ae-f64c128-1.5"
    one_oh = released.get_release("dc-ae-f64c128-in-1.0-uvit-2b-in-512px")
    assert not released.model_config(one_oh, "x").adaptive_channels
    assert released.dcae_repo_id(one_oh.autoencoder) == "mit-han-lab/dc-ae-f64c128-in-1.0-diffusers"


def test_a_usit_on_a_structured_latent_samples_a_channel_prefix(monkeypatch, tmp_path):
    """A DC-AE 1.5-style release (a narrow f32 DC-AE without the shortcuts around its latent, no autoencoder in
    the file, as DC-Gen saves them): the reference keys load into a UViT with adaptive channels, which samples
    all 32 channels or only the first c, and the autoencoder decodes the prefix."""
    from dcae_jax.autoencoder.model import init_variables

    ae_cfg = _narrow_f32c32(
        monkeypatch, "tiny-ae15", encoder_out_shortcut=False, decoder_in_shortcut=False, scaling_factor=0.5
    )
    name = "tiny-ae15-usit-tiny-in-512px"
    release = released.Release("tiny-ae15", 0.5, "uvit-tiny", "velocity", 1.0, None)
    monkeypatch.setitem(released.RELEASED, name, release)
    params = _write_release(tmp_path / "ckpt", name, release, ae_cfg, bundle_ae=False)
    assert params["patch_embed"]["proj"]["kernel"].shape[2] == 32  # every channel's weights are stored
    ae = DCAE(ae_cfg, init_variables(ae_cfg, jax.random.key(1)))
    pipe = DCAEDiffusion.from_pretrained(tmp_path / "ckpt", autoencoder=ae)
    assert pipe.config.adaptive_channels and pipe.sampler["guidance_scale"] == 1.0
    for a, b in zip(jax.tree_util.tree_leaves(pipe.params), jax.tree_util.tree_leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    full = pipe.generate_latents([3, 999], seed=0, name="euler", steps=2)
    prefix = pipe.generate_latents([3, 999], seed=0, name="euler", steps=2, latent_channels=4)
    assert full.shape == (2, 16, 16, 32) and prefix.shape == (2, 16, 16, 4)
    assert np.all(np.isfinite(prefix))
    # Sampling 4 channels is sampling the reference's sliced model: a plain 4-channel UViT with the sliced weights.
    small = dataclasses.replace(pipe.config, in_channels=4, adaptive_channels=False)
    sliced = {**pipe.params, "decoder_pred": {k: v[..., :4] for k, v in pipe.params["decoder_pred"].items()}}
    sliced["patch_embed"] = {"proj": {**pipe.params["patch_embed"]["proj"]}}
    sliced["patch_embed"]["proj"]["kernel"] = pipe.params["patch_embed"]["proj"]["kernel"][:, :, :4]
    plain = DCAEDiffusion(small, sliced, objective="velocity", sampler=pipe.sampler, autoencoder=ae)
    np.testing.assert_allclose(plain.generate_latents([3, 999], seed=0, name="euler", steps=2), prefix, atol=1e-5)
    images = pipe.decode(prefix)
    assert images.shape == (2, 512, 512, 3) and np.all(np.isfinite(images))
    with pytest.raises(ValueError, match=r"latent_channels=33: expected 1\.\.32"):
        pipe.generate_latents([1], latent_channels=33)
