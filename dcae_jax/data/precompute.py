"""A dataset encoded into DC-AE latents for diffusion training (the reference's `dc_ae_generate_latent.py` step).

The library behind `python -m dcae_jax.precompute_latents` (`precompute`, `report`); the diffusion trainer calls
`precompute` itself when it is given images and an autoencoder instead of latents.

Every record of the split (`folder:DIR`, `tfds:NAME[@DATA_DIR]` or `bundled`, as `dcae_jax.data.pipeline`) is
ADM-center-cropped to R x R and encoded; the latent times the scaling factor is stored as float32 NHWC with the
record's class id (format: `dcae_jax.data.latents`, read with `LatentDataset` / `make_latent_train_loader`).

Labels: `tfds:` uses the dataset's `label` feature (class names from its ClassLabel). `folder:DIR` follows
torchvision's ImageFolder: the sorted names of the class sub-folders of the split folder are classes 0..K-1 (an image
belongs to the sub-folder it lies in, at any depth); a flat folder gives every image label 0 (with a warning).
`bundled` (the real photos inside scikit-image / scikit-learn / matplotlib) labels a photo by the package it ships
in: 0 skimage, 1 sklearn, 2 matplotlib.

Scaling factor: `--scaling_factor` if given; else the model's `config.scaling_factor` (the released DC-AEs carry
the reference's values, e.g. 0.3189 for f32c32); else (a newly trained model without one) or with
`--scaling_factor auto`, 1 / RMS of the unscaled latents of `--auto_scale_examples` records spread evenly over the
split (the paper's definition), rounded to 6 significant digits. The final report gives the RMS over the whole set
and the factor it implies, to check a factor or estimate one for a new autoencoder.

Work split: the records form fixed-size shards of `--shard_size`; process p of P writes shards p, p + P, ... with
the DC-AE data-parallel over its local devices (`--batch_size` images per process and step, rounded up to a
multiple of the local device count). Each shard is written atomically; a rerun with the same settings skips
finished shards (a missing, truncated or foreign one is rewritten) and refuses an OUT that holds another run.
Process 0 writes metadata.json last, with statistics summed over all shards. Unreadable or too-small records are
left out and counted, never fatal. OUT must be on a filesystem that every process sees.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import sys
import time
import warnings
from typing import Any

import numpy as np
from absl import logging

from dcae_jax.data import latents as fmt
from dcae_jax.runtime import distributed, paths

DTYPES = ("float32", "bfloat16")
BUNDLED_PACKAGES = ("skimage", "sklearn", "matplotlib")


# ----------------------------------------------------------------------------------------------
# Labels (picklable record -> class id functions for `make_eval_loader(label_fn=...)`).


@dataclasses.dataclass(frozen=True)
class FolderLabels:
    """ImageFolder: the class is the first path component below `base` (a flat folder: 0)."""

    base: str
    class_to_index: dict[str, int]

    def __call__(self, record: str) -> int:
        parts = pathlib.Path(record).relative_to(self.base).parts
        return self.class_to_index[parts[0]] if len(parts) > 1 else 0


@dataclasses.dataclass(frozen=True)
class FeatureLabel:
    """tfds: the record's `label` feature."""

    key: str = "label"

    def __call__(self, record: dict) -> int:
        return int(np.asarray(record[self.key]))


@dataclasses.dataclass(frozen=True)
class ConstantLabel:
    value: int = 0

    def __call__(self, record: Any) -> int:
        return self.value


@dataclasses.dataclass(frozen=True)
class BundledLabels:
    """The index in `BUNDLED_PACKAGES` of the package a bundled photo ships in."""

    def __call__(self, record: str) -> int:
        from dcae_jax.data.pipeline import BUNDLED_TRAIN, BUNDLED_VALIDATION

        package = {name: pkg for pkg, name in BUNDLED_TRAIN + BUNDLED_VALIDATION}[pathlib.Path(record).name]
        return BUNDLED_PACKAGES.index(package)


def folder_labels(paths: list[str], base: str) -> tuple[FolderLabels, list[str]]:
    """ImageFolder labels for the files of a folder source (sorted class sub-folder names -> 0..K-1)."""
    tops = [pathlib.Path(p).relative_to(base).parts for p in paths]
    classes = sorted({t[0] for t in tops if len(t) > 1})
    flat = sum(len(t) == 1 for t in tops)
    if classes and flat:
        raise ValueError(
            f"{base}: {flat} image(s) lie directly in the folder next to class sub-folders {classes[:5]}"
            f"{' ...' if len(classes) > 5 else ''}; labels follow the sub-folders (ImageFolder): move them into one"
        )
    if not classes:
        warnings.warn(f"{base}: no class sub-folders, every image gets label 0", stacklevel=3)
        return FolderLabels(base, {}), [pathlib.Path(base).name or "all"]
    return FolderLabels(base, {c: i for i, c in enumerate(classes)}), classes


def open_labeled_source(data: str, split: str, max_images: int | None):
    """(source, label_fn, class_names, label_source) for a data spec; `max_images` keeps the first N records."""
    from dcae_jax.data.batches import HeadSource
    from dcae_jax.data.pipeline import make_source

    source = make_source(data, split)
    kind = data.partition(":")[0]
    if kind == "folder":
        label_fn, class_names = folder_labels(source.paths, source.name)
        label_source = "folder" if class_names and label_fn.class_to_index else "none (flat folder)"
    elif kind == "bundled":
        label_fn, class_names, label_source = BundledLabels(), list(BUNDLED_PACKAGES), "bundled package"
    elif kind == "arrayrecord" and source.class_names:  # packed by dcae_jax.pack with the folder's classes
        label_fn, class_names, label_source = FeatureLabel(), source.class_names, source.label_source
    elif kind == "arrayrecord":  # packed unlabelled (images next to class sub-folders): one class, as a flat folder
        warnings.warn(f"{data}: packed without labels ({source.label_source}), every image gets label 0", stacklevel=2)
        label_fn, class_names, label_source = ConstantLabel(0), ["all"], source.label_source
    else:  # tfds
        features = getattr(getattr(source, "dataset_info", None), "features", None)
        has_label = "label" in features if features is not None else len(source) and "label" in source[0]
        if has_label:
            names = getattr(features["label"], "names", None) if features is not None else None
            label_fn, class_names, label_source = FeatureLabel(), list(names or []), "tfds label"
        else:
            warnings.warn(f"{data}: no 'label' feature, every example gets label 0", stacklevel=2)
            label_fn, class_names, label_source = ConstantLabel(0), ["all"], "none (no label feature)"
    if max_images is not None:
        if max_images <= 0:
            raise ValueError(f"max_images must be positive, got {max_images}")
        source = HeadSource(source, max_images)
    return source, label_fn, class_names, label_source


# ----------------------------------------------------------------------------------------------
# Encoding.


class _Subset:
    """Records `indices` of a source, in that order (a grain source)."""

    def __init__(self, source, indices):
        self._source, self._indices = source, [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, k: int):
        return self._source[self._indices[k]]


class Encoder:
    """The DC-AE's encode, jitted data-parallel over this process's devices (no cross-process collectives)."""

    def __init__(self, ae, batch_size: int, latent_channels: int | None = None):
        import jax
        import jax.numpy as jnp
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from dcae_jax.autoencoder.model import DCAEModel
        from dcae_jax.runtime import sharding

        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        n = jax.local_device_count()
        self.batch_size = -(-batch_size // n) * n
        mesh = sharding.make_mesh([-1], ["data"], devices=jax.local_devices())
        rep, self.sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        f = ae.config.spatial_compression_ratio

        def encode(variables, images):
            x = images.astype(ae.dtype)
            h, w = x.shape[1:3]
            if h % f or w % f:  # as DCAE.encode: edge-pad to a multiple of f
                x = jnp.pad(x, ((0, 0), (0, -h % f), (0, -w % f), (0, 0)), mode="edge")
            z = ae.model.apply(variables, x, latent_channels=latent_channels, method=DCAEModel.encode)
            return z.astype(jnp.float32)

        step = jax.jit(encode, in_shardings=(rep, self.sharding), out_shardings=self.sharding)
        variables = jax.device_put(ae.variables, rep)
        self.step = lambda images: step(variables, images)

    def run(
        self, source, resolution: int, consume, desc: str, label_fn=None, read_threads: int = 16, segments=None
    ) -> None:
        """consume(z (B, h, w, c) float32 unscaled, batch {"mask", "label"?, ...}) for every batch, in order;
        `segments`: runs of records that each start a new batch (`make_eval_loader`)."""
        from dcae_jax.data.batches import run_batches
        from dcae_jax.data.pipeline import make_eval_loader

        if len(source) == 0:
            return
        loader = make_eval_loader(
            source,
            resolution=resolution,
            batch_size=self.batch_size,
            read_threads=read_threads,
            label_fn=label_fn,
            segments=segments,
        )
        run_batches(loader, self.step, consume, self.sharding, len(loader), desc)


def measure_rms(encoder: Encoder, source, resolution: int, num: int, read_threads: int = 16) -> tuple[float, int]:
    """(RMS of the unscaled latents, images used) over `num` records spread evenly over `source`, all processes."""
    import jax

    picks = np.unique(np.linspace(0, len(source) - 1, min(num, len(source))).round().astype(np.int64))
    mine = picks[jax.process_index() :: jax.process_count()]
    sums = np.zeros(3)  # images, elements, sum of squares

    def consume(z: np.ndarray, batch: dict[str, np.ndarray]) -> None:
        m = np.asarray(batch["mask"]) > 0
        zm = np.asarray(z, np.float64)[m]
        sums[:] += (m.sum(), zm.size, np.square(zm).sum())

    encoder.run(_Subset(source, mine), resolution, consume, "measure latent rms", read_threads=read_threads)
    images, count, sq = distributed.process_sum(sums)
    if count == 0:
        raise ValueError("no readable image among the records measured for the scaling factor")
    return math.sqrt(sq / count), round(images)


class _ShardAssembler:
    """Collects encoded batches (in record order) and writes each shard as soon as all its records are in.

    Every shard starts a new batch (the loader's segments), so a record's place in its batch, and with it the
    float32 rounding of its latent, is the same whichever shards a run encodes: a resumed shard is byte-identical.
    """

    def __init__(self, out, shards, batch_size: int, scale: float, run_id: str, num_shards: int, on_written):
        self.out, self.pending = out, list(shards)
        self.scale, self.run_id, self.num_shards, self.on_written = np.float32(scale), run_id, num_shards, on_written
        # Per batch slot: a record (True) or the padding that ends a shard's last batch (False).
        sizes = [stop - start for _, start, stop in shards]
        self.real = np.concatenate(
            [np.zeros(0, bool)] + [np.r_[np.ones(k, bool), np.zeros(-k % batch_size, bool)] for k in sizes]
        )
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.have = self.pos = 0

    def __call__(self, z: np.ndarray, batch: dict[str, np.ndarray]) -> None:
        real = self.real[self.pos : self.pos + z.shape[0]]
        self.pos += z.shape[0]
        self.parts.append(tuple(np.asarray(a)[real] for a in (z, batch["mask"], batch["label"])))
        self.have += int(real.sum())
        while self.pending and self.have >= self.pending[0][2] - self.pending[0][1]:
            self._write(*self.pending.pop(0))

    def _write(self, i: int, start: int, stop: int) -> None:
        z, m, y = (np.concatenate(a) for a in zip(*self.parts, strict=True))
        k = stop - start
        self.parts = [(z[k:], m[k:], y[k:])] if z.shape[0] > k else []
        self.have -= k
        keep = m[:k] > 0
        latents = z[:k][keep].astype(np.float32) * self.scale  # stored scaled (float32 multiply)
        bad = int(np.sum(~np.isfinite(latents).reshape(len(latents), -1).all(axis=1)))
        if bad:
            raise ValueError(
                f"{self.out}: shard {i} (examples {start}..{stop - 1}): the autoencoder gave non-finite (NaN/inf) "
                f"latents for {bad} of {len(latents)} images; the shard was not written (a diverged or corrupt model?)"
            )
        info = fmt.write_shard(
            self.out,
            i,
            self.num_shards,
            latents=latents,
            labels=y[:k][keep].astype(np.int32),
            indices=np.arange(start, stop, dtype=np.int64)[keep],
            start=start,
            stop=stop,
            run_id=self.run_id,
        )
        self.on_written(i, info)


# ----------------------------------------------------------------------------------------------
# The run.


def _barrier(name: str) -> None:

    distributed.barrier(name)


def _requested_scale(scaling_factor) -> float | str | None:
    if scaling_factor is None or scaling_factor == "":
        return None
    if isinstance(scaling_factor, str):
        if scaling_factor.lower() == "auto":
            return "auto"
        try:
            scaling_factor = float(scaling_factor)
        except ValueError:
            raise ValueError(f"scaling_factor must be a number or 'auto', got {scaling_factor!r}") from None
    value = float(scaling_factor)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"scaling_factor must be positive, got {value}")
    return value


def _sums(info: dict[str, Any]) -> np.ndarray:
    """A shard's sums as a vector: sum, sum of squares, per-channel sums, per-channel sums of squares."""
    return np.concatenate([[info["sum"], info["sum_sq"]], info["channel_sum"], info["channel_sum_sq"]]).astype(
        np.float64
    )


def precompute(
    model,
    data: str,
    resolution: int,
    out: str | os.PathLike,
    *,
    split: str = "train",
    batch_size: int = 32,
    shard_size: int = 1024,
    max_images: int | None = None,
    scaling_factor: float | str | None = None,
    auto_scale_examples: int = 2048,
    dtype: str = "float32",
    read_threads: int = 16,
    latent_channels: int | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Encodes `data` into the latents folder `out` (or finishes it); every process calls it. Returns metadata.json
    plus this call's counts (`shards_written`, `shards_skipped`, `seconds`).

    `model`: a path / repo id for `DCAE.from_pretrained`, or a `DCAE`. `scaling_factor`: a number, "auto", or None
    (the model's, else auto). `latent_channels`: keep only the first c channels (a DC-AE 1.5 model's structured
    latent); None: all.
    """
    import jax
    import jax.numpy as jnp

    from dcae_jax.autoencoder.pretrained import DCAE

    t_start = time.time()
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    requested = _requested_scale(scaling_factor)
    out = paths.path(out, "--out")
    is_main = jax.process_index() == 0
    p, num_procs = jax.process_index(), jax.process_count()

    ae = model if isinstance(model, DCAE) else DCAE.from_pretrained(model, dtype=getattr(jnp, dtype))
    model_label = ae.config.name if isinstance(model, DCAE) else str(model)
    source, label_fn, class_names, label_source = open_labeled_source(data, split, max_images)
    num_records = len(source)
    f = ae.config.spatial_compression_ratio
    if latent_channels is not None:
        from dcae_jax.autoencoder.model import check_latent_channels

        check_latent_channels(ae.config, latent_channels)
    if resolution % f:
        warnings.warn(
            f"--resolution={resolution} is not a multiple of the compression factor {f} of {model_label}: the images are "
            f"edge-padded to {-(-resolution // f) * f} before encoding (as DCAE.encode does; the trainers refuse it)",
            stacklevel=2,
        )
    latent_shape = [-(-resolution // f), -(-resolution // f), latent_channels or ae.config.latent_channels]
    num_shards = -(-num_records // shard_size)
    settings = {
        "format": fmt.FORMAT,
        "version": fmt.VERSION,
        "model": model_label,
        "model_name": ae.config.name,
        "dtype_compute": dtype,
        "data": data,
        "split": split,
        "resolution": resolution,
        "max_images": max_images,
        "num_records": num_records,
        "shard_size": shard_size,
        "num_shards": num_shards,
        "latent_shape": latent_shape,
        "class_names": class_names,
        "label_source": label_source,
    }
    encoder = Encoder(ae, batch_size, latent_channels)

    # The scaling factor: from an earlier run of this folder, the flag, the model, or measured.
    run_path = out / fmt.RUN
    _barrier("precompute_latents: start")  # every process decides from the same view of run.json
    if run_path.exists():
        previous = fmt.read_json(run_path)
        changed = sorted(k for k in settings if previous.get("settings", {}).get(k) != settings[k])
        if changed:
            raise ValueError(
                f"{run_path}: {out} holds latents of another run (changed: {changed}); use a new --out or delete it"
            )
        scale, scale_source = float(previous["scaling_factor"]), previous["scaling_factor_source"]
        if (isinstance(requested, float) and requested != scale) or (requested == "auto" and scale_source != "auto"):
            raise ValueError(
                f"{run_path}: this folder uses scaling_factor {scale} ({scale_source}), not {requested}; use a new --out"
            )
    else:
        if isinstance(requested, float):
            scale, scale_source = requested, "flag"
        elif requested is None and ae.config.scaling_factor is not None:
            scale, scale_source = float(ae.config.scaling_factor), "model"
        else:
            if requested is None and is_main:
                print(f"{model_label} has no scaling_factor: measuring 1/RMS of its latents", file=sys.stderr)
            rms, used = measure_rms(encoder, source, resolution, auto_scale_examples, read_threads)
            scale, scale_source = float(f"{1.0 / rms:.6g}"), "auto"
            if is_main:
                print(f"scaling_factor = 1/rms = {scale} (rms {rms:.6g} over {used} images)", file=sys.stderr)
        if is_main:
            out.mkdir(parents=True, exist_ok=True)
            fmt.write_json_atomic(
                run_path, {"settings": settings, "scaling_factor": scale, "scaling_factor_source": scale_source}
            )
    rid = fmt.run_id({**settings, "scaling_factor": scale})
    _barrier("precompute_latents: run.json")
    if is_main and (out / fmt.METADATA).exists():
        (out / fmt.METADATA).unlink()  # written again once every shard is there

    # This process's shards: finished ones are skipped, the others encoded and written.
    c = latent_shape[-1]
    shard_counts = np.zeros((num_shards, 2))  # examples, unreadable records: a row per shard, from its process
    shard_sums: dict[int, np.ndarray] = {}
    counts = np.zeros(3)  # shards written, skipped, rewritten (found but invalid)
    todo = []

    num_classes = len(class_names)
    label_counts = np.zeros(num_classes + 1)  # per class, then the number of shards whose index has no counts

    def done(i: int, info: dict[str, Any]) -> None:
        shard_counts[i] = info["num_examples"], info["num_unreadable"]
        shard_sums[i] = _sums(info)
        if "label_counts" not in info:  # written before label counts were recorded
            label_counts[-1] += 1
        for label, n in info.get("label_counts", {}).items():
            if 0 <= int(label) < num_classes:
                label_counts[int(label)] += n

    for i in range(p, num_shards, num_procs):
        start, stop = i * shard_size, min((i + 1) * shard_size, num_records)
        info, why = fmt.check_shard(out, i, num_shards, run_id=rid, start=start, stop=stop, latent_shape=latent_shape)
        if info is not None:
            done(i, info)
            counts[1] += 1
        else:
            if why != "missing":
                logging.warning("shard %d is rewritten: %s", i, why)
                counts[2] += 1
            todo.append((i, start, stop))
    indices = np.concatenate([np.arange(a, b) for _, a, b in todo]) if todo else np.zeros(0, np.int64)

    def written(i: int, info: dict[str, Any]) -> None:
        done(i, info)
        counts[0] += 1

    assembler = _ShardAssembler(out, todo, encoder.batch_size, scale, rid, num_shards, written)
    segments = [stop - start for _, start, stop in todo]
    encoder.run(_Subset(source, indices), resolution, assembler, "encode", label_fn, read_threads, segments)
    if assembler.pending:
        raise RuntimeError(f"process {p}: shards {[s[0] for s in assembler.pending]} got no data (loader ended early)")

    # Counts and float64 sums over all processes (one collective), then metadata.json from process 0.
    local = sum((shard_sums[i] for i in sorted(shard_sums)), np.zeros(2 + 2 * c))  # fixed order: reproducible
    packed = distributed.process_sum(np.concatenate([shard_counts.ravel(), local, counts, label_counts]))
    packed, label_counts = packed[: -(num_classes + 1)], packed[-(num_classes + 1) :]
    shard_counts = packed[: 2 * num_shards].reshape(num_shards, 2)
    total, total_sq = packed[2 * num_shards : 2 * num_shards + 2]
    ch_sum, ch_sum_sq = packed[2 * num_shards + 2 : -3].reshape(2, c)
    counts = packed[-3:]
    for i in range(num_shards):
        start, stop = i * shard_size, min((i + 1) * shard_size, num_records)
        if shard_counts[i].sum() != stop - start:
            got, bad = shard_counts[i]
            raise RuntimeError(f"shard {i}: {got:.0f} examples + {bad:.0f} unreadable != its {stop - start} records")
    n = round(shard_counts[:, 0].sum())
    if n == 0:
        raise ValueError(f"{data} [{split}]: none of the {num_records} records could be read")
    elements = n * math.prod(latent_shape[:2])  # per channel
    ch_mean = ch_sum / elements
    ch_var = ch_sum_sq / elements - ch_mean**2
    mean, rms = total / (elements * c), math.sqrt(total_sq / (elements * c))
    unscaled_rms = rms / scale
    metadata = {
        **settings,
        "created_by": "python -m dcae_jax.precompute_latents",
        "crop": "adm_center",
        "layout": "NHWC",
        "dtype": "float32",
        "scaling_factor": scale,
        "scaling_factor_source": scale_source,
        "latents_scaled": True,
        "num_examples": n,
        "num_unreadable": num_records - n,
        "num_classes": len(class_names),
        # Examples per class (None when some shard predates the counts): which classes training can learn.
        "label_counts": None if label_counts[-1] else [round(v) for v in label_counts[:-1]],
        "shards": [
            {
                "file": f"{fmt.shard_stem(i, num_shards)}.npy",
                "num_examples": round(shard_counts[i, 0]),
                "start": i * shard_size,
                "stop": min((i + 1) * shard_size, num_records),
            }
            for i in range(num_shards)
        ],
        "stats": {
            "mean": mean,
            "std": math.sqrt(max(rms**2 - mean**2, 0.0)),
            "rms": rms,
            "channel_mean": ch_mean.tolist(),
            "channel_std": np.sqrt(np.maximum(ch_var, 0.0)).tolist(),
            "unscaled_rms": unscaled_rms,
            "implied_scaling_factor": 1.0 / unscaled_rms if unscaled_rms > 0 else None,
        },
    }
    if is_main:
        fmt.write_json_atomic(out / fmt.METADATA, metadata)
    _barrier("precompute_latents: metadata.json")
    result = {
        **metadata,
        "shards_written": round(counts[0]),
        "shards_skipped": round(counts[1]),
        "shards_rewritten": round(counts[2]),
        "seconds": time.time() - t_start,
    }
    if is_main and verbose:
        print(report(result, out))
    return result


def report(r: dict[str, Any], out: paths.PathLike) -> str:
    s = r["stats"]
    implied = s["implied_scaling_factor"]
    lines = [
        f"wrote {out}: {r['num_examples']} examples of {r['num_records']} records ({r['num_unreadable']} unreadable "
        f"or too small, left out), {r['num_classes']} class{'es' if r['num_classes'] != 1 else ''} ({r['label_source']})",
        f"shards: {r['num_shards']} ({r['shards_written']} written, {r['shards_skipped']} already finished and "
        f"skipped, {r['shards_rewritten']} invalid ones rewritten) in {r['seconds']:.1f} s",
        f"latents {'x'.join(map(str, r['latent_shape']))} (HWC) float32, stored x scaling_factor "
        f"{r['scaling_factor']:.6g} ({r['scaling_factor_source']}): mean {s['mean']:.4f}, std {s['std']:.4f}, "
        f"rms {s['rms']:.4f}",
        f"unscaled latent rms {s['unscaled_rms']:.6g} -> implied scaling factor 1/rms = "
        f"{'n/a' if implied is None else f'{implied:.6g}'} (used {r['scaling_factor']:.6g})",
    ]
    if implied is not None and abs(implied / r["scaling_factor"] - 1) > 0.1:
        lines.append(
            "note: the factor used is more than 10% off 1/rms; for a newly trained autoencoder, rerun into a new "
            f"--out with --scaling_factor {implied:.4g} (or auto)"
        )
    return "\n".join(lines)
