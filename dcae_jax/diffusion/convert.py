"""Released PyTorch diffusion checkpoints (efficientvit `diffusioncore`) -> our Flax params, for UViT / USiT and DiT.

USiT is the UViT network trained with another objective, so `convert_uvit_state_dict` serves both.
Each converter walks a key table generated from the config (`uvit_key_table`, `dit_key_table`): every
Flax param has exactly one torch key; every torch key is used (DiT's fixed `pos_embed` is checked
against the sin-cos table and dropped). Missing, unexpected and wrong-shape keys are all reported at
once, with the file name. Torch Linear weights (out, in) become kernels (in, out); the patch Conv2d
(D, C, p, p) becomes (p, p, C, D).

Checkpoint layouts found in the reference code (`select_weights` accepts all of them):

* Hugging Face releases (``mit-han-lab/dc-ae-f32c32-in-1.0-dit-xl-in-512px`` and the other
  ``dc-ae-*-{uvit,usit,dit}-*-in-512px*`` repos): written by ``DCAE_Diffusion_HF``, a
  ``PyTorchModelHubMixin`` module with attributes ``autoencoder`` and ``diffusion_model``, so one flat
  ``model.safetensors`` (+ ``config.json`` {"model_name": ...}) holding ``autoencoder.*`` and
  ``diffusion_model.<torch key>``: one set of weights (the README's FIDs are of EMA weights; the file
  does not say which set it holds). Only the ``diffusion_model.`` part is kept.
* efficientvit trainer checkpoints (``checkpoint.pt``, ``step_<n>.pt``; `Trainer.save_model`): a
  pickle ``{"state_dict": {"uvit.<key>" | "dit.<key>": tensor}, "ema": {decay (float, e.g. 0.9999):
  {"uvit.<key>" | "dit.<key>": tensor}}, "optimizer", "lr_scheduler", "scaler", "epoch", "global_step",
  ...}``; the prefix is the ``get_trainable_modules()`` ModuleDict name. The reference's own loader
  (``pretrained_source="dc-ae"``) takes ``list(checkpoint["ema"].values())[0]``.
* facebookresearch/DiT files (same key names as efficientvit's DiT): training checkpoints ``{"model",
  "ema", "opt", "args"}`` (flat state dicts under "model" / "ema"); released ``DiT-XL-2-*.pt`` are plain
  state dicts. (Original baofff/U-ViT files name the label table ``label_emb.weight``; the converter
  reports such keys rather than guessing.)

A ``module.`` (DDP) prefix is stripped too.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from dcae_jax.diffusion.dit import DiTConfig, sincos_pos_embed_2d
from dcae_jax.diffusion.uvit import UViTConfig
from dcae_jax.runtime import paths
from dcae_jax.runtime import state_dict as sd_lib

# Prefixes stripped (in this order, each only when *every* key has it) after the weights are selected;
# "diffusion_model." (the HF release) is handled first, dropping the bundled autoencoder.
_PREFIXES = ("module.", "uvit.", "dit.")


def _k(torch_key: str, torch_shape: tuple[int, ...], flax_path: tuple[str, ...] | None, layout: str = "copy"):
    """One row of a key table: `layout` "linear" (transpose), "conv" (OIHW -> HWIO) or "copy"; a `flax_path` of
    None is checked, then dropped (DiT's fixed pos_embed)."""
    return sd_lib.key(flax_path, torch_key, layout, torch_shape)


def _linear(tk: str, fp: tuple[str, ...], out_f: int, in_f: int, bias: bool = True) -> list[sd_lib.Key]:
    out = [_k(f"{tk}.weight", (out_f, in_f), (*fp, "kernel"), "linear")]
    if bias:
        out.append(_k(f"{tk}.bias", (out_f,), (*fp, "bias")))
    return out


def _patch_conv(tk: str, fp: tuple[str, ...], d: int, c: int, p: int) -> list[sd_lib.Key]:
    return [
        _k(f"{tk}.weight", (d, c, p, p), (*fp, "kernel"), "conv"),
        _k(f"{tk}.bias", (d,), (*fp, "bias")),
    ]


def _mlp(tk: str, fp: tuple[str, ...], d: int, hidden: int) -> list[sd_lib.Key]:
    return _linear(f"{tk}.fc1", (*fp, "fc1"), hidden, d) + _linear(f"{tk}.fc2", (*fp, "fc2"), d, hidden)


def uvit_key_table(config: UViTConfig) -> list[sd_lib.Key]:
    """Every tensor of the reference `UViT` state dict (efficientvit ``diffusioncore/models/uvit.py``)."""
    d, c, p = config.hidden_size, config.in_channels, config.patch_size
    hidden = int(d * config.mlp_ratio)

    def block(tk: str, fp: str, skip: bool) -> list[sd_lib.Key]:
        out = []
        if skip:
            out += _linear(f"{tk}.skip_linear", (fp, "skip_linear"), d, 2 * d)
        for norm in ("norm1", "norm2"):
            out += [
                _k(f"{tk}.{norm}.weight", (d,), (fp, norm, "scale")),
                _k(f"{tk}.{norm}.bias", (d,), (fp, norm, "bias")),
            ]
        out += _linear(f"{tk}.attn.qkv", (fp, "attn", "qkv"), 3 * d, d, bias=False)  # qkv_bias=False
        out += _linear(f"{tk}.attn.proj", (fp, "attn", "proj"), d, d)
        return out + _mlp(f"{tk}.mlp", (fp, "mlp"), d, hidden)

    table = _patch_conv("patch_embed.proj", ("patch_embed", "proj"), d, c, p)
    table.append(
        _k(
            "label_emb.embedding_table.weight",
            (config.num_classes + 1, d),
            ("label_emb", "embedding_table", "embedding"),
        )
    )
    table.append(_k("pos_embed", (1, config.seq_len, d), ("pos_embed",)))
    for i in range(config.depth // 2):
        table += block(f"in_blocks.{i}", f"in_blocks_{i}", skip=False)
    table += block("mid_block", "mid_block", skip=False)
    for i in range(config.depth // 2):
        table += block(f"out_blocks.{i}", f"out_blocks_{i}", skip=True)
    table += [_k("norm.weight", (d,), ("norm", "scale")), _k("norm.bias", (d,), ("norm", "bias"))]
    return table + _linear("decoder_pred", ("decoder_pred",), p * p * c, d)


def dit_key_table(config: DiTConfig) -> list[sd_lib.Key]:
    """Every tensor of the reference `DiT` state dict (efficientvit ``diffusioncore/models/dit.py``, = facebookresearch/DiT)."""
    d, c, p, f = config.hidden_size, config.in_channels, config.patch_size, config.frequency_embedding_size
    hidden = int(d * config.mlp_ratio)
    table = _patch_conv("x_embedder.proj", ("x_embedder", "proj"), d, c, p)
    table.append(_k("pos_embed", (1, config.num_patches, d), None))
    table += _linear("t_embedder.mlp.0", ("t_embedder", "mlp_0"), d, f)
    table += _linear("t_embedder.mlp.2", ("t_embedder", "mlp_2"), d, d)
    table.append(
        _k(
            "y_embedder.embedding_table.weight",
            (config.label_table_size, d),
            ("y_embedder", "embedding_table", "embedding"),
        )
    )
    for i in range(config.depth):
        tk, fp = f"blocks.{i}", f"blocks_{i}"
        table += _linear(f"{tk}.attn.qkv", (fp, "attn", "qkv"), 3 * d, d)  # qkv_bias=True
        table += _linear(f"{tk}.attn.proj", (fp, "attn", "proj"), d, d)
        table += _mlp(f"{tk}.mlp", (fp, "mlp"), d, hidden)
        table += _linear(f"{tk}.adaLN_modulation.1", (fp, "adaLN_modulation_1"), 6 * d, d)
    table += _linear("final_layer.adaLN_modulation.1", ("final_layer", "adaLN_modulation_1"), 2 * d, d)
    return table + _linear("final_layer.linear", ("final_layer", "linear"), p * p * config.out_channels, d)


# ------------------------------------------------------------------------------------------------
# Conversion.


def _describe(config: UViTConfig | DiTConfig) -> str:
    kind = "UViT" if isinstance(config, UViTConfig) else "DiT"
    return (
        f"{kind} {config.name!r} (depth={config.depth}, hidden_size={config.hidden_size}, "
        f"in_channels={config.in_channels}, input_size={config.input_size}, patch_size={config.patch_size})"
    )


def _convert(
    table: list[sd_lib.Key], state_dict: Mapping[str, Any], config: UViTConfig | DiTConfig, source: str | None
) -> tuple[dict, dict[str, np.ndarray]]:
    """(nested Flax params, dropped tensors by torch key); raises listing every problem at once."""
    where = f"{source}: " if source else ""
    return sd_lib.convert(state_dict, table, f"{where}state dict does not match {_describe(config)}")


def convert_uvit_state_dict(state_dict: Mapping[str, Any], config: UViTConfig, *, source: str | None = None) -> dict:
    """Reference UViT / USiT state dict (torch key -> tensor) -> `UViT(config)` params (float32 NumPy).

    `source` (a file name) prefixes error messages. Select the weights first (`select_weights`) when the
    mapping is a whole checkpoint.
    """
    params, _ = _convert(uvit_key_table(config), state_dict, config, source)
    return params


def convert_dit_state_dict(state_dict: Mapping[str, Any], config: DiTConfig, *, source: str | None = None) -> dict:
    """Reference DiT state dict -> `DiT(config)` params (float32 NumPy).

    The torch `pos_embed` (a frozen parameter) must equal our fixed 2D sin-cos table; it is not a Flax param.
    """
    params, dropped = _convert(dit_key_table(config), state_dict, config, source)
    ours = sincos_pos_embed_2d(config.hidden_size, config.grid_size)[None]
    err = float(np.max(np.abs(dropped["pos_embed"] - ours)))
    if not err <= 1e-4:
        where = f"{source}: " if source else ""
        raise ValueError(
            f"{where}pos_embed differs from the fixed 2D sin-cos embedding of a {config.grid_size}x{config.grid_size} "
            f"grid (max abs difference {err:.3g}); this DiT does not use DiT's fixed position embedding"
        )
    return params


# ------------------------------------------------------------------------------------------------
# Reading checkpoints.


def _is_tensor_dict(m: Any) -> bool:
    """A flat state dict: judged from its first value only, so a lazy file is not read."""
    return isinstance(m, Mapping) and len(m) > 0 and hasattr(next(iter(m.values())), "shape")


def select_weights(checkpoint: Mapping[Any, Any], prefer_ema: bool = True) -> Mapping[str, Any]:
    """The model's flat state dict inside any of the layouts in the module docstring.

    `prefer_ema` picks the EMA weights where a checkpoint holds both (trainer: ``"ema"`` ->
    ``{decay: state_dict}``, first decay as the reference; DiT: ``"ema"``), else the raw weights
    (``"state_dict"`` / ``"model"``). Prefixes ``diffusion_model.`` (keeping only those keys, i.e.
    dropping the bundled autoencoder), ``module.``, ``uvit.`` and ``dit.`` are removed.
    """
    ckpt: Any = checkpoint
    if not _is_tensor_dict(ckpt):
        raw = next((k for k in ("state_dict", "model") if isinstance(ckpt.get(k), Mapping)), None)
        ema = ckpt.get("ema")
        if isinstance(ema, Mapping) and ema and not _is_tensor_dict(ema):  # trainer: {decay: state_dict}
            ema = next(iter(ema.values()))
        ema = ema if _is_tensor_dict(ema) else None
        chosen = ema if (prefer_ema or raw is None) and ema is not None else (ckpt[raw] if raw else None)
        if chosen is None:
            top = sorted(str(k) for k in ckpt)
            raise ValueError(
                f"no model weights found: expected a flat state dict, or 'ema' / 'state_dict' / 'model'; got keys {top}"
            )
        ckpt = chosen
    if any(k.startswith("diffusion_model.") for k in ckpt):  # the HF release bundles the autoencoder
        ckpt = sd_lib.PrefixView(ckpt, "diffusion_model.")
    return sd_lib.unwrap(ckpt, _PREFIXES, wrappers=())


def _find_weights_file(d: pathlib.Path) -> pathlib.Path:
    for name in ("model.safetensors", "diffusion_pytorch_model.safetensors", "checkpoint.pt", "model.pt"):
        if (d / name).exists():
            return d / name
    cands = sorted([*d.glob("*.safetensors"), *d.glob("*.pt"), *d.glob("*.pth")])
    if len(cands) == 1:
        return cands[0]
    raise FileNotFoundError(
        f"{d}: expected model.safetensors or a single .safetensors / .pt / .pth file, found {[c.name for c in cands]}"
    )


def load_diffusion_state_dict(path: str | os.PathLike, *, prefer_ema: bool = True) -> Mapping[str, Any]:
    """The diffusion model's state dict from a file or directory: `.safetensors` read lazily without torch,
    `.pt` / `.pth` with ``torch.load(weights_only=True)`` (a clear ImportError without torch), then
    `select_weights`."""
    p = paths.local_copy(path) if paths.is_remote(path) else pathlib.Path(path).expanduser()
    if p.is_dir():
        p = _find_weights_file(p)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    raw = sd_lib.read(p)
    try:
        return select_weights(raw, prefer_ema=prefer_ema)
    except ValueError as err:
        raise ValueError(f"{p}: {err}") from None


def load_diffusion_params(path: str | os.PathLike, config: UViTConfig | DiTConfig, *, prefer_ema: bool = True) -> dict:
    """`load_diffusion_state_dict` + the converter for `config`'s model (errors name the file)."""
    state = load_diffusion_state_dict(path, prefer_ema=prefer_ema)
    if isinstance(config, DiTConfig):
        return convert_dit_state_dict(state, config, source=str(path))
    if isinstance(config, UViTConfig):
        return convert_uvit_state_dict(state, config, source=str(path))
    raise TypeError(f"config must be a UViTConfig or DiTConfig, got {type(config).__name__}")
