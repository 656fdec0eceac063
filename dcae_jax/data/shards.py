"""ArrayRecord image shards: a large image folder packed once, so that every host of a pod opens a few hundred shard
files instead of listing and opening millions of small ones (`python -m dcae_jax.pack`; the data spec
`arrayrecord:DEST` reads them in the trainer, evaluate, fid_stats and precompute_latents).

    result = pack_folder("/data/photos", "gs://bucket/photos-ar", images_per_shard=1024)   # rerun to resume
    source = make_source("arrayrecord:gs://bucket/photos-ar", "train")    # dcae_jax.data.pipeline

Layout at DEST (local or gs://): `manifest.json` and, per split, `<split>/images-00000-of-00012.array_record`, ...
A source with train/ validation/ val/ test/ subfolders (the `folder:` convention) is packed per split folder, and
`arrayrecord:DEST` resolves a split name as `folder:SRC` does (validation -> validation/ or val/); a source without
them is packed as the one split `all`, served for any split name, again as `folder:` serves it.

Record, one per image (`encode_record` / `decode_record`; no pickle): the 8 bytes `DCAEIMG1`, a little-endian
uint32 n, n bytes of UTF-8 JSON `{"file_name": path below the split folder, "label": int}`, then the image file's
bytes unchanged (never re-encoded, so the pixels are the file's). A read yields the dict `{"image": bytes,
"file_name": str, "label": int}`, the shape of a tfds record, which `pipeline.open_record` decodes, so the training
and evaluation pipelines run unchanged. `label` is `folder:`'s ImageFolder label (`dcae_jax.data.precompute`):
the sorted class sub-folder names of the split folder are 0..K-1, a flat folder gives 0, and images lying next to
class sub-folders (no labelling) get -1 and no class names.

Manifest (`manifest.json`, JSON; FORMAT, VERSION): `source`, `images_per_shard`, `min_side`, `split_subfolders`,
`complete`, `num_images`, `num_skipped`, and `splits`: {name: {`num_files`, `listing_sha256` (of the sorted file
list: the shard assignment), `num_shards`, `num_images`, `num_skipped`, `class_names`, `label_source`, `shards`:
[{`index`, `file` (relative to DEST), `num_records`, `num_bytes`, `num_skipped`}], `skipped`: [{`file`, `reason`,
`shard`}]}}. It is rewritten atomically after every finished shard (a local temporary file renamed; one object
upload on gs://), so it always describes shards that are complete at DEST.

Packing: a split's sorted image list (`list_images`, the order `folder:` reads) is cut into shards of
`images_per_shard` consecutive files, so shard k always holds the same files. Every file is read and decoded before
it is packed; those that fail (unreadable, corrupt, not an image, or a short side below `min_side`) are listed in
the manifest with the reason and left out, never silently lost. Files without an image extension are not images to
`folder:` either and are not looked at. A shard is written to a local file (ArrayRecord's writer cannot write to
gs://; the temporary folder is $TMPDIR's for a gs:// DEST, DEST itself for a local one), checked, and copied to
DEST in one upload (renamed into place locally). A rerun resumes: shards the manifest lists and DEST holds with
their recorded size are neither rebuilt nor uploaded again; a DEST packed from another file list or with other
settings is refused.

Reading (`open_source`): the manifest is checked (format, version, finished, every field), every shard of the split
is opened once, in parallel, to check that it is there and holds the recorded number of records (else an error
naming the file), then records are served by grain's `ArrayRecordDataSource` (random access; picklable to grain's
worker processes; gs:// read natively).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import struct
from collections.abc import Callable, Sequence
from typing import Any

import grain
from array_record.python import array_record_module

from dcae_jax.data.images import IMAGE_EXTENSIONS, ImageReadError, as_path, decode_image_bytes, list_images
from dcae_jax.data.pipeline import SPLIT_DIRS, split_folders
from dcae_jax.runtime import paths

FORMAT = "dcae_jax.image_shards"
VERSION = 1
MANIFEST = "manifest.json"
MAGIC = b"DCAEIMG1"
ALL_SPLITS = "all"  # the one split of a source without split subfolders
# One record per chunk (grain's random access needs group_size 1); images are compressed already.
WRITER_OPTIONS = "group_size:1,uncompressed"


# ----------------------------------------------------------------------------------------------
# Records.


def encode_record(image: bytes, file_name: str, label: int) -> bytes:
    """One packed image: MAGIC, uint32 header length, JSON header, the file's bytes as they are."""
    header = json.dumps({"file_name": file_name, "label": int(label)}, ensure_ascii=False).encode()
    return MAGIC + struct.pack("<I", len(header)) + header + image


def decode_record(record: bytes, where: str = "record") -> dict[str, Any]:
    """A packed record -> {"image": the file's bytes, "file_name", "label"}; ValueError naming `where` if it is not one."""
    start = len(MAGIC) + 4
    if len(record) < start or record[: len(MAGIC)] != MAGIC:
        raise ValueError(f"{where}: not a dcae_jax image record (no {MAGIC.decode()} header)")
    (n,) = struct.unpack_from("<I", record, len(MAGIC))
    try:
        header = json.loads(record[start : start + n].decode())
        return {"image": record[start + n :], "file_name": str(header["file_name"]), "label": int(header["label"])}
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{where}: bad image record header ({type(err).__name__}: {err})") from None


# ----------------------------------------------------------------------------------------------
# Planning: which files go to which shard (a pure function of the sorted file list).


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """One split folder's files in `folder:` order, their relative names and ImageFolder labels."""

    name: str
    files: list[str]
    rel: list[str]
    labels: list[int]
    class_names: list[str]
    label_source: str

    def num_shards(self, images_per_shard: int) -> int:
        return max(1, math.ceil(len(self.files) / images_per_shard))

    def listing_sha256(self) -> str:
        return hashlib.sha256("\n".join(self.rel).encode()).hexdigest()


def _relative(files: Sequence, base) -> list[str]:
    """The files' names below `base` ('/'-separated): what records and the manifest name them by."""
    if isinstance(base, pathlib.Path):  # local ("." included, which pathlib drops from its children)
        return [f.relative_to(base).as_posix() for f in files]
    prefix = os.fspath(base).rstrip("/") + "/"
    rel = [os.fspath(f) for f in files]
    if not all(r.startswith(prefix) for r in rel):
        raise ValueError(f"{base}: listed files outside the folder")  # a backend spelling paths differently
    return [r[len(prefix) :] for r in rel]


def folder_labels(rel: Sequence[str], folder_name: str) -> tuple[list[int], list[str], str]:
    """ImageFolder labels as `dcae_jax.data.precompute` gives `folder:` sources, except that a folder mixing images and
    class sub-folders is packed unlabelled (-1) instead of refused: training an autoencoder needs no labels."""
    tops = [r.split("/") for r in rel]
    classes = sorted({t[0] for t in tops if len(t) > 1})
    if not classes:
        return [0] * len(rel), [folder_name or ALL_SPLITS], "none (flat folder)"
    if any(len(t) == 1 for t in tops):
        return [-1] * len(rel), [], "none (images next to class sub-folders)"
    index = {c: i for i, c in enumerate(classes)}
    return [index[t[0]] for t in tops], classes, "folder"


def plan_splits(src: str) -> tuple[list[SplitPlan], bool]:
    """The splits of a `folder:` root (local or gs://) and whether it has split subfolders."""
    base = as_path(src)
    if not base.is_dir():
        raise FileNotFoundError(f"{src}: not a directory")
    names = split_folders(base)
    plans = []
    for name, folder in [(d, base / d) for d in names] or [(ALL_SPLITS, base)]:
        files = list_images(folder)
        rel = _relative(files, folder)
        labels, class_names, how = folder_labels(rel, folder.name)
        plans.append(SplitPlan(name, [os.fspath(f) for f in files], rel, labels, class_names, how))
    if not any(p.files for p in plans):
        raise ValueError(f"{src}: no image files (extensions: {' '.join(IMAGE_EXTENSIONS)})")
    return plans, bool(names)


def shard_name(split: str, index: int, num_shards: int) -> str:
    return f"{split}/images-{index:05d}-of-{num_shards:05d}.array_record"


# ----------------------------------------------------------------------------------------------
# Packing.


@dataclasses.dataclass(frozen=True)
class PackResult:
    """What `pack_folder` did: the final manifest, where it is, and how many shards this run wrote / found done."""

    manifest: dict[str, Any]
    manifest_path: str
    written: int
    kept: int


def _read_checked(path: str, min_side: int) -> bytes | str:
    """The file's bytes if it decodes to an image with a short side >= `min_side`, else the reason it does not."""
    try:
        data = as_path(path).read_bytes()
        img = decode_image_bytes(data, path)
    except ImageReadError as err:
        return err.reason
    except Exception as err:  # a failed read (permissions, network, ...) is a skipped file, named in the manifest
        return f"{type(err).__name__}: {err}"
    if min(img.size) < min_side:
        return f"too small {img.size}, short side < {min_side}"
    return data


def _checked_files(files: Sequence[str], min_side: int, pool, window: int):
    """`_read_checked` of each file, in order, `window` files in flight at a time (memory stays bounded)."""
    for start in range(0, len(files), window):
        yield from pool.map(lambda f: _read_checked(f, min_side), files[start : start + window])


def _write_shard(local: str, plan: SplitPlan, lo: int, hi: int, min_side: int, pool, window: int):
    """Writes files [lo, hi) of the split that decode into the ArrayRecord file `local`; (records, skipped)."""
    writer = array_record_module.ArrayRecordWriter(local, WRITER_OPTIONS)
    if not writer.ok():
        raise OSError(f"{local}: cannot write an ArrayRecord file here")
    count, skipped = 0, []
    for i, got in zip(range(lo, hi), _checked_files(plan.files[lo:hi], min_side, pool, window)):
        if isinstance(got, str):
            skipped.append({"file": plan.rel[i], "reason": got})
        else:
            writer.write(encode_record(got, plan.rel[i], plan.labels[i]))
            count += 1
    ok = writer.ok()
    writer.close()
    if not ok or _count_records(local) != count:
        raise OSError(f"{local}: the ArrayRecord writer failed (disk full?)")
    return count, skipped


def _count_records(path: str) -> int | None:
    """Records in an ArrayRecord file, or None if it is missing or unreadable (the reader reports, never raises)."""
    try:
        reader = array_record_module.ArrayRecordReader(path)
    except Exception:
        return None
    if not reader.ok():
        return None
    n = reader.num_records()
    reader.close()
    return n


def _new_manifest(src: str, plans: list[SplitPlan], has_splits: bool, images_per_shard: int, min_side: int) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "source": src,
        "images_per_shard": images_per_shard,
        "min_side": min_side,
        "split_subfolders": has_splits,
        "complete": False,
        "splits": {
            p.name: {
                "num_files": len(p.files),
                "listing_sha256": p.listing_sha256(),
                "num_shards": p.num_shards(images_per_shard),
                "class_names": p.class_names,
                "label_source": p.label_source,
                "shards": [],
                "skipped": [],
            }
            for p in plans
        },
    }


def _resume_from(old: dict, new: dict, where: str) -> dict:
    """`new` with the finished shards of the earlier run's manifest `old`, if it packed the same files the same way."""
    for key in ("format", "version", "images_per_shard", "min_side", "split_subfolders"):
        if old.get(key) != new[key]:
            raise ValueError(
                f"{where}: packed with {key}={old.get(key)!r}, this run has {new[key]!r}; use the same settings, "
                "another destination, or delete it"
            )
    for name, split in new["splits"].items():
        prev = old.get("splits", {}).get(name)
        if prev is None or prev.get("listing_sha256") != split["listing_sha256"]:
            raise ValueError(
                f"{where}: split {name!r} was packed from another file list (the source changed since?); "
                "pack into another destination or delete it"
            )
        split["shards"], split["skipped"] = list(prev.get("shards", [])), list(prev.get("skipped", []))
    return new


def _finish(manifest: dict) -> dict:
    for split in manifest["splits"].values():
        split["shards"].sort(key=lambda s: s["index"])
        split["skipped"].sort(key=lambda s: (s["shard"], s["file"]))
        split["num_images"] = sum(s["num_records"] for s in split["shards"])
        split["num_skipped"] = len(split["skipped"])
    splits = manifest["splits"].values()
    manifest["num_images"] = sum(s["num_images"] for s in splits)
    manifest["num_skipped"] = sum(s["num_skipped"] for s in splits)
    manifest["complete"] = all(len(s["shards"]) == s["num_shards"] for s in splits)
    return manifest


def pack_folder(
    src: str,
    dest: str,
    *,
    images_per_shard: int = 1024,
    min_side: int = 0,
    read_threads: int = 16,
    progress: Callable[[str, dict], None] | None = None,
) -> PackResult:
    """Packs the image folder `src` into ArrayRecord shards at `dest` (both local or gs://); resumable (module doc).

    `progress(split, shard_entry)` is called after each shard is at `dest` and in the manifest.
    """
    if images_per_shard < 1 or read_threads < 1 or min_side < 0:
        raise ValueError("images_per_shard and read_threads must be >= 1, min_side >= 0")
    src = src.removeprefix("folder:")
    out = paths.path(dest, "dest")
    plans, has_splits = plan_splits(src)
    manifest = _new_manifest(src, plans, has_splits, images_per_shard, min_side)
    mpath, saved = out / MANIFEST, None
    if mpath.exists():
        saved = mpath.read_text()
        manifest = _resume_from(_load_json(mpath, saved), manifest, os.fspath(out))

    def save() -> None:  # every request counts on object storage: only a changed manifest is written
        nonlocal saved
        text = json.dumps(_finish(manifest), indent=1, ensure_ascii=False)
        if text != saved:
            paths.write_text_atomic(mpath, text)
            saved = text

    with concurrent.futures.ThreadPoolExecutor(read_threads) as pool:
        kept = _drop_missing(manifest, out, pool)
        written = 0
        for plan in plans:
            split = manifest["splits"][plan.name]
            done = {s["index"] for s in split["shards"]}
            n = split["num_shards"]
            if not paths.is_remote(out):  # object storage has no folders to make
                (out / plan.name).mkdir(parents=True, exist_ok=True)
            for k in sorted(set(range(n)) - done):
                lo, hi = k * images_per_shard, min((k + 1) * images_per_shard, len(plan.files))
                name = shard_name(plan.name, k, n)
                with paths.writing(out / name) as local:
                    count, skipped = _write_shard(local, plan, lo, hi, min_side, pool, 4 * read_threads)
                    size = os.path.getsize(local)
                entry = {"index": k, "file": name, "num_records": count, "num_bytes": size, "num_skipped": len(skipped)}
                split["shards"].append(entry)
                split["skipped"] += [{**s, "shard": k} for s in skipped]
                save()
                written += 1
                if progress is not None:
                    progress(plan.name, entry)
    save()
    return PackResult(manifest, os.fspath(mpath), written, kept)


def _drop_missing(manifest: dict, out, pool) -> int:
    """Forgets manifest shards that DEST no longer holds whole (they are packed again); returns how many remain."""
    entries = [s for split in manifest["splits"].values() for s in split["shards"]]

    def present(entry: dict) -> bool:  # one stat per shard
        try:
            return paths.size(out / entry["file"]) == entry["num_bytes"]
        except OSError:  # missing
            return False

    keep = dict(zip(map(id, entries), pool.map(present, entries)))
    for split in manifest["splits"].values():
        lost = {s["index"] for s in split["shards"] if not keep[id(s)]}
        split["shards"] = [s for s in split["shards"] if keep[id(s)]]
        split["skipped"] = [s for s in split["skipped"] if s["shard"] not in lost]
    return sum(keep.values())


# ----------------------------------------------------------------------------------------------
# Reading.


def _load_json(p, text: str | None = None) -> dict:
    """The JSON object in the manifest `p` (its `text` if already read); a clear error if it is not one."""
    try:
        data = json.loads(p.read_text() if text is None else text)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{p}: not a pack manifest ({type(err).__name__}: {err}); pack again into a new folder"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: not a pack manifest (a JSON object expected)")
    return data


def _need(d: Any, key: str, kind: type, where: str) -> Any:
    """d[key] if it is a `kind` (a bool is not an int here), else a ValueError naming the file and the field."""
    v = d.get(key) if isinstance(d, dict) else None
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise ValueError(f"{where}: field {key!r} missing or not {kind.__name__}")
    return v


def read_manifest(root: str) -> dict[str, Any]:
    """The checked manifest of a packed folder; errors name the file and the field."""
    p = paths.path(root, "arrayrecord") / MANIFEST
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file; pack a folder there with python -m dcae_jax.pack --dest={root}")
    m = _load_json(p)
    where = os.fspath(p)
    if m.get("format") != FORMAT:
        raise ValueError(f"{where}: field 'format' is {m.get('format')!r}, not {FORMAT!r}")
    if m.get("version") != VERSION:
        raise ValueError(f"{where}: format version {m.get('version')!r}; this dcae_jax reads version {VERSION}")
    _need(m, "split_subfolders", bool, where)
    for name, split in _need(m, "splits", dict, where).items():
        at = f"{where} splits.{name}"
        for key in ("num_shards", "num_images"):
            _need(split, key, int, at)
        _need(split, "class_names", list, at)
        for i, s in enumerate(_need(split, "shards", list, at)):
            _need(s, "file", str, f"{at}.shards[{i}]")
            _need(s, "num_records", int, f"{at}.shards[{i}]")
        if len(split["shards"]) != split["num_shards"]:
            raise ValueError(
                f"{where}: split {name!r} has {len(split['shards'])} of {split['num_shards']} shards: packing did not "
                "finish; rerun python -m dcae_jax.pack with the same flags to complete it"
            )
    if not m["splits"]:
        raise ValueError(f"{where}: field 'splits' is empty")
    return m


def _check_shards(files: list[str], counts: list[int], threads: int = 16) -> None:
    """Opens every shard once (in parallel): there, and holding the manifest's record count; else one clear error."""
    with concurrent.futures.ThreadPoolExecutor(min(threads, len(files))) as pool:
        found = list(pool.map(_count_records, files))
    for f, want, got in zip(files, counts, found):
        if got is None:
            raise FileNotFoundError(f"{f}: shard missing or not an ArrayRecord file (the manifest lists it)")
        if got != want:
            raise ValueError(f"{f}: {got} records, the manifest says {want}; the shard is damaged, pack again")


class ArrayRecordImageSource:
    """A random-access grain source over one split of a packed folder; records are
    {"image": file bytes, "file_name": path below the split folder, "label": int} (module docstring)."""

    def __init__(
        self,
        files: Sequence[str],
        counts: Sequence[int],
        name: str,
        class_names: Sequence[str] = (),
        label_source: str = "folder",
    ):
        self.name, self.class_names, self.label_source = name, list(class_names), label_source
        self.files, self.counts = list(files), list(counts)
        # "path[0:n]": grain takes the count from the manifest instead of opening each file again.
        kept = [(f, n) for f, n in zip(self.files, self.counts) if n]
        self._data = grain.sources.ArrayRecordDataSource([f"{f}[0:{n}]" for f, n in kept])

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return decode_record(self._data[index], f"{self.name} record {index}")

    def __repr__(self) -> str:
        return f"ArrayRecordImageSource({self.name!r}, {len(self)} images in {len(self.files)} shards)"


def split_key(manifest: dict, split: str, where: str) -> str:
    """The manifest's split for a split name, as `folder:` resolves it (validation -> validation/ or val/)."""
    if not manifest["split_subfolders"]:
        return ALL_SPLITS
    for key in SPLIT_DIRS.get(split, (split,)):
        if key in manifest["splits"]:
            return key
    raise FileNotFoundError(f"{where} has no split {split!r} (it has {', '.join(manifest['splits'])})")


def open_source(root: str, split: str, verify: bool = True) -> ArrayRecordImageSource:
    """`arrayrecord:ROOT` for `split`: checks the manifest and (with `verify`) every shard of the split, then reads."""
    m = read_manifest(root)
    base = paths.path(root, "arrayrecord")
    key = split_key(m, split, f"arrayrecord:{root}")
    s = m["splits"][key]
    if not s["num_images"]:
        raise ValueError(
            f"arrayrecord:{root} split {key!r}: no images ({len(s.get('skipped', []))} skipped, see {MANIFEST})"
        )
    files = [os.fspath(base / e["file"]) for e in s["shards"]]
    counts = [e["num_records"] for e in s["shards"]]
    if sum(counts) != s["num_images"]:
        raise ValueError(f"{base / MANIFEST}: split {key!r} num_images {s['num_images']} != the shards' {sum(counts)}")
    if verify:
        _check_shards(files, counts)
    return ArrayRecordImageSource(
        files, counts, f"{os.fspath(base)}/{key}", s["class_names"], s.get("label_source", "")
    )


__all__ = [
    "FORMAT",
    "MANIFEST",
    "VERSION",
    "ArrayRecordImageSource",
    "PackResult",
    "decode_record",
    "encode_record",
    "open_source",
    "pack_folder",
    "read_manifest",
]
