"""`DCAE`: structured (DC-AE 1.5) latents and the export back to PyTorch formats."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dcae_jax import DCAE
from dcae_jax.autoencoder.model import DCAEModel, get_config, init_variables, tiny_config

# A small model with DC-AE 1.5's switches: no shortcut around the latent, SiLU head.
TINY_15 = tiny_config(
    encoder_out_shortcut=False, decoder_in_shortcut=False, decoder_conv_act_fn="silu", name="tiny-1.5"
)


def _images(n: int = 2, res: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).uniform(-1, 1, (n, res, res, 3)).astype(np.float32)


def _randomized(cfg, seed: int = 0) -> DCAE:
    """Random variables with random norm scales and biases (every path carries signal)."""
    variables = init_variables(cfg, seed)
    rng = np.random.default_rng(seed + 1)
    variables = jax.tree_util.tree_map(lambda a: np.asarray(a) + 0.1 * rng.standard_normal(a.shape), variables)
    return DCAE(cfg, jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), variables))


def test_channel_prefix_is_exactly_the_weight_slicing_definition():
    """DC-Gen's adaptive layers: encoder `conv(x, W[..., :c], b[:c])`, decoder `conv(z_c, W[:, :, :c], b)`."""
    ae = _randomized(TINY_15)
    x = _images()
    z = np.asarray(ae.encode(x))
    p = ae.variables["params"]
    for c in (1, 3, 8):
        zc = np.asarray(ae.encode(x, latent_channels=c))
        np.testing.assert_array_equal(zc, z[..., :c])
        # Encoder: the project_out conv with its output channels sliced gives the same prefix.
        sliced_enc = jax.tree_util.tree_map(np.asarray, ae.variables)
        po = sliced_enc["params"]["encoder"]["project_out"]
        po["kernel"], po["bias"] = po["kernel"][..., :c], po["bias"][:c]
        zs = DCAEModel(TINY_15.replace(latent_channels=c)).apply(sliced_enc, jnp.asarray(x), method=DCAEModel.encode)
        np.testing.assert_allclose(np.asarray(zs), zc, atol=1e-6 * np.abs(zc).max(), rtol=0)  # conv sum order
        # Decoder: the project_in conv with its input channels sliced (full bias) on the prefix alone.
        sliced_dec = jax.tree_util.tree_map(np.asarray, ae.variables)
        sliced_dec["params"]["decoder"]["project_in"]["kernel"] = p["decoder"]["project_in"]["kernel"][:, :, :c]
        ys = DCAEModel(TINY_15.replace(latent_channels=c)).apply(sliced_dec, jnp.asarray(zc), method=DCAEModel.decode)
        y = np.asarray(ae.decode(zc))
        np.testing.assert_allclose(y, np.asarray(ys), atol=1e-6 * np.abs(y).max(), rtol=0)
        # ... which is the full decoder on the zero-padded latent.
        padded = np.concatenate([zc, np.zeros(z.shape[:-1] + (8 - c,), np.float32)], -1)
        np.testing.assert_array_equal(np.asarray(ae.decode(zc)), np.asarray(ae.decode(padded)))


def test_channel_prefix_is_refused_where_shortcuts_mix_the_channels():
    ae = _randomized(tiny_config())
    z = ae.encode(_images(1))
    with pytest.raises(ValueError, match="shortcuts around its latent"):
        ae.encode(_images(1), latent_channels=4)
    with pytest.raises(ValueError, match="shortcuts around its latent"):
        ae.decode(z[..., :4])
    with pytest.raises(ValueError, match=r"must be in 1\.\.8"):
        _randomized(TINY_15).encode(_images(1), latent_channels=9)


@pytest.mark.parametrize("cfg", [tiny_config(), TINY_15], ids=["1.0-style", "1.5-style"])
def test_diffusers_export_loads_in_autoencoder_dc(cfg, tmp_path):
    from diffusers import AutoencoderDC

    ae = _randomized(cfg)
    out = ae.save_pretrained(tmp_path / "d", format="diffusers")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    model = AutoencoderDC.from_pretrained(out).eval()  # diffusers' own loader, strict about keys and shapes
    x = _images()
    with torch.no_grad():
        z = model.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent.permute(0, 2, 3, 1).numpy()
        y = model.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
    z_ours = np.asarray(ae.encode(x))
    assert np.abs(z - z_ours).max() <= 1e-4 * np.abs(z).max()
    assert np.abs(y - np.asarray(ae.decode(z))).max() <= 1e-5
    # ... and back into JAX, bit-exact.
    back = DCAE.from_pretrained(out)
    assert back.config.replace(name=cfg.name) == cfg
    np.testing.assert_array_equal(np.asarray(back.encode(x)), z_ours)


def test_export_refuses_what_a_format_cannot_express(tmp_path):
    with pytest.raises(ValueError, match="residual=False"):
        _randomized(tiny_config(residual=False)).save_pretrained(tmp_path / "a", format="diffusers")
    with pytest.raises(ValueError, match="only a released architecture"):
        _randomized(tiny_config()).save_pretrained(tmp_path / "b", format="efficientvit")
    with pytest.raises(ValueError, match="valid: dcae_jax, diffusers, efficientvit"):
        _randomized(tiny_config()).save_pretrained(tmp_path / "c", format="onnx")
    assert not any(tmp_path.iterdir())  # nothing half-written


@pytest.mark.bigmem
def test_original_format_export_loads_in_the_original_layout(tmp_path):
    """A released architecture (sana-1.1, full size) written in the efficientvit layout: diffusers' single-file
    converter (independent of our key tables) turns it into an `AutoencoderDC` state dict that loads strictly and
    gives our outputs; our loader reads it back with the scaling factor it was saved with."""
    from diffusers import AutoencoderDC
    from diffusers.loaders.single_file_utils import convert_autoencoder_dc_checkpoint_to_diffusers
    from safetensors.torch import load_file

    cfg = get_config("dc-ae-f32c32-sana-1.1").replace(scaling_factor=0.5)  # e.g. a fine-tuned export
    ae = DCAE(cfg, init_variables(cfg, 0))
    out = ae.save_pretrained(tmp_path / "orig", format="efficientvit")
    assert json.loads((out / "config.json").read_text())["model_name"] == "dc-ae-f32c32-sana-1.1"
    sd = convert_autoencoder_dc_checkpoint_to_diffusers(load_file(out / "model.safetensors"))
    model = AutoencoderDC(**cfg.to_diffusers()).eval()
    model.load_state_dict(sd, strict=True)
    x = _images(1, 64)
    with torch.no_grad():
        z = model.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent.permute(0, 2, 3, 1).numpy()
    assert np.abs(z - np.asarray(ae.encode(x))).max() <= 1e-4 * np.abs(z).max()
    back = DCAE.from_pretrained(out)
    assert back.config.scaling_factor == 0.5
    np.testing.assert_array_equal(np.asarray(back.encode(x)), np.asarray(ae.encode(x)))


def test_a_damaged_export_is_one_message(tmp_path):
    """A truncated data file of the export's orbax variables (an interrupted copy) is named as such."""
    _randomized(tiny_config()).save_pretrained(tmp_path / "export")
    chunks = [p for p in (tmp_path / "export" / "variables").rglob("*") if p.is_file() and p.parent.name == "d"]
    biggest = max(chunks, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"export: the export's variables/ is damaged or incomplete .*OUT_OF_RANGE"):
        DCAE.from_pretrained(tmp_path / "export")
