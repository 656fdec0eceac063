"""Checkpoint conversion for UViT / USiT and DiT: the reference key names (hand-written here), forward passes
of converted weights against independent oracles (a NumPy UViT driven by the torch-layout state dict;
diffusers' DiT), checkpoint layouts and files, error reports, and the reference parameter counts."""

from __future__ import annotations

import functools
import json
import math
import sys

import jax
import numpy as np
import pytest
import reference_layout
import torch
from torch_reference import make_diffusers_dit as _diffusers_dit

from dcae_jax.diffusion import convert
from dcae_jax.diffusion.dit import DiT, get_dit_config, init_dit_params
from dcae_jax.diffusion.uvit import UViT, get_uvit_config, init_uvit_params

_erf = np.vectorize(math.erf)


def _random_params(init_fn, cfg, seed: int = 0) -> dict:
    """Random params of the model's structure (no init compile), LayerNorm scales around 1."""
    shapes = jax.eval_shape(functools.partial(init_fn, cfg), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        offset = 1.0 if path[-1].key == "scale" else 0.0
        return (offset + 0.1 * rng.standard_normal(s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def _flat(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(k.key for k in path): np.asarray(v) for path, v in leaves}


def _assert_same_params(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ----------------------------------------------------------------------------------------------
# (a) UViT: the reference's key names for a depth-2 model, written out by hand.

UVIT_CFG = get_uvit_config("uvit-tiny", in_channels=4, input_size=4, patch_size=2)  # D 32, 2 heads, depth 2
D, C, P, HID, NCLS = 32, 4, 2, 128, 1000


def _uvit_block_keys(prefix: str) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.norm1.weight": (D,),
        f"{prefix}.norm1.bias": (D,),
        f"{prefix}.attn.qkv.weight": (3 * D, D),
        f"{prefix}.attn.proj.weight": (D, D),
        f"{prefix}.attn.proj.bias": (D,),
        f"{prefix}.norm2.weight": (D,),
        f"{prefix}.norm2.bias": (D,),
        f"{prefix}.mlp.fc1.weight": (HID, D),
        f"{prefix}.mlp.fc1.bias": (HID,),
        f"{prefix}.mlp.fc2.weight": (D, HID),
        f"{prefix}.mlp.fc2.bias": (D,),
    }


REFERENCE_UVIT_KEYS = {
    "patch_embed.proj.weight": (D, C, P, P),
    "patch_embed.proj.bias": (D,),
    "label_emb.embedding_table.weight": (NCLS + 1, D),
    "pos_embed": (1, 2 + 4, D),
    **_uvit_block_keys("in_blocks.0"),
    **_uvit_block_keys("mid_block"),
    **_uvit_block_keys("out_blocks.0"),
    "out_blocks.0.skip_linear.weight": (D, 2 * D),
    "out_blocks.0.skip_linear.bias": (D,),
    "norm.weight": (D,),
    "norm.bias": (D,),
    "decoder_pred.weight": (P * P * C, D),
    "decoder_pred.bias": (P * P * C,),
}


def _np_uvit_from_torch_layout(sd, x_nchw, t, y, num_heads: int, depth: int):
    """UViT's forward_without_cfg in float64, read straight off a torch-layout state dict (NCHW)."""
    w = {k: np.asarray(v, np.float64) for k, v in sd.items()}

    def linear(x, name, bias=True):
        return x @ w[f"{name}.weight"].T + (w[f"{name}.bias"] if bias else 0.0)

    def layer_norm(x, name):
        mu = x.mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * w[f"{name}.weight"] + w[
            f"{name}.bias"
        ]

    def block(x, name, skip=None):
        if skip is not None:
            x = linear(np.concatenate([x, skip], -1), f"{name}.skip_linear")
        b, n, d = x.shape
        qkv = linear(layer_norm(x, f"{name}.norm1"), f"{name}.attn.qkv", bias=False)
        q, k, v = qkv.reshape(b, n, 3, num_heads, d // num_heads).transpose(2, 0, 3, 1, 4)  # "B L (K H D) -> K B H L D"
        logits = q @ k.transpose(0, 1, 3, 2) * (d // num_heads) ** -0.5
        att = np.exp(logits - logits.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + linear((att @ v).transpose(0, 2, 1, 3).reshape(b, n, d), f"{name}.attn.proj")
        h = linear(layer_norm(x, f"{name}.norm2"), f"{name}.mlp.fc1")
        return x + linear(0.5 * h * (1 + _erf(h / math.sqrt(2))), f"{name}.mlp.fc2")

    x = np.asarray(x_nchw, np.float64)
    b, c, hh, _ = x.shape
    kernel = w["patch_embed.proj.weight"]  # (D, C, p, p)
    d, p = kernel.shape[0], kernel.shape[2]
    g = hh // p
    conv = (
        np.einsum("bciajf,dcaf->bdij", x.reshape(b, c, g, p, g, p), kernel) + w["patch_embed.proj.bias"][:, None, None]
    )
    tokens = conv.reshape(b, d, g * g).transpose(0, 2, 1)  # flatten(2).transpose(1, 2)
    freqs = np.exp(-math.log(10000) * np.arange(d // 2) / (d // 2))
    args = np.asarray(t, np.float64)[:, None] * freqs
    time_tok = np.concatenate([np.cos(args), np.sin(args)], -1)[:, None]
    label_tok = w["label_emb.embedding_table.weight"][y][:, None]
    h = np.concatenate([label_tok, time_tok, tokens], 1) + w["pos_embed"]
    skips = []
    for i in range(depth // 2):
        h = block(h, f"in_blocks.{i}")
        skips.append(h)
    h = block(h, "mid_block")
    for i in range(depth // 2):
        h = block(h, f"out_blocks.{i}", skips.pop())
    out = linear(layer_norm(h, "norm"), "decoder_pred")[:, 2:]  # (B, g*g, p*p*C)
    return out.reshape(b, g, g, p, p, c).transpose(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)  # -> B C (h p1) (w p2)


def test_uvit_reference_keys_and_forward_from_torch_layout():
    cfg = UVIT_CFG
    params = _random_params(init_uvit_params, cfg)
    sd = reference_layout.uvit_params_to_state_dict(params, cfg)
    assert {k: v.shape for k, v in sd.items()} == REFERENCE_UVIT_KEYS
    assert [e.torch[0] for e in convert.uvit_key_table(cfg)] == list(sd)
    back = convert.convert_uvit_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, cfg)
    _assert_same_params(back, params)

    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, C, 4, 4)).astype(np.float32)  # NCHW, as the reference
    t, y = np.array([1.0, 17.5, 999.0], np.float32), np.array([5, NCLS, 0])
    ours = jax.jit(lambda p: UViT(cfg).apply({"params": p}, x.transpose(0, 2, 3, 1), t, y))(back)
    ref = _np_uvit_from_torch_layout(sd, x, t, y, num_heads=2, depth=2)
    assert _rel_err(np.asarray(ours).transpose(0, 3, 1, 2), ref) < 1e-5


def test_uvit_checkpoint_layouts_and_files(tmp_path):
    cfg = UVIT_CFG
    ema = reference_layout.uvit_params_to_state_dict(_random_params(init_uvit_params, cfg, seed=2), cfg)
    raw = {k: np.zeros_like(v) for k, v in ema.items()}
    trainer = {  # efficientvit Trainer.save_model
        "state_dict": {f"uvit.{k}": torch.from_numpy(v) for k, v in raw.items()},
        "ema": {0.9999: {f"uvit.{k}": torch.from_numpy(v) for k, v in ema.items()}},
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 3,
        "global_step": 1000,
    }
    path = tmp_path / "step_1000.pt"
    torch.save(trainer, path)
    picked = convert.load_diffusion_params(path, cfg)
    _assert_same_params(picked, convert.convert_uvit_state_dict(ema, cfg))
    assert not any(np.any(v) for v in _flat(convert.load_diffusion_params(path, cfg, prefer_ema=False)).values())

    # facebookresearch/DiT-style training checkpoint and a DDP-prefixed plain state dict.
    sel = convert.select_weights({"model": raw, "ema": ema, "opt": {}, "args": None})
    assert sel.keys() == ema.keys() and np.array_equal(sel["pos_embed"], ema["pos_embed"])
    assert list(convert.select_weights({f"module.{k}": v for k, v in ema.items()})) == list(ema)

    with pytest.raises(ValueError, match=r"no model weights.*'epoch', 'optimizer'"):
        convert.select_weights({"optimizer": {}, "epoch": 3})


def test_pt_needs_torch(tmp_path, monkeypatch):
    path = tmp_path / "nnet_ema.pth"
    torch.save({"pos_embed": torch.zeros(1, 6, D)}, path)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="torch"):
        convert.load_diffusion_state_dict(path)


# ----------------------------------------------------------------------------------------------
# (b) DiT: reference key names by hand; diffusers' DiTTransformer2DModel as the oracle.

DIT_CFG = get_dit_config("dit-tiny", in_channels=4, input_size=4, patch_size=2)  # D 32, 2 heads, depth 2


def _dit_block_keys(i: int) -> dict[str, tuple[int, ...]]:
    b = f"blocks.{i}"
    return {
        f"{b}.attn.qkv.weight": (3 * D, D),
        f"{b}.attn.qkv.bias": (3 * D,),
        f"{b}.attn.proj.weight": (D, D),
        f"{b}.attn.proj.bias": (D,),
        f"{b}.mlp.fc1.weight": (HID, D),
        f"{b}.mlp.fc1.bias": (HID,),
        f"{b}.mlp.fc2.weight": (D, HID),
        f"{b}.mlp.fc2.bias": (D,),
        f"{b}.adaLN_modulation.1.weight": (6 * D, D),
        f"{b}.adaLN_modulation.1.bias": (6 * D,),
    }


REFERENCE_DIT_KEYS = {
    "pos_embed": (1, 4, D),
    "x_embedder.proj.weight": (D, C, P, P),
    "x_embedder.proj.bias": (D,),
    "t_embedder.mlp.0.weight": (D, 256),
    "t_embedder.mlp.0.bias": (D,),
    "t_embedder.mlp.2.weight": (D, D),
    "t_embedder.mlp.2.bias": (D,),
    "y_embedder.embedding_table.weight": (NCLS + 1, D),
    **_dit_block_keys(0),
    **_dit_block_keys(1),
    "final_layer.adaLN_modulation.1.weight": (2 * D, D),
    "final_layer.adaLN_modulation.1.bias": (2 * D,),
    "final_layer.linear.weight": (P * P * 2 * C, D),
    "final_layer.linear.bias": (P * P * 2 * C,),
}


def test_dit_reference_keys_and_hf_release_file_against_diffusers(tmp_path):
    from safetensors.numpy import save_file

    cfg = DIT_CFG
    ours_sd = reference_layout.dit_params_to_state_dict(_random_params(init_dit_params, cfg), cfg)
    assert {k: v.shape for k, v in ours_sd.items()} == REFERENCE_DIT_KEYS
    model = _diffusers_dit(cfg)
    sd = reference_layout.dit_state_dict_from_diffusers(model.state_dict(), cfg)
    assert {k: v.shape for k, v in sd.items()} == REFERENCE_DIT_KEYS

    # The Hugging Face release layout: DCAE_Diffusion_HF -> model.safetensors with both submodules.
    release = {f"diffusion_model.{k}": v for k, v in sd.items()}
    release["autoencoder.encoder.project_in.conv.weight"] = np.ones((8, 3, 3, 3), np.float32)
    save_file(release, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_name": "dc-ae-f32c32-in-1.0-dit-xl-in-512px"}))
    params = convert.load_diffusion_params(tmp_path, cfg)
    _assert_same_params(
        convert.convert_dit_state_dict(reference_layout.dit_params_to_state_dict(params, cfg), cfg), params
    )

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, C, 4, 4)).astype(np.float32)
    t, y = np.array([0.0, 42.0, 999.0], np.float32), np.array([7, NCLS, 1])
    with torch.no_grad():
        ref = model(torch.from_numpy(x), timestep=torch.from_numpy(t), class_labels=torch.from_numpy(y)).sample.numpy()
    ours = jax.jit(lambda p: DiT(cfg).apply({"params": p}, x.transpose(0, 2, 3, 1), t, y))(params)
    err = _rel_err(np.asarray(ours).transpose(0, 3, 1, 2), ref)
    print(f"DiT from an HF-layout file vs diffusers: max rel err {err:.2e}")
    assert err < 1e-4

    # diffusers' per-block embedder copies must agree to become one t_embedder.
    diverged = dict(model.state_dict())
    key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"
    diverged[key] = diverged[key] + 1.0
    with pytest.raises(ValueError, match=key):
        reference_layout.dit_state_dict_from_diffusers(diverged, cfg)


# ----------------------------------------------------------------------------------------------
# (c) Errors name every offending key (and the file).


def test_errors_list_missing_unexpected_and_wrong_shapes(tmp_path):
    from safetensors.numpy import save_file

    cfg = UVIT_CFG
    sd = reference_layout.uvit_params_to_state_dict(_random_params(init_uvit_params, cfg), cfg)
    bad = dict(sd)
    del bad["mid_block.attn.proj.bias"]
    bad["time_embed.0.weight"] = np.zeros((4 * D, D), np.float32)  # mlp_time_embed=True checkpoints
    with pytest.raises(ValueError) as err:
        convert.convert_uvit_state_dict(bad, cfg)
    msg = str(err.value)
    assert (
        "missing keys (1): ['mid_block.attn.proj.bias']" in msg
        and "unexpected keys (1): ['time_embed.0.weight']" in msg
    )
    assert "uvit-tiny" in msg and "depth=2" in msg

    wrong = dict(sd, **{"decoder_pred.weight": sd["decoder_pred.weight"].T, "pos_embed": np.zeros((1, 7, D))})
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in wrong.items()}, str(tmp_path / "uvit.safetensors"))
    with pytest.raises(ValueError) as err:
        convert.load_diffusion_params(tmp_path / "uvit.safetensors", cfg)
    msg = str(err.value)
    assert msg.startswith(str(tmp_path / "uvit.safetensors")) and len(msg.splitlines()) == 3  # both, one line each
    assert f"decoder_pred.weight: shape ({D}, {P * P * C}), expected ({P * P * C}, {D})" in msg
    assert "pos_embed: shape (1, 7, 32), expected" in msg

    # A UViT checkpoint is not a DiT: every key is reported against the DiT table.
    with pytest.raises(ValueError, match=r"missing keys \(\d+\): \['x_embedder.proj.weight'"):
        convert.convert_dit_state_dict(sd, DIT_CFG)
    # DiT's fixed pos_embed must be the sin-cos table.
    dsd = reference_layout.dit_params_to_state_dict(_random_params(init_dit_params, DIT_CFG), DIT_CFG)
    with pytest.raises(ValueError, match="pos_embed differs"):
        convert.convert_dit_state_dict(dict(dsd, pos_embed=np.zeros_like(dsd["pos_embed"])), DIT_CFG)


# ----------------------------------------------------------------------------------------------
# (d) The key tables cover the released models: parameter counts and Flax shapes (shapes only).


def _table_flax_shapes(table) -> dict[str, tuple[int, ...]]:
    out = {}
    for e in table:
        if e.path is None:
            continue
        s = e.torch_shape
        if e.layout == "linear":
            s = s[::-1]
        elif e.layout == "conv":
            s = (s[2], s[3], s[1], s[0])
        out["/".join(e.path)] = s
    return out


def _config_and_table(name: str, channels: int = 32, size: int = 16):
    if name.startswith("dit"):
        return get_dit_config(name, in_channels=channels, input_size=size), init_dit_params, convert.dit_key_table
    return get_uvit_config(name, in_channels=channels, input_size=size), init_uvit_params, convert.uvit_key_table


@pytest.mark.parametrize(
    ("name", "millions", "latents"),
    [
        ("uvit-s", 44.79, [(32, 16), (128, 8)]),
        ("uvit-h", 500.87, [(32, 16), (128, 8)]),
        ("uvit-2b", 1580.40, [(32, 16), (128, 8)]),
        ("dit-xl", 674.89, [(32, 16)]),
    ],
)
def test_key_tables_cover_released_models(name, millions, latents):
    for channels, size in latents:
        cfg, _, table_fn = _config_and_table(name, channels, size)
        table = table_fn(cfg)
        assert len({e.torch[0] for e in table}) == len(table)
        n = sum(math.prod(e.torch_shape) for e in table if e.path is not None)  # DiT's pos_embed is frozen
        assert round(n / 1e6, 2) == millions
    # Every Flax param of the full-size model has exactly one table entry of the right shape.
    cfg, init_fn, table_fn = _config_and_table(name)
    shapes = jax.eval_shape(functools.partial(init_fn, cfg), jax.random.key(0))
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    assert _table_flax_shapes(table_fn(cfg)) == {"/".join(k.key for k in path): v.shape for path, v in flat}
