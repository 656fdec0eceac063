"""FID (Heusel et al., 2017): pytorch-fid's InceptionV3 in Flax, streaming feature statistics, the Fréchet distance.

The network is the one behind every published FID number computed with pytorch-fid (and the DC-AE reference
evaluator, efficientvit `apps/metrics/fid`): `pytorch_fid.inception.fid_inception_v3`, i.e. torchvision's
Inception3 with the TF 2015-12-05 graph's quirks patched in, carrying the `pt_inception-2015-12-05` weights.
`FIDInception` reproduces `InceptionV3([3])` (pool3 features, 2048-d) in eval mode:

* input: resized to 299x299 with `F.interpolate(mode="bilinear", align_corners=False)` semantics (half-pixel
  centers, no antialiasing, edge clamping), only when it is not 299x299 already; values in [-1, 1];
* `BasicConv2d` = conv (no bias) + BatchNorm (eps 0.001, running statistics) + ReLU;
* the FID blocks average-pool their pool branch with `count_include_pad=False` (Mixed_5b-d, 6b-e, 7b), and
  Mixed_7c (`FIDInceptionE_2`) max-pools it instead; the reduction pools are 3x3/2 max-pools without padding;
* pool3 = global average over the final 8x8 map.

Inputs are NHWC, either float in [-1, 1] (our image convention) or uint8 in [0, 255]; uint8 becomes u / 255
(what pytorch-fid's `ToTensor` feeds) and then 2x - 1. Resizing before or after that affine map is the same up to
float rounding. All math is float32 at `Precision.HIGHEST` (no TF32/bf16 convolutions on GPU/TPU) by default.

Weights: nothing is downloaded, here or anywhere at run time. `python -m dcae_jax.fetch_weights` makes the
genuine file without torch (`dcae_jax.metrics.weights`); users who have pytorch-fid's release asset convert it
once (reading the .pth needs torch):

    wget https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
    python -m dcae_jax.convert_weights --fid_inception=pt_inception-2015-12-05-6726825d.pth --out=fid_inception.npz

    module, variables = load_fid_inception("fid_inception.npz")
    feats = module.apply(variables, images)                      # (B, 2048) float32

Statistics: `FeatureStats` accumulates count, sum and sum of outer products in float64 on the host (masked, so
padded batch entries are left out), merges across devices / processes (`merge`, `allreduce_stats`), and yields
(mu, sigma) with `np.cov`'s unbiased normalization. Stats files are pytorch-fid's `--save-stats` format
(`np.savez_compressed(path, mu=..., sigma=...)`), readable and writable by both. `frechet_distance` is pytorch-fid's
`calculate_frechet_distance` (scipy `sqrtm`, float64).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pathlib
import warnings
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dcae_jax.metrics._variables import check_variables
from dcae_jax.runtime import distributed, paths, state_dict

Array = jax.Array

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_FILE}"
FID_WEIGHTS_SHA256_PREFIX = "6726825d"  # torch hub's naming convention: the file's sha256 starts with this
INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3
MIN_INPUT_SIZE = 75  # the smallest input the network accepts without resizing (torchvision's `min_size`)

# ----------------------------------------------------------------------------------------------
# Input handling.


@functools.lru_cache(maxsize=32)
def _bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of torch's `upsample_bilinear2d(align_corners=False)` along one axis.

    As torch's kernel computes them: scale = in/out in float32, src = max(scale * (dst + 0.5) - 0.5, 0) with one
    rounding (the compiled kernel contracts it into an FMA; the float64 product of float32 values is exact, so
    float64 then float32 gives the same), i0 = floor(src), i1 = min(i0 + 1, n_in - 1), weights (1 - l, l) with
    l = src - i0. Bit-identical to torch 2.x's CPU weights (an unfused float32 version is off by up to 4e-6).
    """
    scale = np.float64(np.float32(n_in) / np.float32(n_out))
    src = (scale * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int32), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    l1 = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    return i0, i1, (np.float32(1.0) - l1).astype(np.float32), l1


def resize_bilinear(x: Array, size: tuple[int, int]) -> Array:
    """NHWC bilinear resize with `torch.nn.functional.interpolate(..., mode="bilinear", align_corners=False)`.

    Unlike `jax.image.resize`, no antialiasing when downsampling (torch has none), so results match torch's.
    Separable: along W, then along H, in torch's order of operations.
    """
    (h, w), (oh, ow) = x.shape[1:3], size
    if (h, w) == (oh, ow):
        return x
    i0, i1, l0, l1 = _bilinear_taps(w, ow)
    x = x[:, :, i0] * l0[:, None] + x[:, :, i1] * l1[:, None]
    i0, i1, l0, l1 = _bilinear_taps(h, oh)
    return x[:, i0] * l0[:, None, None] + x[:, i1] * l1[:, None, None]


def to_model_range(images: Array) -> Array:
    """uint8 [0, 255] -> u / 255 * 2 - 1 (pytorch-fid's ToTensor + normalize); float [-1, 1] as is. float32."""
    x = jnp.asarray(images)
    if x.dtype == jnp.uint8:
        return x.astype(jnp.float32) / 255.0 * 2.0 - 1.0
    return x.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# The network (module and parameter names follow torchvision's / pytorch-fid's attribute names).


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv(nn.Module):
    """torchvision `BasicConv2d` in eval mode: conv (no bias) -> BatchNorm(eps=0.001, running stats) -> ReLU."""

    features: int
    kernel: int | tuple[int, int]
    stride: int = 1
    padding: int | tuple[int, int] = 0
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> Array:
        ph, pw = _pair(self.padding)
        x = nn.Conv(
            self.features,
            _pair(self.kernel),
            strides=(self.stride, self.stride),
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            precision=self.precision,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x: Array) -> Array:
    """`F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)`: TF's SAME average (pads not counted)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: Array) -> Array:
    """`F.max_pool2d(x, 3, stride=1, padding=1)` (padding is -inf)."""
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_reduce(x: Array) -> Array:
    """`nn.MaxPool2d(3, stride=2)`: no padding, floor mode."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    """`FIDInceptionA` (Mixed_5b-d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg-pool(no pad count)-1x1."""

    pool_features: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = functools.partial(BasicConv, precision=self.precision)
        b1 = c(64, 1, name="branch1x1")(x)
        b5 = c(64, 5, padding=2, name="branch5x5_2")(c(48, 1, name="branch5x5_1")(x))
        b3 = c(64, 1, name="branch3x3dbl_1")(x)
        b3 = c(96, 3, padding=1, name="branch3x3dbl_3")(c(96, 3, padding=1, name="branch3x3dbl_2")(b3))
        bp = c(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """torchvision `InceptionB` (Mixed_6a, 35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | max-pool 3x3/2."""

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = functools.partial(BasicConv, precision=self.precision)
        b3 = c(384, 3, stride=2, name="branch3x3")(x)
        bd = c(64, 1, name="branch3x3dbl_1")(x)
        bd = c(96, 3, stride=2, name="branch3x3dbl_3")(c(96, 3, padding=1, name="branch3x3dbl_2")(bd))
        return jnp.concatenate([b3, bd, _max_pool_reduce(x)], axis=-1)


class InceptionC(nn.Module):
    """`FIDInceptionC` (Mixed_6b-e): 1x1 | factorized 7x7 | double factorized 7x7 | avg-pool(no pad count)-1x1."""

    channels_7x7: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c, c7 = functools.partial(BasicConv, precision=self.precision), self.channels_7x7
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        b1 = c(192, 1, name="branch1x1")(x)
        b7 = c(c7, 1, name="branch7x7_1")(x)
        b7 = c(c7, **row, name="branch7x7_2")(b7)
        b7 = c(192, **col, name="branch7x7_3")(b7)
        bd = c(c7, 1, name="branch7x7dbl_1")(x)
        bd = c(c7, **col, name="branch7x7dbl_2")(bd)
        bd = c(c7, **row, name="branch7x7dbl_3")(bd)
        bd = c(c7, **col, name="branch7x7dbl_4")(bd)
        bd = c(192, **row, name="branch7x7dbl_5")(bd)
        bp = c(192, 1, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """torchvision `InceptionD` (Mixed_7a, 17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max-pool 3x3/2."""

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = functools.partial(BasicConv, precision=self.precision)
        b3 = c(320, 3, stride=2, name="branch3x3_2")(c(192, 1, name="branch3x3_1")(x))
        b7 = c(192, 1, name="branch7x7x3_1")(x)
        b7 = c(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = c(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = c(192, 3, stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_reduce(x)], axis=-1)


class InceptionE(nn.Module):
    """`FIDInceptionE_1` (pool="avg", Mixed_7b) and `FIDInceptionE_2` (pool="max", Mixed_7c).

    The max pool in Mixed_7c is a quirk of the TF 2015 graph the FID weights come from; pytorch-fid keeps it.
    """

    pool: str = "avg"
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.pool not in ("avg", "max"):
            raise ValueError(f"InceptionE pool must be 'avg' or 'max', got {self.pool!r}")
        c = functools.partial(BasicConv, precision=self.precision)
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        b1 = c(320, 1, name="branch1x1")(x)
        b3 = c(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate([c(384, **row, name="branch3x3_2a")(b3), c(384, **col, name="branch3x3_2b")(b3)], -1)
        bd = c(448, 1, name="branch3x3dbl_1")(x)
        bd = c(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([c(384, **row, name="branch3x3dbl_3a")(bd), c(384, **col, name="branch3x3dbl_3b")(bd)], -1)
        pooled = _avg_pool_3x3(x) if self.pool == "avg" else _max_pool_3x3(x)
        bp = c(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInception(nn.Module):
    """pytorch-fid's `InceptionV3([3])` with `fid_inception_v3()`: NHWC images -> pool3 features (B, 2048).

    Images: float in [-1, 1] or uint8 (see module docstring). `resize_input=False` skips the 299x299 resize
    (the network is fully convolutional; inputs must then be at least 75x75). Variables: `params`
    (conv kernels HWIO, BatchNorm scale/bias) and `batch_stats` (BatchNorm running mean/var), under torchvision's
    attribute names (`Conv2d_1a_3x3/conv/kernel`, `Mixed_7c/branch_pool/bn/mean`, ...).
    """

    resize_input: bool = True
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, images: Array) -> Array:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected NHWC RGB images, got shape {tuple(images.shape)}")
        x = to_model_range(images)
        if self.resize_input:
            x = resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
        elif min(x.shape[1:3]) < MIN_INPUT_SIZE:
            raise ValueError(f"{x.shape[1]}x{x.shape[2]} images are too small (>= {MIN_INPUT_SIZE}) without resizing")
        c = functools.partial(BasicConv, precision=self.precision)
        p = self.precision
        # Block 0: 299 -> 147 -> 73.
        x = c(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
        x = c(32, 3, name="Conv2d_2a_3x3")(x)
        x = _max_pool_reduce(c(64, 3, padding=1, name="Conv2d_2b_3x3")(x))
        # Block 1: 73 -> 71 -> 35.
        x = c(80, 1, name="Conv2d_3b_1x1")(x)
        x = _max_pool_reduce(c(192, 3, name="Conv2d_4a_3x3")(x))
        # Block 2: 35 -> 17.
        x = InceptionA(32, p, name="Mixed_5b")(x)
        x = InceptionA(64, p, name="Mixed_5c")(x)
        x = InceptionA(64, p, name="Mixed_5d")(x)
        x = InceptionB(p, name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c7, p, name=name)(x)
        # Block 3: 17 -> 8 -> pool3.
        x = InceptionD(p, name="Mixed_7a")(x)
        x = InceptionE("avg", p, name="Mixed_7b")(x)
        x = InceptionE("max", p, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d(1) -> (B, 2048)


# ----------------------------------------------------------------------------------------------
# Weight conversion (pytorch-fid state dict -> Flax variables).

# Flax leaf name -> torch suffix, per collection.
_LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
# Keys of the published file that pool3 features do not use: accepted and dropped.
IGNORED_KEYS = ("fc.weight", "fc.bias")  # the 1008-way logits layer
IGNORED_SUFFIXES = (".num_batches_tracked",)  # BatchNorm counters (absent from the 2015 port, present in new saves)


@functools.lru_cache(maxsize=1)
def _variable_shapes() -> tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]:
    x = jax.ShapeDtypeStruct((1, MIN_INPUT_SIZE, MIN_INPUT_SIZE, 3), jnp.float32)
    abstract = jax.eval_shape(FIDInception(resize_input=False).init, jax.random.key(0), x)
    flat = traverse_util.flatten_dict(abstract)
    return tuple((k, tuple(v.shape)) for k, v in sorted(flat.items()))


def weight_entries() -> list[state_dict.Key]:
    """Every variable of `FIDInception` with its pytorch-fid key, generated from the module itself."""
    out = []
    for path, shape in _variable_shapes():
        collection, *modules, leaf = path
        torch_key = ".".join([*modules, _LEAF_TO_TORCH[(collection, leaf)]])
        conv = len(shape) == 4
        torch_shape = tuple(shape[i] for i in (3, 2, 0, 1)) if conv else shape  # HWIO -> (O, I, kh, kw)
        out.append(state_dict.key(path, torch_key, "conv" if conv else "copy", torch_shape))
    return out


def _ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.endswith(IGNORED_SUFFIXES)


def convert_fid_inception(state: Mapping[str, Any]) -> dict[str, Any]:
    """pytorch-fid's `pt_inception-2015-12-05` state dict (`fid_inception_v3().state_dict()` keys) -> variables.

    Every key is mapped; `fc.*` (logits) and BatchNorm `num_batches_tracked` are accepted and dropped. Missing or
    unexpected keys and shape mismatches raise one ValueError listing them all. Torch conv weights (O, I, kh, kw)
    become HWIO kernels. Values may be torch tensors or arrays.
    """
    variables, _ = state_dict.convert(
        state, weight_entries(), "cannot convert FID Inception weights", ignore=_ignored, place=jnp.asarray
    )
    return variables


def _check_variables(variables: Mapping[str, Any], where: str) -> dict[tuple[str, ...], np.ndarray]:
    """Flattens `variables` and checks them against `FIDInception`'s names and shapes."""
    return check_variables(variables, dict(_variable_shapes()), where, "FID Inception")


def init_fid_variables(seed: int = 0) -> dict[str, Any]:
    """Random `FIDInception` variables (tests, offline smoke runs), made on the host without compiling an init.

    He-normal kernels, BatchNorm scale 1, bias 0, mean 0, var 1: activations stay O(1) through the 94 layers.
    """
    gen = np.random.default_rng(seed)
    flat = {}
    for path, shape in _variable_shapes():
        if path[-1] == "kernel":
            v = gen.standard_normal(shape, np.float32) * np.float32(np.sqrt(2.0 / np.prod(shape[:-1])))
        elif path[-1] in ("scale", "var"):
            v = np.ones(shape, np.float32)
        else:
            v = np.zeros(shape, np.float32)
        flat[path] = jnp.asarray(v)
    return traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------------------------------------------
# One-file storage (.npz, no pickle) and loading.

_KIND = "fid_inception_v3/pt_inception-2015-12-05"


def save_fid_weights(variables: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Writes `FIDInception` variables to one .npz file (exactly at `path`)."""
    flat = _check_variables(variables, "save_fid_weights")
    paths.save_npz(path, kind=np.array(_KIND), **{"/".join(k): v for k, v in flat.items()})


def conversion_help(path: str | os.PathLike) -> str:
    """The exact commands that produce `path`."""
    return "\n".join(
        [
            "  # on a machine that is online (torch is needed for the conversion):",
            f"  wget {FID_WEIGHTS_URL}",
            f"  python -m dcae_jax.convert_weights --fid_inception={FID_WEIGHTS_FILE} --out={path}",
        ]
    )


def load_fid_inception(path: str | os.PathLike) -> tuple[FIDInception, dict[str, Any]]:
    """Reads a `save_fid_weights` file (local or gs://) -> (`FIDInception()`, variables)."""
    path = paths.path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: FID Inception weights not found. Nothing is downloaded at run time; `python -m "
            "dcae_jax.fetch_weights` makes the genuine file (no torch needed), or convert the PyTorch file:\n"
            + conversion_help(path)
        )
    z = paths.load_npz(path)
    if "kind" not in z or str(z["kind"]) != _KIND:
        raise ValueError(f"{path}: not a dcae_jax FID Inception weights file (kind {_KIND!r} expected)")
    flat = {tuple(k.split("/")): z[k] for k in z if k != "kind"}
    flat = _check_variables(traverse_util.unflatten_dict(flat), str(path))
    return FIDInception(), traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})


# ----------------------------------------------------------------------------------------------
# Statistics.


def _as_f64_rows(features: Any, mask: Any | None) -> np.ndarray:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"expected (N, D) features, got shape {f.shape}")
    if mask is not None:
        m = np.asarray(mask).reshape(-1)
        if m.shape[0] != f.shape[0]:
            raise ValueError(f"mask has {m.shape[0]} entries for {f.shape[0]} feature rows")
        f = f[m > 0]
    return f


@dataclasses.dataclass
class FeatureStats:
    """Streaming mean/covariance of feature vectors: count, sum and sum of outer products, all float64.

    Sums (not running means) make `merge` exact and order-independent up to float64 rounding, so shards from
    devices and processes combine into the statistics of the whole set.
    """

    dim: int = FEATURE_DIM
    count: int = 0
    total: np.ndarray | None = None  # (dim,)
    total_outer: np.ndarray | None = None  # (dim, dim)

    def __post_init__(self):
        if self.total is None:
            self.total = np.zeros((self.dim,), np.float64)
        if self.total_outer is None:
            self.total_outer = np.zeros((self.dim, self.dim), np.float64)

    def update(self, features: Any, mask: Any | None = None) -> FeatureStats:
        """Adds the rows of (N, dim) `features` whose `mask` (N,) is > 0 (all rows without a mask)."""
        f = _as_f64_rows(features, mask)
        if f.shape[1] != self.dim:
            raise ValueError(f"features have dimension {f.shape[1]}, stats have {self.dim}")
        self.count += int(f.shape[0])
        self.total += f.sum(axis=0)
        self.total_outer += f.T @ f
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """The statistics of both sets (a new object)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge stats of dimension {self.dim} and {other.dim}")
        return FeatureStats(
            self.dim, self.count + other.count, self.total + other.total, self.total_outer + other.total_outer
        )

    @property
    def mean(self) -> np.ndarray:
        if self.count < 1:
            raise ValueError("no features accumulated")
        return self.total / self.count

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance (divides by count - 1), like `np.cov(features, rowvar=False)`."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, have {self.count}")
        return (self.total_outer - np.outer(self.total, self.total) / self.count) / (self.count - 1)

    def mu_sigma(self) -> tuple[np.ndarray, np.ndarray]:
        return self.mean, self.cov

    def save(self, path: str | os.PathLike) -> None:
        """pytorch-fid `--save-stats` file (mu, sigma)."""
        save_stats(path, *self.mu_sigma())


def allreduce_stats(stats: FeatureStats) -> FeatureStats:
    """Every process's `stats` merged (the same result on every process); a copy with one process."""
    packed = np.concatenate([[float(stats.count)], stats.total, stats.total_outer.ravel()])
    summed = distributed.process_sum(packed)
    d = stats.dim
    return FeatureStats(d, round(float(summed[0])), summed[1 : d + 1], summed[d + 1 :].reshape(d, d))


def save_stats(path: str | os.PathLike, mu: Any, sigma: Any) -> None:
    """Writes pytorch-fid's stats format, `np.savez_compressed(mu=..., sigma=...)` (float64), exactly at `path`."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"mu {mu.shape} and sigma {sigma.shape} are not (D,) and (D, D)")
    paths.save_npz(path, compressed=True, mu=mu, sigma=sigma)


def load_stats(path: str | os.PathLike, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) as float64 from a stats .npz (ours or pytorch-fid's `--save-stats`; local or gs://); `dim`: the
    feature size the caller scores with (the FID Inception's 2048), checked before any work."""
    path = paths.path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: FID reference statistics not found. Build them with\n"
            f"  python -m dcae_jax.fid_stats --data DATA --resolution R --out {path}\n"
            f"or with pytorch-fid: python -m pytorch_fid --save-stats IMAGE_DIR {path}"
        )
    z = paths.load_npz(path)
    if not {"mu", "sigma"} <= set(z):
        raise ValueError(f"{path}: not an FID stats file (needs 'mu' and 'sigma'); files: {sorted(z)}")
    mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not (D,) and (D, D)")
    if dim is not None and mu.shape[0] != dim:
        raise ValueError(
            f"{path}: statistics of {mu.shape[0]}-dimensional features; FID compares the Inception's {dim}-dimensional "
            "pool features (python -m dcae_jax.fid_stats makes them)"
        )
    return mu, sigma


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), exactly as `pytorch_fid.fid_score.calculate_frechet_distance`.

    Inputs are cast to float64. If `sqrtm(S1 S2)` is not finite (near-singular product), eps is added to both
    diagonals and it is recomputed; a complex result with imaginary diagonal > 1e-3 raises ValueError.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different lengths: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape:
        raise ValueError(f"covariances have different dimensions: {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates", stacklevel=2
        )
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def sqrt_psd(sigma: Any) -> np.ndarray:
    """The symmetric square root of a covariance (eigen-decomposition; tiny negative eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh(np.asarray(sigma, np.float64))
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_eig(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, sqrt_sigma1: Any | None = None) -> float:
    """`frechet_distance` through symmetric eigenvalues, ~10x faster at 2048 dimensions (0.6 s vs 9 s on 2 CPU cores).

    Tr sqrt(S1 S2) = sum sqrt(eig(A S2 A)) with A = S1^(1/2): S1 S2 = A (A S2) and A S2 A = (A S2) A share their
    non-zero eigenvalues, and A S2 A is symmetric PSD. Pass `sqrt_sigma1` (`sqrt_psd(sigma1)`) to reuse it when one
    reference is compared with many models. Agrees with `frechet_distance` to ~1e-6 relative (tested).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in dimension: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
    a = sqrt_psd(sigma1) if sqrt_sigma1 is None else np.asarray(sqrt_sigma1, np.float64)
    eig = np.linalg.eigvalsh(a @ sigma2 @ a)
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(np.clip(eig, 0.0, None)).sum())


def _poly_kernel(a: np.ndarray, b: np.ndarray, degree: int, gamma: float | None, coef: float) -> np.ndarray:
    gamma = 1.0 / a.shape[1] if gamma is None else gamma
    return (a @ b.T * gamma + coef) ** degree


def _unbiased_mmd2(x: np.ndarray, y: np.ndarray, degree: int, gamma: float | None, coef: float) -> float:
    """Unbiased MMD^2 with a polynomial kernel between two equal-size feature sets (the KID estimator)."""
    m = x.shape[0]
    kxx, kyy, kxy = (_poly_kernel(a, b, degree, gamma, coef) for a, b in ((x, x), (y, y), (x, y)))
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2.0 * kxy.sum() / m**2)


def kernel_inception_distance(
    real: Any,
    fake: Any,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (Binkowski et al., 2018) as torchmetrics / torch-fidelity compute it: (mean, std) over `subsets` random
    subsets of `subset_size` features from each set, each scored by the unbiased polynomial-kernel MMD^2
    (k(x, y) = (gamma x.y + coef)^degree, gamma = 1/dim by default); std is the population std (ddof 0).

    Needs the features themselves (not mean/covariance). Subsets are drawn with numpy (`seed`), so a run equals
    torchmetrics' exactly only when the subset is the whole set (`subset_size` = N, any `subsets`): the estimator
    does not depend on the order of the features.
    """
    real, fake = (np.asarray(f, np.float64) for f in (real, fake))
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected (N, D) feature arrays of one dimension, got {real.shape} and {fake.shape}")
    if subset_size < 2 or subset_size > min(len(real), len(fake)):
        raise ValueError(f"subset_size {subset_size} must be in [2, {min(len(real), len(fake))}] (the smaller set)")
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(subsets):
        x = real[rng.permutation(len(real))[:subset_size]]
        y = fake[rng.permutation(len(fake))[:subset_size]]
        scores.append(_unbiased_mmd2(x, y, degree, gamma, coef))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------------------------
# CLI.


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_file(src: str | os.PathLike, out: str | os.PathLike) -> int:
    """pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` -> one .npz at `out` (reading .pth needs torch).

    Returns the number of values written; warns when a file of that name has another checksum."""
    src = pathlib.Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: not found; download it with: wget {FID_WEIGHTS_URL}")
    if src.name == FID_WEIGHTS_FILE and not _sha256(src).startswith(FID_WEIGHTS_SHA256_PREFIX):
        warnings.warn(f"{src}: sha256 does not start with {FID_WEIGHTS_SHA256_PREFIX}; corrupt download?", stacklevel=2)
    variables = convert_fid_inception(state_dict.unwrap(state_dict.read(src)))
    save_fid_weights(variables, out)
    return sum(int(np.size(v)) for v in jax.tree_util.tree_leaves(variables))


__all__ = [
    "FEATURE_DIM",
    "FIDInception",
    "FID_WEIGHTS_FILE",
    "FID_WEIGHTS_URL",
    "FeatureStats",
    "allreduce_stats",
    "convert_fid_inception",
    "convert_file",
    "frechet_distance",
    "frechet_distance_eig",
    "init_fid_variables",
    "kernel_inception_distance",
    "load_fid_inception",
    "load_stats",
    "resize_bilinear",
    "save_fid_weights",
    "save_stats",
    "sqrt_psd",
    "weight_entries",
]
