"""Exact weight conversion from the two PyTorch DC-AE checkpoint formats to our Flax variables.

Both name schemes are generated from the architecture (`DCAEConfig`) by one walk over the model,
so every parameter has exactly one source and every source key is accounted for:

* diffusers (`AutoencoderDC`): `encoder.down_blocks.{i}.{j}.conv1.weight`, fused qkv split into
  `attn.to_q/to_k/to_v` Linear weights (the three thirds of the fused projection, *not* per-head
  Q/K/V), `attn.to_out` Linear.
* efficientvit (original `DCAE`): `encoder.stages.{i}.op_list.{j}.main.conv1.conv.weight`, fused
  `context_module.main.qkv.conv.weight`.

Torch conv weights (O, I, kh, kw) become HWIO kernels, Linear weights (O, I) become 1x1 kernels. The rows
(`Entry`, both formats' keys) become `dcae_jax.runtime.state_dict` tables (`table`), which do the checking and
the conversion both ways (`convert_state_dict`, `to_state_dict`).

CLI: `python -m dcae_jax.convert --src SRC --out OUT` writes our export (orbax + JSON config).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from dcae_jax.autoencoder.model import DCAEConfig
from dcae_jax.runtime import state_dict

# A torch BatchNorm buffer with no Flax counterpart; accepted and dropped.
IGNORED_SUFFIXES = (".num_batches_tracked",)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One Flax variable and the torch key(s) it comes from in each format."""

    collection: str  # "params" or "batch_stats"
    path: tuple[str, ...]
    diffusers: tuple[str, ...]
    efficientvit: tuple[str, ...]
    kind: str  # "conv" | "vector" | "pointwise" (Linear in diffusers) | "qkv"


def _conv(path, dk, ek) -> list[Entry]:
    return [Entry("params", (*path, "kernel"), (f"{dk}.weight",), (f"{ek}.weight",), "conv")]


def _conv_b(path, dk, ek) -> list[Entry]:
    return _conv(path, dk, ek) + [Entry("params", (*path, "bias"), (f"{dk}.bias",), (f"{ek}.bias",), "vector")]


def _norm(path, dk, ek, batch_norm: bool) -> list[Entry]:
    out = [
        Entry("params", (*path, "scale"), (f"{dk}.weight",), (f"{ek}.weight",), "vector"),
        Entry("params", (*path, "bias"), (f"{dk}.bias",), (f"{ek}.bias",), "vector"),
    ]
    if batch_norm:
        out += [
            Entry("batch_stats", (*path, "mean"), (f"{dk}.running_mean",), (f"{ek}.running_mean",), "vector"),
            Entry("batch_stats", (*path, "var"), (f"{dk}.running_var",), (f"{ek}.running_var",), "vector"),
        ]
    return out


def _block(path, dk, ek, block_type: str, norm: str, scales: tuple[int, ...]) -> list[Entry]:
    bn = norm == "batch_norm"
    if block_type == "ResBlock":
        return (
            _conv_b((*path, "conv1"), f"{dk}.conv1", f"{ek}.main.conv1.conv")
            + _conv((*path, "conv2"), f"{dk}.conv2", f"{ek}.main.conv2.conv")
            + _norm((*path, "norm"), f"{dk}.norm", f"{ek}.main.conv2.norm", bn)
        )
    assert block_type == "EfficientViTBlock", block_type
    a, ea = (*path, "attn"), f"{ek}.context_module.main"
    out = [
        Entry(
            "params",
            (*a, "qkv", "kernel"),
            tuple(f"{dk}.attn.to_{x}.weight" for x in "qkv"),
            (f"{ea}.qkv.conv.weight",),
            "qkv",
        )
    ]
    for s in range(len(scales)):
        out += _conv((*a, f"aggreg_{s}_dw"), f"{dk}.attn.to_qkv_multiscale.{s}.proj_in", f"{ea}.aggreg.{s}.0")
        out += _conv((*a, f"aggreg_{s}_pw"), f"{dk}.attn.to_qkv_multiscale.{s}.proj_out", f"{ea}.aggreg.{s}.1")
    out.append(
        Entry("params", (*a, "proj", "kernel"), (f"{dk}.attn.to_out.weight",), (f"{ea}.proj.conv.weight",), "pointwise")
    )
    out += _norm((*a, "norm"), f"{dk}.attn.norm_out", f"{ea}.proj.norm", bn)
    m, em = (*path, "mlp"), f"{ek}.local_module.main"
    out += _conv_b((*m, "inverted_conv"), f"{dk}.conv_out.conv_inverted", f"{em}.inverted_conv.conv")
    out += _conv_b((*m, "depth_conv"), f"{dk}.conv_out.conv_depth", f"{em}.depth_conv.conv")
    out += _conv((*m, "point_conv"), f"{dk}.conv_out.conv_point", f"{em}.point_conv.conv")
    out += _norm((*m, "norm"), f"{dk}.conv_out.norm", f"{em}.point_conv.norm", False)
    return out


def entries(cfg: DCAEConfig) -> list[Entry]:
    """Every Flax variable of `DCAEModel(cfg)` with its diffusers and efficientvit source keys."""
    if not cfg.residual:
        raise ValueError("released checkpoint formats always have residual shortcuts (config.residual=True)")
    out: list[Entry] = []
    n = cfg.num_stages
    pixel = cfg.downsample_block_type == "pixel_unshuffle"
    # Encoder.
    e = ("encoder",)
    ed = cfg.encoder_layers_per_block
    if ed[0] > 0:
        out += _conv_b((*e, "project_in"), "encoder.conv_in", "encoder.project_in.conv")
    else:
        out += _conv_b((*e, "project_in", "conv"), "encoder.conv_in.conv", "encoder.project_in.conv.conv")
    for i in range(n):
        for j in range(ed[i]):
            out += _block(
                (*e, f"stage_{i}_block_{j}"),
                f"encoder.down_blocks.{i}.{j}",
                f"encoder.stages.{i}.op_list.{j}",
                cfg.encoder_block_types[i],
                "rms_norm",
                cfg.encoder_qkv_multiscales[i],
            )
        if i < n - 1 and ed[i] > 0:
            ev = f"encoder.stages.{i}.op_list.{ed[i]}.main.conv" + (".conv" if pixel else "")
            out += _conv_b((*e, f"stage_{i}_down", "conv"), f"encoder.down_blocks.{i}.{ed[i]}.conv", ev)
    # efficientvit wraps a layer with a shortcut in a ResidualBlock (`.main.`); DC-AE 1.5's latent layers have none.
    main = ".main" if cfg.encoder_out_shortcut else ""
    out += _conv_b((*e, "project_out"), "encoder.conv_out", f"encoder.project_out{main}.op_list.0.conv")
    # Decoder.
    d = ("decoder",)
    dd = cfg.decoder_layers_per_block
    main = ".main" if cfg.decoder_in_shortcut else ""
    out += _conv_b((*d, "project_in"), "decoder.conv_in", f"decoder.project_in{main}.conv")
    for i in reversed(range(n)):
        offset = 0
        if i < n - 1 and dd[i] > 0:
            out += _conv_b(
                (*d, f"stage_{i}_up", "conv"),
                f"decoder.up_blocks.{i}.0.conv",
                f"decoder.stages.{i}.op_list.0.main.conv.conv",
            )
            offset = 1
        for j in range(dd[i]):
            out += _block(
                (*d, f"stage_{i}_block_{j}"),
                f"decoder.up_blocks.{i}.{j + offset}",
                f"decoder.stages.{i}.op_list.{j + offset}",
                cfg.decoder_block_types[i],
                cfg.decoder_norm_types[i],
                cfg.decoder_qkv_multiscales[i],
            )
    out += _norm((*d, "head_norm"), "decoder.norm_out", "decoder.project_out.op_list.0", False)
    if dd[0] > 0:
        out += _conv_b((*d, "head_conv"), "decoder.conv_out", "decoder.project_out.op_list.2.conv")
    else:
        out += _conv_b((*d, "head_conv", "conv"), "decoder.conv_out.conv", "decoder.project_out.op_list.2.conv.conv")
    return out


FORMATS = ("diffusers", "efficientvit")
# Entry.kind -> the torch <-> Flax layout, per format (diffusers stores the 1x1 projections as nn.Linear).
_LAYOUT = {
    "diffusers": {"vector": "copy", "conv": "conv", "pointwise": "linear_as_1x1", "qkv": "linear_as_1x1"},
    "efficientvit": {"vector": "copy", "conv": "conv", "pointwise": "conv", "qkv": "conv"},
}


def table(cfg: DCAEConfig, fmt: str) -> list[state_dict.Key]:
    """`entries(cfg)` as the key table of one checkpoint format (Flax paths start with the collection)."""
    if fmt not in _LAYOUT:
        raise ValueError(f"unknown checkpoint format {fmt!r}; valid: {', '.join(FORMATS)}")
    return [state_dict.Key((e.collection, *e.path), getattr(e, fmt), _LAYOUT[fmt][e.kind]) for e in entries(cfg)]


def detect_format(keys: Iterator[str] | list[str]) -> str:
    """'diffusers' or 'efficientvit', from the key names."""
    keys = list(keys)
    if any(k.startswith("encoder.down_blocks.") or k == "encoder.conv_out.weight" for k in keys):
        return "diffusers"
    if any(k.startswith("encoder.stages.") or k.startswith("encoder.project_out.") for k in keys):
        return "efficientvit"
    raise ValueError(
        "cannot tell the checkpoint format: expected diffusers keys (encoder.down_blocks.*) or "
        f"efficientvit keys (encoder.stages.*); first keys: {keys[:5]}"
    )


WRAPPER_PREFIXES = ("module.", "model.")  # PyTorch DDP / DataParallel; efficientvit's trainer


def strip_wrappers(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """Accepts `{"state_dict": ...}` wrappers and `module.` (DDP) / `model.` (efficientvit .pt) prefixes on every
    key, in any nesting (`module.model.encoder...`)."""
    return state_dict.unwrap(state, WRAPPER_PREFIXES)


def expected_keys(cfg: DCAEConfig, fmt: str) -> set[str]:
    return state_dict.torch_keys(table(cfg, fmt))


def match_registry(keys: set[str], fmt: str) -> list[str]:
    """Names of released variants whose key set equals `keys` (-in/-mix share an architecture)."""
    from dcae_jax.autoencoder.model import VARIANTS

    keys = {k for k in keys if not k.endswith(IGNORED_SUFFIXES)}
    return [name for name, cfg in VARIANTS.items() if expected_keys(cfg, fmt) == keys]


def convert_state_dict(
    state: Mapping[str, Any],
    cfg: DCAEConfig,
    fmt: str | None = None,
    expected_shapes: Mapping[tuple[str, ...], tuple[int, ...]] | None = None,
) -> dict[str, Any]:
    """Torch-layout state dict (numpy arrays or torch tensors) -> Flax variables (nested dicts, on the device).

    Raises ValueError listing missing keys, unexpected keys, non-float or non-finite tensors and shape
    mismatches. `expected_shapes` maps (collection, *path) to the Flax shape; when given, every converted
    array is checked against it. Tensors go onto the device one at a time, so peak host memory stays ~1x the
    checkpoint.
    """
    state = strip_wrappers(state)
    fmt = fmt or detect_format(state.keys())
    variables, _ = state_dict.convert(
        state,
        table(cfg, fmt),
        f"checkpoint ({fmt} format) does not match DC-AE config {cfg.name!r}",
        ignore=lambda k: k.endswith(IGNORED_SUFFIXES),
        expected=expected_shapes,
        place=jnp.asarray,
    )
    return variables


def to_state_dict(variables: Mapping[str, Any], cfg: DCAEConfig, fmt: str) -> dict[str, Any]:
    """The inverse of `convert_state_dict`: a `fmt` ("diffusers" or "efficientvit") state dict, float32 NumPy, with
    the counter torch keeps beside each BatchNorm's statistics (0: torch's BatchNorm with a momentum ignores it;
    without it PyTorch warns that the layer was not initialised)."""
    out = state_dict.to_torch(variables, table(cfg, fmt))
    for key in [k for k in out if k.endswith(".running_mean")]:
        out[key.removesuffix(".running_mean") + ".num_batches_tracked"] = np.zeros((), np.int64)
    return out
