"""LPIPS (Zhang et al., CVPR 2018) as one Flax linen module: VGG16 for training losses, AlexNet for evaluation.

Computes what the `lpips` package (v0.1 heads; also behind torchmetrics'
`LearnedPerceptualImagePatchSimilarity`) computes in eval mode:

1. shift/scale the [-1, 1] input with lpips' fixed per-channel constants (`SHIFT`, `SCALE`);
2. run torchvision's `features` trunk up to five ReLU taps (VGG16: relu1_2, relu2_2, relu3_3, relu4_3,
   relu5_3; AlexNet: relu1..relu5), with torch's exact conv padding and floor-mode, unpadded max-pools;
3. at each tap unit-normalize every feature vector over channels (`x / (||x|| + 1e-10)`), square the
   difference of the two images' features, weight channels with the learned 1x1 head (no bias; the
   head's dropout is off in eval), average over space;
4. sum the five layers: one distance per image.

Inputs are NHWC in [-1, 1] (lpips' `normalize=False` convention; pass `2 * x - 1` for [0, 1] images).
All math runs in float32 and, by default, at `Precision.HIGHEST`, so TPU/GPU matmuls do not drop to
bf16/TF32; pass `precision=None` for speed where a training loss does not need exactness.

Weights: nothing is downloaded, here or anywhere at import time. The trunk comes from torchvision's
ImageNet checkpoints (`vgg16-397923af.pth`, `alexnet-owt-7be5be79.pth`), the linear heads from lpips'
`weights/v0.1/{vgg,alex}.pth`, which the `lpips` pip package ships inside itself
(`<site-packages>/lpips/weights/v0.1/`). `python -m dcae_jax.fetch_weights` makes the genuine files without
torch (`dcae_jax.metrics.weights`); users who have the torchvision files convert them once (needs torch):

    python -m dcae_jax.convert_weights --lpips=vgg --backbone=vgg16-397923af.pth --lin=vgg.pth --out=lpips_vgg.npz

and use `module, variables = load_lpips("lpips_vgg.npz")`; `module.apply(variables, x0, x1)` -> (B,).
The weights are constants: keep them out of the optimizer (close over `variables`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dcae_jax.metrics._variables import check_variables
from dcae_jax.runtime import paths, state_dict

Array = jax.Array

# lpips' ScalingLayer: ImageNet mean/std re-expressed for [-1, 1] inputs.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10  # lpips `normalize_tensor`


@dataclasses.dataclass(frozen=True)
class Conv:
    """A conv + ReLU of torchvision's `features`; `index` is the conv's position there (the ReLU is index + 1)."""

    index: int
    features: int
    kernel: int
    stride: int = 1
    padding: int = 1


@dataclasses.dataclass(frozen=True)
class MaxPool:
    """torch `MaxPool2d(kernel, stride)`: no padding, floor mode (a trailing partial window is dropped)."""

    kernel: int
    stride: int


TAP = "tap"  # an LPIPS layer: the output of the preceding ReLU


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A trunk as the op sequence of torchvision's `features`, plus where its published weights live."""

    name: str
    ops: tuple[Conv | MaxPool | str, ...]
    torchvision_file: str

    @property
    def url(self) -> str:
        return f"https://download.pytorch.org/models/{self.torchvision_file}"

    @property
    def tap_channels(self) -> tuple[int, ...]:
        out, c = [], 3
        for op in self.ops:
            if isinstance(op, Conv):
                c = op.features
            elif op == TAP:
                out.append(c)
        return tuple(out)


def _vgg16_ops() -> tuple[Conv | MaxPool | str, ...]:
    ops: list[Conv | MaxPool | str] = []
    i = 0  # running index into torchvision's vgg16 `features` (conv, relu, ..., pool)
    for stage, (width, n_convs) in enumerate([(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]):
        if stage:
            ops.append(MaxPool(2, 2))
            i += 1
        for _ in range(n_convs):
            ops.append(Conv(i, width, 3))
            i += 2
        ops.append(TAP)  # relu{stage+1}_{n_convs}; torchvision's final pool (index 30) is not used
    return tuple(ops)


BACKBONES: dict[str, Backbone] = {
    "vgg": Backbone("vgg", _vgg16_ops(), "vgg16-397923af.pth"),
    "alex": Backbone(
        "alex",
        (
            Conv(0, 64, 11, stride=4, padding=2),
            TAP,
            MaxPool(3, 2),
            Conv(3, 192, 5, padding=2),
            TAP,
            MaxPool(3, 2),
            Conv(6, 384, 3),
            TAP,
            Conv(8, 256, 3),
            TAP,
            Conv(10, 256, 3),
            TAP,
        ),
        "alexnet-owt-7be5be79.pth",
    ),
}


def get_backbone(net: str) -> Backbone:
    """Looks up a trunk by name; raises with the valid names."""
    if net not in BACKBONES:
        raise ValueError(f"unknown LPIPS network {net!r}; valid names: {sorted(BACKBONES)}")
    return BACKBONES[net]


# ----------------------------------------------------------------------------------------------
# The module.


def unit_normalize(x: Array, eps: float = NORM_EPS) -> Array:
    """x / (||x||_channels + eps), as lpips `normalize_tensor`, with finite gradients at x == 0.

    `sqrt` has an infinite derivative at 0, so an all-zero feature vector gives 0 * inf = NaN gradients. In LPIPS
    the preceding ReLU's backward (a select) already masks those, but the double `where` makes the helper safe on
    its own, with the forward value unchanged.
    """
    sq = jnp.sum(x * x, axis=-1, keepdims=True)  # (B, H, W, 1)
    pos = sq > 0
    norm = jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)
    return x / (norm + eps)


class NetLin(nn.Module):
    """lpips `NetLinLayer` in eval mode: a bias-free 1x1 conv to one channel. Kernel (1, 1, C, 1)."""

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (1, 1, x.shape[-1], 1), jnp.float32)
        return jnp.einsum("bhwc,c->bhw", x, kernel[0, 0, :, 0], precision=self.precision)  # (B, H, W)


class Trunk(nn.Module):
    """torchvision's `features` up to the last LPIPS tap: (B, H, W, 3) -> the five tap activations."""

    net: str = "alex"
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> list[Array]:
        taps = []
        for op in get_backbone(self.net).ops:
            h, w = x.shape[1:3]
            if isinstance(op, Conv):
                if min(h, w) + 2 * op.padding < op.kernel:
                    raise ValueError(f"{h}x{w} activations are too small for {op} of the {self.net} trunk")
                x = nn.Conv(
                    op.features,
                    (op.kernel, op.kernel),
                    strides=(op.stride, op.stride),
                    padding=((op.padding, op.padding), (op.padding, op.padding)),
                    precision=self.precision,
                    name=f"features_{op.index}",
                )(x)
                x = nn.relu(x)
            elif isinstance(op, MaxPool):
                if min(h, w) < op.kernel:
                    raise ValueError(f"{h}x{w} activations are too small for {op} of the {self.net} trunk")
                x = nn.max_pool(x, (op.kernel, op.kernel), strides=(op.stride, op.stride), padding="VALID")
            else:
                taps.append(x)  # (B, h, w, C)
        return taps


class LPIPS(nn.Module):
    """Per-image LPIPS distance between two NHWC batches in [-1, 1]: `(B, H, W, 3) x 2 -> (B,)`.

    `net="alex"` is the lpips/torchmetrics default (evaluation); `net="vgg"` is the usual training loss.
    Parameters: `trunk/features_{i}` (torchvision's `features.{i}` convs, HWIO kernels) and `lin{n}` heads.
    """

    net: str = "alex"
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x0: Array, x1: Array) -> Array:
        get_backbone(self.net)
        if x0.shape != x1.shape:
            raise ValueError(f"image shapes differ: {tuple(x0.shape)} vs {tuple(x1.shape)}")
        if x0.ndim != 4 or x0.shape[-1] != 3:
            raise ValueError(f"expected NHWC RGB batches, got shape {tuple(x0.shape)}")
        shift, scale = jnp.asarray(SHIFT, jnp.float32), jnp.asarray(SCALE, jnp.float32)
        # Two passes of one shared trunk, not one pass of both batches: when only x0 needs a gradient (a
        # training loss against fixed targets), autodiff then skips x1's backward pass entirely, which makes
        # the quickstart's L1 + LPIPS(VGG) step ~18% faster at the same values (docs/performance.md).
        trunk = Trunk(self.net, self.precision, name="trunk")
        feats0 = trunk((x0.astype(jnp.float32) - shift) / scale)
        feats1 = trunk((x1.astype(jnp.float32) - shift) / scale)
        dist = jnp.zeros((x0.shape[0],), jnp.float32)
        for n, (f0, f1) in enumerate(zip(feats0, feats1, strict=True)):
            # Under jit XLA may fuse the normalization into this difference and contract x0 * r0 - x1 * r1 into an
            # FMA, so identical images give ~1e-17 rather than torch's exact 0 (float32 rounding, not a bias).
            d = (unit_normalize(f0) - unit_normalize(f1)) ** 2  # (B, h, w, C)
            d = NetLin(self.precision, name=f"lin{n}")(d)  # (B, h, w)
            dist = dist + jnp.mean(d, axis=(1, 2))
        return dist


# ----------------------------------------------------------------------------------------------
# Weight conversion (torchvision trunk + lpips heads -> Flax variables).


def weight_entries(net: str) -> dict[str, list[state_dict.Key]]:
    """Every parameter of `LPIPS(net)` as key tables, one per source state dict, generated from the trunk."""
    backbone = get_backbone(net)
    trunk, c = [], 3
    for op in backbone.ops:
        if isinstance(op, Conv):
            name, k = f"features_{op.index}", f"features.{op.index}"
            shape = (op.features, c, op.kernel, op.kernel)
            trunk.append(state_dict.key(("params", "trunk", name, "kernel"), f"{k}.weight", "conv", shape))
            trunk.append(state_dict.key(("params", "trunk", name, "bias"), f"{k}.bias", "copy", (op.features,)))
            c = op.features
    lin = [
        state_dict.key(("params", f"lin{n}", "kernel"), f"lin{n}.model.1.weight", "conv", (1, ch, 1, 1))
        for n, ch in enumerate(backbone.tap_channels)
    ]
    return {"backbone": trunk, "lin": lin}


# Keys of the published torchvision checkpoints that LPIPS does not use: accepted and dropped.
IGNORED_PREFIXES = ("classifier.",)


def convert_lpips_weights(
    backbone_state_dict: Mapping[str, Any], lin_state_dict: Mapping[str, Any], net: str
) -> dict[str, Any]:
    """torchvision trunk state dict (`features.{i}.weight/bias`) + lpips heads (`lin{n}.model.1.weight`) -> variables.

    Every key is mapped (torchvision's `classifier.*` is accepted and dropped); missing or unexpected keys
    and shape mismatches raise one ValueError listing them all. Torch conv weights (O, I, kh, kw) become
    HWIO kernels. Values may be torch tensors or arrays.
    """
    variables: dict[str, Any] = {"params": {}}
    problems = []
    tables = weight_entries(net)
    for source, sd in (("backbone", backbone_state_dict), ("lin", lin_state_dict)):
        converted, _, found = state_dict.convert_checked(
            sd,
            tables[source],
            ignore=(lambda k: k.startswith(IGNORED_PREFIXES)) if source == "backbone" else (lambda k: False),
            place=jnp.asarray,
        )
        problems += [f"{source} state dict: {p}" for p in found]
        variables["params"].update(converted.get("params", {}))
    if problems:
        raise ValueError(f"cannot convert LPIPS {net!r} weights:\n  " + "\n  ".join(problems))
    return variables


def _check_variables(variables: Mapping[str, Any], net: str, where: str) -> dict[tuple[str, ...], np.ndarray]:
    """Flattens `variables` and checks them against `LPIPS(net)`'s parameter names and shapes."""
    return check_variables(
        variables,
        {e.path: e.flax_shape for table in weight_entries(net).values() for e in table},
        where,
        f"LPIPS {net!r}",
    )


# ----------------------------------------------------------------------------------------------
# One-file storage (.npz, no pickle) and loading.


def save_lpips_weights(variables: Mapping[str, Any], path: str | os.PathLike, net: str) -> None:
    """Writes `variables` of `LPIPS(net)` and the net name to one .npz file (exactly at `path`)."""
    flat = _check_variables(variables, net, "save_lpips_weights")
    arrays = {"/".join(k): v for k, v in flat.items()}
    paths.save_npz(path, net=np.array(net), **arrays)


def conversion_help(path: str | os.PathLike, net: str | None = None) -> str:
    """The exact commands that produce `path` (for one net, or for both when unknown)."""
    nets = [net] if net else [n for n in BACKBONES if n in pathlib.Path(path).name] or sorted(BACKBONES)
    lines = []
    for n in nets:
        b = BACKBONES[n]
        lines += [
            f"  # {n}: on a machine that is online (torch is needed for the conversion)",
            f"  wget {b.url}",
            "  pip install lpips  # ships the linear heads as <site-packages>/lpips/weights/v0.1/{vgg,alex}.pth",
            f"  python -m dcae_jax.convert_weights --lpips={n} --backbone={b.torchvision_file} --out={path}",
            f"  #   (--lin defaults to lpips' shipped weights/v0.1/{n}.pth; or fetch it from "
            f"https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/{n}.pth)",
        ]
    return "\n".join(lines)


def load_lpips(path: str | os.PathLike) -> tuple[LPIPS, dict[str, Any]]:
    """Reads a `save_lpips_weights` file (local or gs://) -> (`LPIPS(net)`, variables)."""
    path = paths.path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: LPIPS weights not found. Nothing is downloaded at run time; `python -m dcae_jax.fetch_weights` "
            "makes the genuine files (no torch needed), or convert the PyTorch files:\n" + conversion_help(path)
        )
    z = paths.load_npz(path)
    if "net" not in z:
        kind = f" (it is a {str(z['kind'])!r} file)" if "kind" in z else ""
        raise ValueError(
            f"{path}: not an LPIPS weights file{kind}: no 'net' entry; {state_dict.listing('keys', set(z), 5)}"
        )
    net = str(z["net"])
    flat = {tuple(k.split("/")): z[k] for k in z if k != "net"}
    get_backbone(net)
    flat = _check_variables(traverse_util.unflatten_dict(flat), net, str(path))
    variables = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})
    return LPIPS(net=net), variables


# ----------------------------------------------------------------------------------------------
# CLI.


def default_lin_path(net: str) -> pathlib.Path:
    """lpips' shipped `weights/v0.1/{net}.pth`, located without importing lpips (or torch)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"--lin not given and the lpips package is not installed; pip install lpips (it ships "
            f"lpips/weights/v0.1/{net}.pth) or pass the file"
        )
    path = pathlib.Path(spec.origin).parent / "weights" / "v0.1" / f"{get_backbone(net).name}.pth"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not in the installed lpips package; pass --lin")
    return path


def convert_files(net: str, backbone: str | os.PathLike, lin: str | os.PathLike | None, out: str | os.PathLike) -> int:
    """torchvision trunk + lpips v0.1 heads (.pth; `lin` None: the lpips package's copy) -> one .npz at `out`.

    Returns the number of parameters written (reading .pth needs torch)."""
    if net not in BACKBONES:
        raise ValueError(f"unknown LPIPS net {net!r}; valid: {', '.join(sorted(BACKBONES))}")
    lin = pathlib.Path(lin) if lin else default_lin_path(net)
    variables = convert_lpips_weights(state_dict.read(backbone), state_dict.read(lin), net)
    save_lpips_weights(variables, out, net)
    return sum(int(np.size(v)) for v in jax.tree_util.tree_leaves(variables))
