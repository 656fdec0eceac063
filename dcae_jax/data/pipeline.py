"""Training and evaluation input pipelines on grain: image sources, ADM crops, skip counting, checkpointable iterators.

    source = make_source("folder:/data/imagenet", "train")   # or "tfds:imagenet2012[@/data_dir]", "bundled",
                                                            # "arrayrecord:/data/packed" (python -m dcae_jax.pack)
    it = make_train_loader(source, resolution=256, global_batch_size=256, seed=0,
                           process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(it)      # {"image": (B_local, 256, 256, 3) float32 in [-1, 1], "skipped": (B_local,) int32}
    for batch in make_eval_loader(make_source(spec, "validation"), resolution=256, batch_size=64):
        ...               # also "mask": (B,) float32, 1 for real images, 0 for padding / unreadable records

Sources are random-access (`__len__`, `__getitem__`) like every grain data source. Folder and bundled records are
file paths; tfds records are dicts whose `image` is encoded bytes or a decoded array (both handled); arrayrecord
records are dicts too (the image file's bytes, `file_name`, `label`; `dcae_jax.data.shards`). `folder:` and
`tfds:...@DATA_DIR` take gs:// locations as well as local ones; so does `arrayrecord:`, which is what a pod should
read: a few hundred shards instead of listing and opening millions of small files.

Training augmentation is guided-diffusion's `random_crop_arr` + `random_flip` (the random counterpart of
`center_crop_adm`): the short side is resized to a size drawn uniformly from [R, ceil(1.25 R)] (BOX halving while
it is >= 2x that size, then BICUBIC; smaller images are upscaled), a random R x R window is cut, and it is flipped
horizontally with probability 1/2. Evaluation uses `center_crop_adm`.

Records that cannot be used never stop a run: unreadable, corrupt, truncated or empty images, records whose source
read raises, and images whose short side is below `min_side` (default ceil(R / 4)) are dropped. In training batches
`skipped[i]` is the number of records dropped just before element i (so `skipped.sum()` over all batches is the
number dropped; drops after the last element of a finite run are not reported). In evaluation batches a dropped
record keeps its slot with mask=0, skipped=1, so every process sees the same number of fixed-shape batches.

Determinism: training reads one global stream, a fresh permutation of all records each epoch, and the crops/flips
derive from `seed` and the stream position only. Global batch b is stream positions [b B, (b + 1) B); process p of
n reads the positions p, p + n, p + 2n, ... of it (only those records). So the global batches, up to their order
inside the batch, do not depend on the process count: 1, 2 or 4 processes train on the same data, and a run can
resume on another process count. That holds with `num_workers=0` while no record is dropped (a dropped record is
replaced by the next one of the same process); `num_workers > 0` forms batches inside each worker, so the
product process_count x num_workers regroups them.

Checkpointing: the training iterator (`TrainIterator`, a `grain.DatasetIterator`) has the state
{"start_batch": first global batch it was built at, "grain": grain's state}, JSON round-trippable, and with orbax
(a fresh iterator is restored in place, then resumes exactly):

    mngr.save(step, args=ocp.args.Composite(state=..., data_iter=grain.checkpoint.CheckpointSave(it)))
    mngr.restore(step, args=ocp.args.Composite(state=..., data_iter=grain.checkpoint.CheckpointRestore(it)))

(`grain.python.PyGrainCheckpointSave` / `PyGrainCheckpointRestore` are the same classes; the handler is
`grain.checkpoint.CheckpointHandler` and writes `data_iter/process_<i>-of-<n>.json` per JAX process, so only a
job with the same process count can restore it. Another process count calls `it.restart_at(step)` instead:
global batch `step` next, exact under the conditions above.)

`num_workers > 0` decodes in grain worker processes (`mp_prefetch`): call it under an `if __name__ == "__main__":`
guard, and with absl flags parsed (e.g. from `absl.app.run`).
"""

from __future__ import annotations

import importlib.util
import math
import os
import pathlib
import threading
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from absl import logging
from PIL import Image

from dcae_jax.data.images import (
    ImageReadError,
    _to_rgb,
    as_path,
    center_crop_adm,
    decode_image_bytes,
    list_images,
    open_image,
    pil_to_array,
)

# The crop covers this range of fractions of the resized short side (guided-diffusion's random_crop_arr).
MIN_CROP_FRAC, MAX_CROP_FRAC = 0.8, 1.0

# Per process (and per grain worker): decoded training images kept in memory while the whole set fits (DecodedCache).
DECODED_CACHE_MB = 256

# Folder split names -> subfolder names tried in order (packed shards keep the same split folders).
SPLIT_DIRS = {
    "train": ("train",),
    "validation": ("validation", "val"),
    "val": ("val", "validation"),
    "test": ("test",),
}

# Real color photos shipped inside installed wheels (no download), as (package, file); validation is a fixed few.
BUNDLED_TRAIN = (
    ("skimage", "astronaut.png"),
    ("skimage", "hubble_deep_field.jpg"),
    ("skimage", "ihc.png"),  # immunohistochemistry
    ("skimage", "retina.jpg"),
    ("skimage", "rocket.jpg"),
    ("skimage", "motorcycle_left.png"),  # stereo_motorcycle (left view)
    ("sklearn", "china.jpg"),  # sklearn.datasets.load_sample_images()
    ("sklearn", "flower.jpg"),
)
BUNDLED_VALIDATION = (
    ("skimage", "coffee.png"),
    ("skimage", "chelsea.png"),
    ("matplotlib", "grace_hopper.jpg"),  # matplotlib.cbook.get_sample_data
)
_BUNDLED_DIRS = {"skimage": ("data",), "sklearn": ("datasets", "images"), "matplotlib": ("mpl-data", "sample_data")}


# ----------------------------------------------------------------------------------------------
# Sources.


class ImageFileSource:
    """A random-access grain source over image files; records are path strings (cheap to pickle to workers)."""

    def __init__(self, paths: Sequence[str | os.PathLike], name: str = "files"):
        self.paths = [str(p) for p in paths]
        self.name = name

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> str:
        return self.paths[index]

    def __repr__(self) -> str:
        return f"ImageFileSource({self.name!r}, {len(self)} images)"


def split_folders(base) -> list[str]:
    """The split subfolders (train, validation, val, test) present in a `folder:` root; none: the root serves every
    split. Local or gs:// (`base` as `images.as_path` gives it)."""
    return [d for d in dict.fromkeys(d for names in SPLIT_DIRS.values() for d in names) if (base / d).is_dir()]


def _folder_source(root: str, split: str) -> ImageFileSource:
    base = as_path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"folder:{root}: not a directory")
    if split_folders(base):  # split subfolders present: the split must be one of them
        found = [base / d for d in SPLIT_DIRS.get(split, (split,)) if (base / d).is_dir()]
        if not found:
            raise FileNotFoundError(f"folder:{root} has split subfolders but none for split {split!r}")
        base = found[0]
    paths = list_images(base)
    if not paths:
        raise ValueError(f"folder:{root} (split {split!r}): no image files under {base}")
    return ImageFileSource(paths, name=str(base))


def bundled_photos(split: str) -> list[pathlib.Path]:
    """Files of `BUNDLED_TRAIN` or `BUNDLED_VALIDATION` found in the installed packages (missing ones left out)."""
    if split not in ("train", "validation", "val"):
        raise ValueError(f"bundled: unknown split {split!r} (train, validation)")
    out = []
    for package, filename in BUNDLED_TRAIN if split == "train" else BUNDLED_VALIDATION:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        path = pathlib.Path(next(iter(spec.submodule_search_locations)), *_BUNDLED_DIRS[package], filename)
        if path.is_file():
            out.append(path)
    return out


def _tfds_source(name: str, split: str, data_dir: str | None):
    """A prepared TFDS dataset, read in place: nothing is downloaded or built here (every host of a pod would do it
    at once); an unprepared or unknown dataset is one clear error naming where it was looked for."""
    import tensorflow_datasets as tfds

    where = data_dir or "the default TFDS data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
    build = f"tfds build {name} --file_format=array_record --data_dir=DIR, then use tfds:{name}@DIR"
    not_found = getattr(getattr(tfds.core, "registered", None), "DatasetNotFoundError", LookupError)

    def open_source(**kw):
        try:
            return tfds.data_source(name, split=split, data_dir=data_dir, download=False, **kw)
        except not_found:
            raise ValueError(
                f"tfds:{name}: no TFDS dataset of that name is registered or prepared in {where}"
            ) from None
        except (NotImplementedError, KeyError) as err:  # TFRecord files (no random access), or nothing prepared
            if isinstance(err, KeyError) and "not been generated" not in str(err):
                raise
            if tfds.builder(name, data_dir=data_dir).is_prepared():
                raise ValueError(f"tfds:{name} in {where} has no random-access files (array_record); {build}") from None
            raise FileNotFoundError(
                f"tfds:{name} is not prepared in {where}; {build} (ImageNet needs its manual download first)"
            ) from None

    try:  # encoded bytes: decoded (and failures counted) by us, not inside tfds
        return open_source(decoders={"image": tfds.decode.SkipDecoding()})
    except (ValueError, OSError):
        raise
    except Exception as err:  # older tfds or no SkipDecoding support: arrays then
        logging.info("tfds.data_source(%s) without SkipDecoding (%s)", name, err)
        return open_source()


def make_source(spec: str, split: str):
    """`folder:DIR`, `tfds:NAME[@DATA_DIR]`, `arrayrecord:DIR` or `bundled` -> a random-access source for `split`.

    DIR and DATA_DIR may be gs:// URLs. `arrayrecord:DIR` is a folder written by `python -m dcae_jax.pack`.
    """
    kind, _, arg = spec.partition(":")
    if kind == "folder" and arg:
        return _folder_source(arg, split)
    if kind == "arrayrecord" and arg:
        from dcae_jax.data import shards  # it imports this module

        return shards.open_source(arg, split)
    if kind == "tfds" and arg:
        name, _, data_dir = arg.partition("@")
        return _tfds_source(name, split, data_dir or None)
    if kind == "bundled" and not arg:
        paths = bundled_photos(split)
        if not paths:
            raise ValueError(
                "bundled: none of the bundled photos is installed (scikit-image, scikit-learn, matplotlib)"
            )
        return ImageFileSource(paths, name=f"bundled/{split}")
    if pathlib.Path(spec).expanduser().is_dir():  # a plain existing directory means folder:DIR
        return _folder_source(spec, split)
    raise ValueError(
        f"unknown data spec {spec!r}: use folder:DIR (or an existing directory), tfds:NAME[@DATA_DIR], "
        "arrayrecord:DIR or bundled"
    )


# ----------------------------------------------------------------------------------------------
# Records -> images.


def _open_array(a: np.ndarray, what: str) -> Image.Image:
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.size == 0 or a.ndim not in (2, 3):
        raise ImageReadError(what, f"bad image array shape {a.shape}")
    try:
        return _to_rgb(Image.fromarray(a))
    except (TypeError, ValueError) as err:
        raise ImageReadError(what, f"{type(err).__name__}: {err}") from err


def _record_name(record: Any) -> str:
    """What names a dict record in messages: its `file_name` (tfds, arrayrecord) if it has one."""
    name = record.get("file_name", "?") if isinstance(record, dict) else "?"
    return name.decode(errors="replace") if isinstance(name, bytes) else str(name)


def open_record(record: Any) -> Image.Image:
    """A source record (path, or dict with an `image` of bytes or array) -> RGB PIL image; raises ImageReadError.

    Dicts are tfds records and arrayrecord records (`dcae_jax.data.shards`: the image file's original bytes).
    """
    if isinstance(record, str | os.PathLike):
        return open_image(record)
    if isinstance(record, dict) and "image" in record:
        image, what = record["image"], f"record {_record_name(record)}"
        if isinstance(image, np.ndarray) and image.dtype.kind in "SO" and image.size == 1:
            image = image.item()  # a scalar bytes array
        if isinstance(image, bytes):
            return decode_image_bytes(image, what)
        return _open_array(image, what)
    raise ImageReadError("?", f"unsupported record type {type(record).__name__}")


def random_crop_adm(
    img: Image.Image, size: int, rng: np.random.Generator, scale: tuple[float, float] | None = None
) -> Image.Image:
    """guided-diffusion `random_crop_arr`: short side -> U{ceil(size / 1.0) .. ceil(size / 0.8)}, random window.

    `scale=(lo, hi)`: the short side is drawn from U{ceil(lo * size) .. ceil(hi * size)} instead, e.g. (2, 3) cuts
    size x size windows out of images resized to 2-3x `size` (training patches at the scale of a 2x larger eval).
    """
    if scale is None:
        lo, hi = math.ceil(size / MAX_CROP_FRAC), math.ceil(size / MIN_CROP_FRAC)
    else:
        if not 1.0 <= scale[0] <= scale[1]:
            raise ValueError(f"crop scale {tuple(scale)}: need 1 <= lo <= hi")
        lo, hi = math.ceil(scale[0] * size), math.ceil(scale[1] * size)
    short = int(rng.integers(lo, hi + 1))
    while min(*img.size) >= 2 * short:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = short / min(*img.size)
    img = img.resize(tuple(max(round(x * scale), short) for x in img.size), resample=Image.BICUBIC)
    top = int(rng.integers(img.height - size + 1))
    left = int(rng.integers(img.width - size + 1))
    return img.crop((left, top, left + size, top + size))


_NAMED: set[str] = set()
_MAX_NAMED = 1000


def warn_skipped_once(key: str, message: str) -> None:
    """Names every skipped record once per process (the first 1000; then one line saying the rest go unnamed)."""
    if key in _NAMED or len(_NAMED) > _MAX_NAMED:
        return
    _NAMED.add(key)
    if len(_NAMED) > _MAX_NAMED:
        logging.warning("more than %d records skipped: further ones are counted but not named", _MAX_NAMED)
    else:
        logging.warning("skipping %s", message)


class _SafeSource:
    """Wraps a source so a failing read becomes None (dropped and counted later) instead of an exception."""

    def __init__(self, source):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int):
        try:
            return self._source[index]
        except Exception as err:  # any source failure is one skipped record
            warn_skipped_once(f"record {index}", f"record {index}: {err!r}")
            return None

    def __repr__(self) -> str:
        return f"_SafeSource({self._source!r})"


class DecodedCache:
    """File path -> decoded RGB image, kept in memory by one process while a training set fits in `max_bytes`.

    The bundled photos (and any small folder) are cropped thousands of times; decoding the file was about two thirds
    of the ~20 ms a bundled photo's crop cost on 2 CPU cores, and a third of a quickstart step's wall time went to
    the input pipeline. A set that does not fit is not cached at all: the first image over the budget empties the
    cache and switches it off, since a partial cache would hold memory for a hit rate of budget / dataset. Only path
    records are cached (folder, bundled); tfds and arrayrecord records are decoded each time. Cached images are only
    read (every crop op returns a new image), so the grain read threads share them; a worker process (pickled
    transform) starts with an empty cache of its own.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max(int(max_bytes), 0)
        self.enabled = self.max_bytes > 0
        self._images: dict[str, Image.Image] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"max_bytes": self.max_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_bytes"])

    @property
    def num_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._images)

    def open(self, record: Any) -> Image.Image:
        """`open_record(record)`, from memory when this path was decoded before."""
        if not self.enabled or not isinstance(record, str | os.PathLike):
            return open_record(record)
        key = os.fspath(record)
        img = self._images.get(key)
        if img is not None:
            return img
        img = open_record(record)
        size = img.width * img.height * len(img.getbands())
        with self._lock:
            if self.enabled and key not in self._images:
                if self._bytes + size > self.max_bytes:
                    self._images.clear()
                    self._bytes, self.enabled = 0, False
                    logging.info(
                        "training images exceed the %d MB decoded-image cache: not cached", self.max_bytes >> 20
                    )
                else:
                    self._images[key] = img
                    self._bytes += size
        return img


def _decode(record, resolution: int, min_side: int, crop, open_fn=open_record) -> np.ndarray | None:
    if record is None:
        return None
    try:
        img = open_fn(record)
        if min(img.size) < min_side:
            what = record if isinstance(record, str) else f"record {_record_name(record)}"
            raise ImageReadError(what, f"too small {img.size}, short side < {min_side}")
        return pil_to_array(crop(img))
    except ImageReadError as err:
        warn_skipped_once(str(err.path), f"image: {err}")
        return None


class _TrainDecode(grain.transforms.RandomMap):
    def __init__(
        self,
        resolution: int,
        min_side: int,
        crop_scale: tuple[float, float] | None = None,
        channel_shuffle: bool = False,
        decoded_cache_mb: int = 0,
    ):
        if crop_scale is not None and not 1.0 <= crop_scale[0] <= crop_scale[1]:
            raise ValueError(f"crop scale {tuple(crop_scale)}: need 1 <= lo <= hi")
        self.resolution, self.min_side = resolution, min_side
        self.crop_scale, self.channel_shuffle = crop_scale, channel_shuffle
        self.cache = DecodedCache(decoded_cache_mb << 20)

    def random_map(self, record, rng: np.random.Generator):
        r = self.resolution

        def crop(img):
            img = random_crop_adm(img, r, rng, self.crop_scale)
            return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img

        x = _decode(record, r, self.min_side, crop, self.cache.open)
        if x is not None and self.channel_shuffle:  # a random RGB order: colours the few training photos lack
            x = np.ascontiguousarray(x[..., rng.permutation(3)])
        return None if x is None else {"image": x}


class _Gap:
    """A padding slot between segments (`make_eval_loader(segments=...)`): masked out, not an unreadable record."""


class _SegmentLayout:
    """`source` laid out so each segment starts a new batch: slot k holds record slots[k], or a _Gap where -1."""

    def __init__(self, source, slots: np.ndarray):
        self._source, self._slots = source, slots

    def __len__(self) -> int:
        return len(self._slots)

    def __getitem__(self, k: int):
        r = int(self._slots[k])
        return _Gap() if r < 0 else self._source[r]

    def __repr__(self) -> str:
        return f"_SegmentLayout({self._source!r}, {len(self._slots)} slots)"


class _EvalDecode(grain.transforms.Map):
    def __init__(self, resolution: int, min_side: int, label_fn: Callable[[Any], int] | None = None):
        self.resolution, self.min_side, self.label_fn = resolution, min_side, label_fn

    def map(self, record):
        if isinstance(record, _Gap):
            return _Padding(self.resolution, self.label_fn is not None).map(None)
        x = _decode(record, self.resolution, self.min_side, lambda img: center_crop_adm(img, self.resolution))
        if x is None:  # dropped: keeps its slot, masked out
            x, mask, skipped = np.zeros((self.resolution, self.resolution, 3), np.float32), 0.0, 1
        else:
            mask, skipped = 1.0, 0
        out = {"image": x, "mask": np.float32(mask), "skipped": np.int32(skipped)}
        if self.label_fn is not None:
            out["label"] = np.int32(-1 if x is None else self.label_fn(record))
        return out


class _Padding(grain.transforms.Map):
    def __init__(self, resolution: int, with_label: bool = False):
        self.resolution, self.with_label = resolution, with_label

    def map(self, _):
        r = self.resolution
        out = {"image": np.zeros((r, r, 3), np.float32), "mask": np.float32(0.0), "skipped": np.int32(0)}
        if self.with_label:
            out["label"] = np.int32(-1)
        return out


# ----------------------------------------------------------------------------------------------
# Skip counting (stateless between elements, so the iterator state is the parent's).


class _CountSkippedIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, max_consecutive: int):
        super().__init__(parent)
        self._max_consecutive = max_consecutive

    def __next__(self):
        n = 0
        while True:
            element = next(self._parent)  # StopIteration ends the stream (trailing drops are not reported)
            if element is not None:
                return {**element, "skipped": np.int32(n)}
            n += 1
            if n >= self._max_consecutive:  # 2 x len(source) in a row: nothing readable is left
                raise RuntimeError(f"{n} unusable records in a row: no readable image among this process's records")

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


class CountSkippedIterDataset(grain.IterDataset):
    """Drops None elements and adds `skipped` (how many were dropped just before) to each remaining dict."""

    def __init__(self, parent: grain.IterDataset, max_consecutive: int):
        super().__init__(parent)
        self._max_consecutive = max_consecutive

    def __iter__(self) -> grain.DatasetIterator:
        return _CountSkippedIterator(self._parent.__iter__(), self._max_consecutive)


# ----------------------------------------------------------------------------------------------
# Loaders.


def make_train_dataset(
    source,
    *,
    resolution: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
    num_epochs: int | None = None,
    min_side: int | None = None,
    read_threads: int = 16,
    prefetch_buffer_size: int | None = None,
    start_batch: int = 0,
    crop_scale: tuple[float, float] | None = None,
    channel_shuffle: bool = False,
    decoded_cache_mb: int = DECODED_CACHE_MB,
) -> grain.IterDataset:
    """The training pipeline as a `grain.IterDataset` (see `make_train_loader`), from global batch `start_batch`."""
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} not divisible by process_count={process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    if len(source) < process_count:
        raise ValueError(f"{len(source)} records cannot be split over {process_count} processes")
    local_batch = global_batch_size // process_count
    min_side = math.ceil(resolution / 4) if min_side is None else min_side
    # The no-op [0:len] keeps one process's stream identical to earlier versions (grain derives each op's seed
    # from the pipeline's structure), so single-process runs reproduce.
    ds = grain.MapDataset.source(_SafeSource(source)).seed(seed)[0 : len(source)]
    ds = ds.shuffle().repeat(num_epochs)  # the global stream: a different permutation of all records each epoch
    # rng from (seed, stream position): new crops (and channel orders) each epoch
    ds = ds.random_map(_TrainDecode(resolution, min_side, crop_scale, channel_shuffle, decoded_cache_mb))
    ds = ds[start_batch * global_batch_size + process_index :: process_count]  # this process's stream positions
    read = grain.ReadOptions(
        num_threads=read_threads, prefetch_buffer_size=prefetch_buffer_size or max(2 * local_batch, read_threads)
    )
    it = CountSkippedIterDataset(ds.to_iter_dataset(read, allow_nones=True), max_consecutive=2 * len(source))
    it = it.batch(local_batch, drop_remainder=True)
    if num_workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it


def make_train_loader(
    source,
    *,
    resolution: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
    num_epochs: int | None = None,
    min_side: int | None = None,
    read_threads: int = 16,
    prefetch_buffer_size: int | None = None,
    start_batch: int = 0,
    crop_scale: tuple[float, float] | None = None,
    channel_shuffle: bool = False,
    decoded_cache_mb: int = DECODED_CACHE_MB,
) -> TrainIterator:
    """An endless (or `num_epochs`) checkpointable iterator of this process's training batches.

    Yields {"image": (B_local, R, R, 3) float32 in [-1, 1], "skipped": (B_local,) int32} with
    B_local = global_batch_size // process_count, starting at global batch `start_batch`. Images with a short
    side < `min_side` (default ceil(R / 4)) are dropped; `read_threads` decode in parallel within each process
    (or worker), `prefetch_buffer_size` (default max(2 * B_local, read_threads)) images ahead. `crop_scale`
    (see `random_crop_adm`) and `channel_shuffle` (a random permutation of R, G, B per image) are optional
    augmentations, off by default. Decoded files stay in memory while the training set fits in `decoded_cache_mb`
    per process (`DecodedCache`; 0: off); the batches are the same either way.
    """

    def build(start: int) -> grain.DatasetIterator:
        return iter(
            make_train_dataset(
                source,
                resolution=resolution,
                global_batch_size=global_batch_size,
                seed=seed,
                process_index=process_index,
                process_count=process_count,
                num_workers=num_workers,
                num_epochs=num_epochs,
                min_side=min_side,
                read_threads=read_threads,
                prefetch_buffer_size=prefetch_buffer_size,
                start_batch=start,
                crop_scale=crop_scale,
                channel_shuffle=channel_shuffle,
                decoded_cache_mb=decoded_cache_mb,
            )
        )

    return TrainIterator(build, start_batch, build(start_batch))


class TrainIterator(grain.DatasetIterator):
    """The training iterator; its state carries the global batch it was built at, next to grain's state.

    grain's state counts positions from where the pipeline starts, so the start must travel with it: a job
    that restarted at step s (`restart_at`, after a process-count change) writes checkpoints that later jobs
    restore exactly, whatever their own starting point.
    """

    def __init__(self, build: Callable[[int], grain.DatasetIterator], start_batch: int, first: grain.DatasetIterator):
        super().__init__(first)  # `first` = build(start_batch), built by the caller (a failed build leaves no object)
        self._build, self._start = build, start_batch

    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return {"start_batch": self._start, "grain": self._parent.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        if "grain" not in state:  # written before the start was recorded: a pipeline started at 0
            state = {"start_batch": 0, "grain": state}
        self.restart_at(int(state["start_batch"]))
        self._parent.set_state(state["grain"])

    def restart_at(self, batch: int) -> None:
        """Continue with global batch `batch` (a fresh pipeline; no saved state needed)."""
        if batch != self._start:
            self._parent.close()
            self._start, self._parents = batch, (self._build(batch),)


class EvalLoader:
    """One deterministic pass, `len(self)` fixed-shape batches on every process; iterate it again for a new pass."""

    def __init__(self, dataset: grain.IterDataset, num_batches: int, num_examples: int):
        self.dataset, self.num_batches, self.num_examples = dataset, num_batches, num_examples

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        return iter(self.dataset)


def make_eval_loader(
    source,
    *,
    resolution: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    min_side: int | None = None,
    read_threads: int = 16,
    label_fn: Callable[[Any], int] | None = None,
    segments: Sequence[int] | None = None,
) -> EvalLoader:
    """ADM-center-cropped evaluation batches {"image", "mask", "skipped"}; process p gets records p, p + n, ...

    All processes yield ceil(ceil(N / n) / batch_size) batches: the tail is padded with mask=0 entries.
    With `label_fn` (record -> int class id), batches also hold "label" (B,) int32: -1 where mask is 0.
    `segments` (one process): lengths of consecutive runs of `source` that each start a new batch, the batch before
    padded with mask=0 entries. A record's place in its batch then depends only on its place in its segment, which
    XLA's CPU kernels need for the same bits: on an AVX2 CPU an image's encoding moves by float32 ulps with its row
    in the batch (a resumed latents shard is encoded alone and must equal the one it replaces).
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    min_side = math.ceil(resolution / 4) if min_side is None else min_side
    n = len(source)
    decode = _EvalDecode(resolution, min_side, label_fn)
    if segments is None:
        num_batches = math.ceil(math.ceil(n / process_count) / batch_size)
        shard = grain.MapDataset.source(_SafeSource(source))[process_index::process_count]
        ds, num_examples = shard.map(decode), len(shard)
        pad = num_batches * batch_size - len(shard)
        if pad:
            padding = grain.MapDataset.range(pad).map(_Padding(resolution, with_label=label_fn is not None))
            ds = grain.MapDataset.concatenate([ds, padding])
    else:
        if process_count != 1:
            raise ValueError(f"segments are for one process, got process_count={process_count}")
        if any(s < 0 for s in segments) or sum(segments) != n:
            raise ValueError(f"segments must be >= 0 and sum to the {n} records, got {list(segments)}")
        ends = np.cumsum(segments, dtype=np.int64)
        slots = [np.r_[np.arange(b - s, b), np.full(-s % batch_size, -1)] for s, b in zip(segments, ends, strict=True)]
        layout = _SegmentLayout(_SafeSource(source), np.concatenate([np.zeros(0, np.int64), *slots]).astype(np.int64))
        ds, num_examples = grain.MapDataset.source(layout).map(decode), n
        num_batches = len(layout) // batch_size
    read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2 * batch_size, read_threads))
    ds = ds.to_iter_dataset(read).batch(batch_size, drop_remainder=True)
    return EvalLoader(ds, num_batches, num_examples)


__all__ = [
    "BUNDLED_TRAIN",
    "BUNDLED_VALIDATION",
    "SPLIT_DIRS",
    "CountSkippedIterDataset",
    "DECODED_CACHE_MB",
    "DecodedCache",
    "EvalLoader",
    "ImageFileSource",
    "TrainIterator",
    "bundled_photos",
    "make_eval_loader",
    "make_source",
    "make_train_dataset",
    "make_train_loader",
    "open_record",
    "random_crop_adm",
    "split_folders",
]
