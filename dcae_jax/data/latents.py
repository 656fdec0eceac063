"""Precomputed DC-AE latents on disk: the folder format, its shard writer, and the reader the diffusion trainer uses.

    ds = LatentDataset("/data/latents/f32c32")          # validates metadata.json and every shard header
    ds[0]                                             # {"latent": (H, W, C) float32, "label": int32}
    ds.latent_shape, ds.scaling_factor, ds.num_classes
    it = make_latent_train_loader("/data/latents/f32c32", global_batch_size=1024, seed=0)
    next(it)   # {"latent": (B_local, H, W, C) float32, "label": (B_local,) int32}: this process's share

Folder layout (written by `python -m dcae_jax.precompute_latents`; the whole folder must be on a filesystem every
process sees):

    OUT/run.json                      settings of the run that fills the folder (checked on resume)
    OUT/shard-00000-of-00042.npy      the readable records among source records [0, S) (S = shard_size), in order
    OUT/shard-00000-of-00042.json     that shard's index: record range, counts, sums for the statistics
    ...
    OUT/metadata.json                 written last, once every shard exists: a folder without it is unfinished

Shard `.npy`: a 1-D structured numpy array, one element per readable image, in source order, dtype
`[("latent", "<f4", (H, W, C)), ("label", "<i4"), ("index", "<i8")]`:

    a = np.load("OUT/shard-00000-of-00042.npy", mmap_mode="r")
    a["latent"]   # (n, H, W, C) float32 NHWC, ALREADY MULTIPLIED by scaling_factor: DCAE.encode(x) * scaling_factor
    a["label"]    # (n,) int32 class ids
    a["index"]    # (n,) int64 position of the record in the source (split order, after --max_images)

`n <= S`: records that cannot be read (or are too small) are left out and counted in the shard's index. One file
per shard makes a shard's write atomic (temp name, fsync, `os.replace`); the index `.json` is replaced after the
`.npy` and is the shard's commit mark: a shard is finished when its index exists, names the same run, and the
`.npy` has exactly the size and header the index promises (a truncated or foreign file is rewritten on resume).

`metadata.json` (the diffusers / efficientvit convention: latents stored scaled, the sampler divides by
`scaling_factor` before decoding; no shift factor):

    format "dcae_jax.latents", version 1, created_by
    model, model_name (the DC-AE config name), dtype_compute, data, split, resolution, crop "adm_center"
    latent_shape [H, W, C], layout "NHWC", dtype "float32"
    scaling_factor, scaling_factor_source ("model" | "flag" | "auto"), latents_scaled true
    num_records (source records), num_examples (stored), num_unreadable, shard_size, num_shards
    shards [{"file", "num_examples", "start", "stop"}]   (source records [start, stop) of each shard)
    class_names, num_classes, label_source
    stats {mean, std, rms, channel_mean, channel_std} of the STORED (scaled) latents (rms ~ 1 when the factor fits),
          unscaled_rms = rms / scaling_factor, implied_scaling_factor = 1 / unscaled_rms (the paper's definition)
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import threading
from typing import Any

import grain
import numpy as np

from dcae_jax.runtime import paths

FORMAT = "dcae_jax.latents"
VERSION = 1
METADATA = "metadata.json"
RUN = "run.json"


class LatentFormatError(ValueError):
    """A latents folder, metadata field or shard that does not follow the format; the message names the file."""


# ----------------------------------------------------------------------------------------------
# Files.


def shard_stem(index: int, num_shards: int) -> str:
    return f"shard-{index:05d}-of-{num_shards:05d}"


def record_dtype(latent_shape: tuple[int, int, int] | list[int]) -> np.dtype:
    """One stored example: the scaled latent (H, W, C) float32, its class id and its source record index."""
    return np.dtype([("latent", "<f4", tuple(int(d) for d in latent_shape)), ("label", "<i4"), ("index", "<i8")])


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    paths.write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: paths.Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise LatentFormatError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(obj, dict):
        raise LatentFormatError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def npy_header(path: paths.Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of an .npy file; raises LatentFormatError if it is not one or is truncated."""
    try:
        with paths.path(path).open("rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            offset = f.tell()
    except (OSError, ValueError, SyntaxError) as err:  # SyntaxError: a garbled header dict
        raise LatentFormatError(f"{path}: not a readable .npy file ({err})") from None
    if fortran or len(shape) != 1:
        raise LatentFormatError(f"{path}: expected a 1-D array of records, got shape {shape}")
    size, want = paths.size(path), offset + shape[0] * dtype.itemsize
    if size != want:
        raise LatentFormatError(f"{path}: {size} bytes, the header promises {want} ({shape[0]} records): truncated?")
    return shape, dtype, offset


# ----------------------------------------------------------------------------------------------
# Writer side.


def shard_sums(latents: np.ndarray) -> dict[str, Any]:
    """float64 sums of the (scaled) latents (n, H, W, C): what the folder statistics are built from."""
    z = np.asarray(latents, np.float64)
    c = z.shape[-1]
    return {
        "sum": float(z.sum()),
        "sum_sq": float(np.square(z).sum()),
        "channel_sum": z.reshape(-1, c).sum(axis=0).tolist(),
        "channel_sum_sq": np.square(z).reshape(-1, c).sum(axis=0).tolist(),
    }


def write_shard(
    root: str | os.PathLike,
    index: int,
    num_shards: int,
    *,
    latents: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    start: int,
    stop: int,
    run_id: str,
) -> dict[str, Any]:
    """Writes shard `index` (its .npy, then its index .json, each atomically); returns the index."""
    root = paths.path(root)
    latents = np.asarray(latents, np.float32)
    n = latents.shape[0]
    if latents.ndim != 4 or np.shape(labels) != (n,) or np.shape(indices) != (n,):
        raise ValueError(f"latents {latents.shape}, labels {np.shape(labels)}, indices {np.shape(indices)}")
    if n > stop - start:
        raise ValueError(f"{n} examples for the {stop - start} records [{start}, {stop})")
    stem = shard_stem(index, num_shards)
    npy, idx = root / f"{stem}.npy", root / f"{stem}.json"
    if idx.exists():
        idx.unlink()  # no commit mark while the data changes
    records = np.empty((n,), record_dtype(latents.shape[1:]))
    records["latent"], records["label"], records["index"] = latents, labels, indices
    buf = io.BytesIO()
    np.save(buf, records, allow_pickle=False)
    paths.write_bytes_atomic(npy, buf.getvalue())
    info = {
        "format": FORMAT,
        "version": VERSION,
        "run_id": run_id,
        "shard": index,
        "num_shards": num_shards,
        "file": npy.name,
        "bytes": paths.size(npy),
        "start": start,
        "stop": stop,
        "num_examples": n,
        "num_unreadable": stop - start - n,
        "latent_shape": list(latents.shape[1:]),
        **shard_sums(latents),
        "label_counts": {str(int(k)): int(v) for k, v in zip(*np.unique(labels, return_counts=True), strict=True)},
    }
    write_json_atomic(idx, info)
    return info


def check_shard(
    root: str | os.PathLike, index: int, num_shards: int, *, run_id: str, start: int, stop: int, latent_shape
) -> tuple[dict[str, Any] | None, str]:
    """(the shard's index, "") when shard `index` is finished and belongs to this run, else (None, why not)."""
    root = paths.path(root)
    stem = shard_stem(index, num_shards)
    idx, npy = root / f"{stem}.json", root / f"{stem}.npy"
    if not idx.exists():
        return None, "missing" if not npy.exists() else f"{idx.name} missing (unfinished write)"
    try:
        info = read_json(idx)
        want = {"format": FORMAT, "run_id": run_id, "shard": index, "num_shards": num_shards, "file": npy.name}
        want |= {"start": start, "stop": stop, "latent_shape": list(latent_shape)}
        for key, value in want.items():
            if info.get(key) != value:
                return None, f"{idx.name}: {key} is {info.get(key)!r}, this run has {value!r}"
        n = info["num_examples"]
        if not npy.exists():
            return None, f"{npy.name} missing"
        shape, dtype, _ = npy_header(npy)
        if dtype != record_dtype(latent_shape) or shape != (n,) or paths.size(npy) != info["bytes"]:
            return None, f"{npy.name}: {shape[0]} records of {dtype}, {idx.name} promises {n} of the run's dtype"
        if n + info["num_unreadable"] != stop - start:
            return None, f"{idx.name}: counts do not add up to the {stop - start} records"
        for key in ("sum", "sum_sq", "channel_sum", "channel_sum_sq"):
            float(np.sum(info[key]))
    except (LatentFormatError, KeyError, TypeError, ValueError) as err:
        return None, str(err)
    return info, ""


# ----------------------------------------------------------------------------------------------
# Reader.


def _field(meta: dict[str, Any], key: str, path: paths.Path, kind=None):
    if key not in meta:
        raise LatentFormatError(f"{path}: missing field {key!r}")
    value = meta[key]
    if kind is not None and not isinstance(value, kind):
        raise LatentFormatError(f"{path}: field {key!r} is {value!r}, expected {getattr(kind, '__name__', kind)}")
    return value


class LatentDataset:
    """The examples of a finished latents folder, random access (a grain data source).

    `ds[i]` -> {"latent": (H, W, C) float32 (scaled), "label": int32}, in shard order. Construction checks
    metadata.json and every shard's header and size (no data is read); errors name the file and field.
    Local shards are memory-mapped on first use; gs:// shards are read in place, one ranged read per example
    (files opened on first use, and re-opened in grain worker processes).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = paths.path(root, "latents")
        path = self.root / METADATA
        if not path.is_file():
            hint = (
                " (a precompute run left run.json: it is unfinished, run it again)"
                if (self.root / RUN).exists()
                else ""
            )
            raise FileNotFoundError(
                f"{path}: not found; {self.root} is not a finished latents folder{hint}. "
                "Create one with `python -m dcae_jax.precompute_latents`."
            )
        meta = read_json(path)
        if meta.get("format") != FORMAT:
            raise LatentFormatError(f"{path}: field 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
        if _field(meta, "version", path, int) > VERSION:
            raise LatentFormatError(f"{path}: format version {meta['version']} is newer than this reader ({VERSION})")
        shape = _field(meta, "latent_shape", path, list)
        if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
            raise LatentFormatError(f"{path}: field 'latent_shape' is {shape!r}, expected [H, W, C] positive ints")
        if _field(meta, "dtype", path) != "float32":
            raise LatentFormatError(f"{path}: field 'dtype' is {meta['dtype']!r}, expected 'float32'")
        if _field(meta, "layout", path) != "NHWC":
            raise LatentFormatError(f"{path}: field 'layout' is {meta['layout']!r}, expected 'NHWC'")
        scale = _field(meta, "scaling_factor", path, int | float)
        if isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0:
            raise LatentFormatError(f"{path}: field 'scaling_factor' is {scale!r}, expected a positive number")
        num_classes = _field(meta, "num_classes", path, int)
        class_names = _field(meta, "class_names", path, list)
        if class_names and len(class_names) != num_classes:
            raise LatentFormatError(f"{path}: {len(class_names)} class_names for num_classes={num_classes}")
        shards = _field(meta, "shards", path, list)
        if not shards:
            raise LatentFormatError(f"{path}: field 'shards' is empty")
        self.metadata = meta
        self.latent_shape: tuple[int, int, int] = tuple(shape)  # type: ignore[assignment]
        self.scaling_factor = float(scale)
        self.num_classes = num_classes
        self.class_names = list(class_names)
        counts = meta.get("label_counts")
        if counts is not None and (not isinstance(counts, list) or len(counts) != num_classes):
            raise LatentFormatError(f"{path}: label_counts must list {num_classes} counts, got {counts!r}")
        # The class ids that have examples (all of them when the folder predates label counts).
        self.trained_classes = [i for i, n in enumerate(counts) if n > 0] if counts else list(range(num_classes))
        dtype = record_dtype(self.latent_shape)
        self._files: list[paths.Path] = []
        self._data_offsets: list[int] = []
        self._itemsize = dtype.itemsize
        self._offsets = [0]
        for k, shard in enumerate(shards):
            if not isinstance(shard, dict) or not isinstance(shard.get("file"), str):
                raise LatentFormatError(f"{path}: shards[{k}] has no 'file'")
            n = _field(shard, "num_examples", path, int)
            f = self.root / shard["file"]
            if not f.is_file():
                raise LatentFormatError(f"{f}: shard listed in {path} is missing")
            got_shape, got_dtype, data_offset = npy_header(f)
            if got_dtype != dtype:
                raise LatentFormatError(
                    f"{f}: records are {got_dtype}, metadata.json's latent_shape {list(self.latent_shape)} needs {dtype}"
                )
            if got_shape != (n,):
                raise LatentFormatError(f"{f}: {got_shape[0]} records, metadata.json says num_examples={n}")
            self._files.append(f)
            self._data_offsets.append(data_offset)
            self._offsets.append(self._offsets[-1] + n)
        if self._offsets[-1] != _field(meta, "num_examples", path, int):
            raise LatentFormatError(
                f"{path}: shards hold {self._offsets[-1]} examples, num_examples={meta['num_examples']}"
            )
        if self._offsets[-1] == 0:
            raise LatentFormatError(f"{path}: the folder holds no examples")
        self._maps: dict[int, Any] = {}
        self._dtype = dtype
        self._remote = paths.is_remote(self.root)
        self._lock = threading.Lock()
        self._open = contextlib.ExitStack()

    def __len__(self) -> int:
        return self._offsets[-1]

    def _shard(self, k: int) -> Any:
        m = self._maps.get(k)
        if m is None:
            if self._remote:  # (epath's TensorFlow backend opens through a context manager: entered, kept open)
                m = self._maps[k] = self._open.enter_context(self._files[k].open("rb"))
            else:
                m = self._maps[k] = np.load(os.fspath(self._files[k]), mmap_mode="r")
        return m

    def _record(self, k: int, j: int) -> np.ndarray:
        shard = self._shard(k)
        if not self._remote:
            return shard[j]
        with self._lock:  # grain's read threads share the open file
            shard.seek(self._data_offsets[k] + j * self._itemsize)
            data = shard.read(self._itemsize)
        return np.frombuffer(data, self._dtype)[0]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        i = int(index)
        if not 0 <= i < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        k = bisect.bisect_right(self._offsets, i) - 1
        record = self._record(k, i - self._offsets[k])
        return {"latent": np.array(record["latent"], np.float32), "label": np.int32(record["label"])}

    def __getstate__(self):  # grain workers: ship the index, not the memory maps
        return {k: v for k, v in self.__dict__.items() if k not in ("_maps", "_lock", "_open")}

    def __setstate__(self, state):
        self.__dict__.update(state, _maps={}, _lock=threading.Lock(), _open=contextlib.ExitStack())

    def __repr__(self) -> str:
        return f"LatentDataset({str(self.root)!r}, {len(self)} x {self.latent_shape}, {self.num_classes} classes)"


@dataclasses.dataclass(frozen=True)
class _LoaderSpec:
    dataset: LatentDataset
    global_batch_size: int
    seed: int
    shuffle: bool
    num_epochs: int | None
    worker_count: int
    process_index: int
    process_count: int
    read_threads: int

    def build(self, start_batch: int) -> grain.DatasetIterator:
        local = self.global_batch_size // self.process_count
        ds = grain.MapDataset.source(self.dataset).seed(self.seed)
        if self.shuffle:
            ds = ds.shuffle()  # a different permutation of all examples each epoch
        ds = ds.repeat(self.num_epochs)
        ds = ds[start_batch * self.global_batch_size + self.process_index :: self.process_count]
        read = grain.ReadOptions(num_threads=self.read_threads, prefetch_buffer_size=max(2 * local, self.read_threads))
        it = ds.to_iter_dataset(read).batch(local, drop_remainder=True)
        if self.worker_count > 0:
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.worker_count))
        return iter(it)


def make_latent_train_loader(
    root: str | os.PathLike | LatentDataset,
    *,
    global_batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    worker_count: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    start_batch: int = 0,
    read_threads: int = 16,
):
    """This process's slices of the global training batches of a latents folder: a checkpointable iterator.

    Yields {"latent": (B_local, H, W, C) float32, "label": (B_local,) int32}, B_local = global_batch_size //
    process_count. The same scheme as `input_pipeline.make_train_loader`: one global stream (a fresh seeded
    permutation of all examples each epoch, or the stored order with shuffle=False), global batch b = stream
    positions [b B, (b + 1) B), process p of n reads positions p, p + n, ... of it. So the global batches do not
    depend on the process count, every example is seen once per epoch (batches may straddle epochs; with
    `num_epochs` the incomplete last batch is dropped), and the iterator is an `input_pipeline.TrainIterator`:
    grain state + start batch, saved with orbax's grain handler, or `restart_at(step)` on another process count.
    Process index and count default to JAX's; `worker_count > 0` reads in grain worker processes.
    """
    import jax

    from dcae_jax.data.pipeline import TrainIterator

    dataset = root if isinstance(root, LatentDataset) else LatentDataset(root)
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if global_batch_size <= 0 or global_batch_size % pc:
        raise ValueError(f"global_batch_size={global_batch_size} must be positive and divisible by {pc} processes")
    if not 0 <= pi < pc:
        raise ValueError(f"process_index={pi} not in [0, {pc})")
    spec = _LoaderSpec(dataset, global_batch_size, seed, shuffle, num_epochs, worker_count, pi, pc, read_threads)
    return TrainIterator(spec.build, start_batch, spec.build(start_batch))


def run_id(settings: dict[str, Any]) -> str:
    """A short fingerprint of a run's settings (stored in every shard index, so shards never mix runs)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


__all__ = [
    "FORMAT",
    "METADATA",
    "RUN",
    "VERSION",
    "LatentDataset",
    "LatentFormatError",
    "check_shard",
    "make_latent_train_loader",
    "npy_header",
    "read_json",
    "record_dtype",
    "run_id",
    "shard_stem",
    "shard_sums",
    "write_json_atomic",
    "write_shard",
]
