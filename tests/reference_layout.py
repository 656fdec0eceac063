"""The reference (PyTorch) layout from our parameters, and diffusers' DiT in it: test oracles for the diffusion
converters (`dcae_jax.diffusion.convert` reads these layouts; nothing in the package writes them)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from dcae_jax.diffusion.convert import dit_key_table, uvit_key_table
from dcae_jax.diffusion.dit import DiTConfig, sincos_pos_embed_2d
from dcae_jax.diffusion.uvit import UViTConfig
from dcae_jax.runtime import state_dict as sd_lib


def uvit_params_to_state_dict(params: Mapping[str, Any], config: UViTConfig) -> dict[str, np.ndarray]:
    """The inverse of `convert_uvit_state_dict`: a reference-layout state dict (NumPy, torch shapes)."""
    return sd_lib.to_torch(params, uvit_key_table(config))


def dit_params_to_state_dict(params: Mapping[str, Any], config: DiTConfig) -> dict[str, np.ndarray]:
    """The inverse of `convert_dit_state_dict`, including the fixed `pos_embed` the reference stores."""
    out = sd_lib.to_torch(params, dit_key_table(config))
    out["pos_embed"] = sincos_pos_embed_2d(config.hidden_size, config.grid_size)[None].copy()
    return out


def dit_state_dict_from_diffusers(state_dict: Mapping[str, Any], config: DiTConfig) -> dict[str, np.ndarray]:
    """diffusers `DiTTransformer2DModel` weights -> reference DiT key names (e.g. ``facebook/DiT-XL-2-256``).

    diffusers keeps a copy of the timestep / label embedders in every block (``transformer_blocks.{i}
    .norm1.emb``); they must be identical and become ``t_embedder`` / ``y_embedder``. q/k/v are fused.
    Note: diffusers' DiT timestep sinusoid uses ``downscale_freq_shift=1`` (frequencies exp(-ln(1e4) k /
    (half - 1))) where DiT and this port divide by ``half``: from the same weights diffusers computes a
    slightly different function.
    """
    sd = {k: sd_lib.to_numpy(v) for k, v in state_dict.items()}
    out: dict[str, np.ndarray] = {}

    def pop(key: str) -> np.ndarray:
        if key not in sd:
            raise ValueError(f"not a diffusers DiT state dict for depth {config.depth}: missing {key}")
        return sd.pop(key)

    def take(src: str, dst: str) -> None:
        for suffix in (".weight", ".bias"):
            out[dst + suffix] = pop(src + suffix)

    take("pos_embed.proj", "x_embedder.proj")
    sd.pop("pos_embed.pos_embed", None)  # a non-persistent buffer in recent diffusers
    emb = "transformer_blocks.{}.norm1.emb."
    shared = {
        "timestep_embedder.linear_1": "t_embedder.mlp.0",
        "timestep_embedder.linear_2": "t_embedder.mlp.2",
    }
    for src, dst in shared.items():
        take(emb.format(0) + src, dst)
    out["y_embedder.embedding_table.weight"] = pop(emb.format(0) + "class_embedder.embedding_table.weight")
    for i in range(1, config.depth):
        for key in [k for k in sd if k.startswith(emb.format(i))]:
            ref_key = key.replace(emb.format(i), emb.format(0))
            first = state_dict[ref_key]
            if not np.array_equal(sd_lib.to_numpy(first), sd.pop(key)):
                raise ValueError(f"{key} differs from block 0's copy; cannot map to one shared embedder")
    for i in range(config.depth):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        for suffix in (".weight", ".bias"):
            out[f"{dst}attn.qkv{suffix}"] = np.concatenate([pop(f"{src}attn1.to_{n}{suffix}") for n in "qkv"])
        take(f"{src}attn1.to_out.0", f"{dst}attn.proj")
        take(f"{src}ff.net.0.proj", f"{dst}mlp.fc1")
        take(f"{src}ff.net.2", f"{dst}mlp.fc2")
        take(f"{src}norm1.linear", f"{dst}adaLN_modulation.1")
    take("proj_out_1", "final_layer.adaLN_modulation.1")
    take("proj_out_2", "final_layer.linear")
    if sd:
        raise ValueError(sd_lib.listing("unmapped diffusers keys", sd))
    out["pos_embed"] = sincos_pos_embed_2d(config.hidden_size, config.grid_size)[None].copy()
    return out
