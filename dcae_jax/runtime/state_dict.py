"""PyTorch weights <-> Flax variables: the one reader of PyTorch weight files and the one key-table mechanism that
all four converters (autoencoder, diffusion, LPIPS, FID Inception) use.

A converter describes its model as a table of `Key`s (a Flax path, the torch key or keys it comes from, the
layout between them and, where the table knows it, the torch shape) and calls `convert`, which checks the
whole state dict against the table before reading any tensor (missing and unexpected keys), then each tensor
(floating-point dtype, finite values, torch shape, converted shape) and raises one ValueError listing every
problem. `to_torch` is the inverse, for export. `read` opens `.safetensors` lazily without torch and PyTorch
pickles with `torch.load(weights_only=True)` (a clear ImportError when torch is missing).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def _linear_to_1x1(w: np.ndarray) -> np.ndarray:
    return w.T[None, None]


# layout -> (torch -> Flax, Flax -> torch)
LAYOUTS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    "copy": (lambda w: w, lambda w: w),
    "linear": (lambda w: w.T, lambda w: w.T),  # nn.Linear (O, I) <-> Dense (I, O)
    "conv": (lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1)),  # (O, I, kh, kw) <-> HWIO
    "linear_as_1x1": (_linear_to_1x1, lambda w: w[0, 0].T),  # nn.Linear (O, I) <-> a 1x1 conv (1, 1, I, O)
}
_NDIM = {"linear": 2, "conv": 4, "linear_as_1x1": 2}


@dataclasses.dataclass(frozen=True)
class Key:
    """One Flax variable and the torch tensor(s) it comes from.

    `path`: where it goes in the converted tree (None: checked, then returned as dropped, e.g. a fixed buffer).
    `torch`: the source key(s); several are concatenated along axis 0 first (a fused projection).
    `layout`: a `LAYOUTS` name. `torch_shape`: the (concatenated) torch shape, when the table knows it.
    """

    path: tuple[str, ...] | None
    torch: tuple[str, ...]
    layout: str = "copy"
    torch_shape: tuple[int, ...] | None = None

    @property
    def flax_shape(self) -> tuple[int, ...]:
        """The converted shape (from `torch_shape`, which the table must know)."""
        if self.torch_shape is None:
            raise ValueError(f"{self.torch}: the key table does not know the torch shape")
        return tuple(LAYOUTS[self.layout][0](np.broadcast_to(np.float32(0), self.torch_shape)).shape)

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; valid: {', '.join(LAYOUTS)}")


def key(
    path: tuple[str, ...] | None, torch_key: str, layout: str = "copy", shape: tuple[int, ...] | None = None
) -> Key:
    """A one-tensor `Key`."""
    return Key(path, (torch_key,), layout, None if shape is None else tuple(shape))


def torch_keys(table: Iterable[Key]) -> set[str]:
    return {k for e in table for k in e.torch}


def listing(label: str, items: Iterable[str], limit: int = 12) -> str:
    """'label (N): [first items] ... (+M more)' for error messages (sets sorted, sequences in their order)."""
    items = sorted(items) if isinstance(items, set | frozenset | dict) else list(items)
    more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"{label} ({len(items)}): {items[:limit]}{more}"


# ------------------------------------------------------------------------------------------------
# Reading files.


class LazySafetensors(Mapping):
    """Read-only mapping over a .safetensors file that loads one tensor at a time (no torch needed).

    Converting a 1B-parameter checkpoint this way never holds the whole file in memory twice.
    """

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self._path = path = pathlib.Path(path)
        try:
            with safe_open(str(path), framework="numpy") as f:
                self._keys = list(f.keys())
            self._handle = safe_open(str(path), framework="numpy")
        except Exception as err:  # safetensors' own errors do not name the file
            size = path.stat().st_size if path.exists() else 0
            raise ValueError(
                f"{path}: not a readable safetensors file ({size} bytes; {err}); truncated download?"
            ) from None

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._keys:
            raise KeyError(key)
        try:
            return self._handle.get_tensor(key)
        except Exception as err:
            raise ValueError(f"{self._path}: cannot read tensor {key!r} ({err}); truncated file?") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def read(path: str | os.PathLike) -> Mapping[str, Any]:
    """A weights file as a mapping: `.safetensors` lazily (no torch), PyTorch pickles (.pt, .pth, .bin, .ckpt) with
    `torch.load(map_location="cpu", weights_only=True)` (no code runs; needs torch). Nothing is unwrapped."""
    from dcae_jax.runtime import paths

    if paths.is_remote(path):  # safetensors and torch read local files: a cached local copy
        if not paths.path(path).is_file():
            raise FileNotFoundError(f"{path}: no such file")
        path = paths.local_copy(path)
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return LazySafetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        try:
            import torch
        except ImportError as err:
            raise ImportError(
                f"{path} is a PyTorch pickle; reading it needs torch (pip install torch). Convert it once where "
                "torch is installed (or save it as .safetensors), then use the result without torch."
            ) from err
        return torch.load(str(path), map_location="cpu", weights_only=True)
    raise ValueError(f"{path}: unsupported weights file (expected .safetensors, {', '.join(PICKLE_SUFFIXES)})")


def unwrap(state: Mapping[str, Any], prefixes: Sequence[str] = (), wrappers: Sequence[str] = ("state_dict",)):
    """The flat state dict inside `{"state_dict": ...}`-style `wrappers`, with each of `prefixes` removed while
    *every* key has it (so `module.model.encoder...` loses both; a prefix only some keys have is a real name)."""
    for name in wrappers:
        if name in state and isinstance(state[name], Mapping):
            state = state[name]
    stripped = True
    while state and stripped:
        stripped = False
        for prefix in prefixes:
            if all(k.startswith(prefix) for k in state):
                state = PrefixView(state, prefix)
                stripped = True
    return state


class PrefixView(Mapping):
    """Keys of `base` that start with `prefix`, with the prefix removed; values read lazily."""

    def __init__(self, base: Mapping[str, Any], prefix: str):
        self._base, self._prefix = base, prefix
        self._keys = {k[len(prefix) :]: None for k in base if k.startswith(prefix)}  # an ordered set

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys:
            raise KeyError(key)
        return self._base[self._prefix + key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


# ------------------------------------------------------------------------------------------------
# Converting.


def dtype_name(t: Any) -> str:
    return str(getattr(t, "dtype", type(t).__name__)).replace("torch.", "")


def is_float(t: Any) -> bool:
    dtype = getattr(t, "dtype", None)
    if hasattr(dtype, "is_floating_point"):  # torch
        return bool(dtype.is_floating_point)
    return np.issubdtype(np.asarray(t).dtype if dtype is None else dtype, np.floating) or str(dtype) == "bfloat16"


def to_numpy(t: Any) -> np.ndarray:
    """A torch tensor (any float dtype, any device), NumPy or JAX array -> float32 NumPy."""
    if hasattr(t, "detach"):  # torch, without importing it
        t = t.detach().cpu().float().numpy()
    return np.asarray(t, np.float32)


def convert_checked(
    state: Mapping[str, Any],
    table: Sequence[Key],
    *,
    ignore: Callable[[str], bool] = lambda k: False,
    expected: Mapping[tuple[str, ...], tuple[int, ...]] | None = None,
    place: Callable[[np.ndarray], Any] = np.ascontiguousarray,
) -> tuple[dict[str, Any], dict[str, np.ndarray], list[str]]:
    """`convert` without raising: (variables, dropped, problems); the variables are incomplete when there are
    problems. Every tensor that is present is checked, so one report holds all that is wrong."""
    wanted = torch_keys(table)
    present = {k for k in state if not ignore(k)}
    problems = []
    if wanted - present:  # in the table's (the model's) order
        problems.append(listing("missing keys", [k for e in table for k in e.torch if k not in present]))
    if present - wanted:
        problems.append(listing("unexpected keys", present - wanted))
    variables: dict[str, Any] = {}
    dropped: dict[str, np.ndarray] = {}
    for e in table:
        if not all(k in present for k in e.torch):
            continue
        names = ", ".join(e.torch)
        not_float = [f"{k}: dtype {dtype_name(state[k])}" for k in e.torch if not is_float(state[k])]
        if not_float:  # e.g. a quantized checkpoint: casting would silently change the values
            problems.append(
                f"{', '.join(not_float)} (not a floating-point weight; quantized checkpoints are not supported)"
            )
            continue
        tensors = [to_numpy(state[k]) for k in e.torch]
        if not all(np.isfinite(t).all() for t in tensors):
            problems.append(f"{names}: non-finite values (NaN or inf)")
            continue
        w = tensors[0] if len(tensors) == 1 else np.concatenate(tensors, axis=0)
        if e.torch_shape is not None and tuple(w.shape) != e.torch_shape:
            problems.append(f"{names}: shape {tuple(w.shape)}, expected {e.torch_shape}")
            continue
        if w.ndim != _NDIM.get(e.layout, w.ndim):
            problems.append(
                f"{names}: shape {[tuple(t.shape) for t in tensors]}, expected a {_NDIM[e.layout]}-d weight"
            )
            continue
        arr = LAYOUTS[e.layout][0](w)
        if e.path is None:
            dropped[names] = w
            continue
        if expected is not None and tuple(arr.shape) != tuple(expected[e.path]):
            problems.append(
                f"{names}: shape {[tuple(t.shape) for t in tensors]} converts to {tuple(arr.shape)}, "
                f"model {'/'.join(e.path)} expects {tuple(expected[e.path])}"
            )
            continue
        if problems:  # the result will not be used: check the rest, place nothing more
            continue
        node = variables
        for p in e.path[:-1]:
            node = node.setdefault(p, {})
        node[e.path[-1]] = place(np.ascontiguousarray(arr, dtype=np.float32))
    return variables, dropped, problems


def convert(
    state: Mapping[str, Any],
    table: Sequence[Key],
    what: str,
    *,
    ignore: Callable[[str], bool] = lambda k: False,
    expected: Mapping[tuple[str, ...], tuple[int, ...]] | None = None,
    place: Callable[[np.ndarray], Any] = np.ascontiguousarray,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(nested variables, dropped tensors by torch key) from a torch-layout `state` and its `table`.

    Keys for which `ignore` is true are accepted and dropped (e.g. BatchNorm counters). `expected` maps a Flax
    path to its shape, checked after conversion. `place` receives each converted float32 array (e.g.
    `jnp.asarray`, one tensor at a time onto the device). One ValueError names `what` and lists every problem:
    missing and unexpected keys, non-float dtypes, non-finite values, wrong shapes.
    """
    variables, dropped, problems = convert_checked(state, table, ignore=ignore, expected=expected, place=place)
    if problems:
        raise ValueError(f"{what}:\n  " + "\n  ".join(problems))
    return variables, dropped


def to_torch(variables: Mapping[str, Any], table: Sequence[Key]) -> dict[str, np.ndarray]:
    """The inverse of `convert`: a torch-layout state dict (float32 NumPy) of `variables`; fused tensors are split
    back into equal parts along axis 0; dropped entries (path None) are left to the caller."""
    out = {}
    for e in table:
        if e.path is None:
            continue
        node: Any = variables
        for p in e.path:
            node = node[p]
        w = np.ascontiguousarray(LAYOUTS[e.layout][1](np.asarray(node, np.float32)))
        for k, part in zip(e.torch, np.split(w, len(e.torch), axis=0), strict=True):
            out[k] = np.ascontiguousarray(part)
    return out
