"""Class-conditional samples from a latent diffusion model: PNG grids and generation FID (the library behind
`python -m dcae_jax.sample`).

    python -m dcae_jax.sample --model=/runs/uvit/export --num_samples=50000 --batch_size=64 \\
        --fid_stats=imagenet_512_train.npz --out=/runs/uvit/fid50k
    # The DC-AE authors' demo: 16 ImageNet classes, guidance 6.0, seed 0, a 4x4 grid.
    python -m dcae_jax.sample --model=mit-han-lab/dc-ae-f64c128-in-1.0-uvit-h-in-512px-train2000k \\
        --classes=279,333,979,936,933,145,497,1,248,360,793,12,387,437,938,978 --guidance_scale=6 --seed=0 --out=demo

The 50k-sample protocol of the reference evaluator: class ids drawn uniformly from the model's classes
with a generator seeded `--seed`, noise per chunk of `--batch_size` samples from (seed, chunk index),
images quantised as clamp(127.5 x + 128, 0, 255) -> uint8, FID-Inception pool3 features, Fréchet
distance against `--fid_stats` (a pytorch-fid `.npz`; build one with `python -m dcae_jax.fid_stats`).
(The reference draws ids with torch.randint; ours come from numpy, so the ids differ, the distribution
does not.)

Resumable: each chunk is written atomically to `<out>/chunks/chunk-NNNNN.npz` (labels, Inception
features when FID is asked for, images with `--save_images` and for the first `--grid` samples); a rerun skips
the chunks that are there.
With several processes (launch/local.sh, gpu_slurm.sh), chunk i is sampled by process i mod P on its
local devices and the feature statistics are summed over processes.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import warnings

import numpy as np

from dcae_jax.runtime import distributed, paths


def class_ids(
    num_samples: int, num_classes: int, seed: int, explicit: list[int], trained: list[int] | None = None
) -> np.ndarray:
    """The ids to sample: `explicit` as given, else uniform over the `trained` classes (default: all of
    [0, num_classes)) from a seeded generator."""
    if explicit:
        ids = np.asarray(explicit, np.int64)
        if ids.min() < 0 or ids.max() >= num_classes:
            raise ValueError(f"--classes must be in [0, {num_classes})")
        untrained = sorted(set(ids.tolist()) - set(range(num_classes) if trained is None else trained))
        if untrained:
            warnings.warn(f"--classes {untrained}: the model saw no training example of these classes", stacklevel=2)
        return ids.astype(np.int32)
    if trained is None or list(trained) == list(range(num_classes)):
        return np.random.default_rng(seed).integers(0, num_classes, num_samples).astype(np.int32)
    pool = np.asarray(trained, np.int32)
    return pool[np.random.default_rng(seed).integers(0, len(pool), num_samples)]


def _chunk_path(out: paths.Path, i: int) -> paths.Path:
    return out / "chunks" / f"chunk-{i:05d}.npz"


def _chunk_ok(path: paths.Path, labels: np.ndarray, need_features: bool, need_images: bool) -> bool:
    """A finished chunk: readable, same labels, and holding what this run needs."""
    try:
        if not path.exists():
            return False
        f = paths.load_npz(path)
        ok = np.array_equal(f["labels"], labels)
        ok &= (not need_features) or ("features" in f and f["features"].shape[0] == labels.size)
        ok &= (not need_images) or ("images" in f and f["images"].shape[0] == labels.size)
        return bool(ok)
    except Exception:  # truncated or foreign file: sample the chunk again
        return False


def _write_atomic(path: paths.Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    paths.save_npz(path, **arrays)


@dataclasses.dataclass(frozen=True)
class SampleRun:
    """What to sample (the `sample` command's flags)."""

    model: str
    out: str
    autoencoder: str | None = None
    num_samples: int = 64
    classes: tuple[int, ...] = ()
    batch_size: int = 32
    guidance_scale: float | None = None
    sampler: str | None = None
    steps: int | None = None
    latent_channels: int | None = None  # a channel prefix (a model with adaptive channels); None: all
    seed: int = 0
    grid: int = 64
    fid_stats: str | None = None
    fid_weights: str | None = None
    save_images: bool = False


def run(args: SampleRun) -> dict:
    """Samples `args.num_samples` images in resumable chunks; returns (and writes) the results (FID when asked)."""
    import jax
    import jax.numpy as jnp

    from dcae_jax.data import images as image_io
    from dcae_jax.diffusion.pipeline import DCAEDiffusion, image_grid, sampler_settings
    from dcae_jax.metrics import fid as fid_lib

    out = paths.path(args.out, "--out")
    pipe = DCAEDiffusion.from_pretrained(args.model, autoencoder=args.autoencoder)
    overrides = {"guidance_scale": args.guidance_scale, "name": args.sampler, "steps": args.steps}
    settings = {k: v for k, v in overrides.items() if v is not None}
    pipe.sample_shape(args.latent_channels)  # a wrong channel count fails before anything is written
    pipe.autoencoder  # noqa: B018 -- loaded (and checked against the model's latents) before anything is sampled
    sampler_settings(pipe.objective, {**pipe.sampler, **settings})  # ... and so does a bad sampler setting
    ids = class_ids(args.num_samples, pipe.config.num_classes, args.seed, [int(c) for c in args.classes], pipe.classes)
    want_fid = bool(args.fid_stats)
    fid_fn = None
    if want_fid:
        from dcae_jax.metrics import weights

        fid_net, fid_vars = fid_lib.load_fid_inception(weights.resolve("fid_inception", args.fid_weights))
        fid_fn = jax.jit(lambda v, x: fid_net.apply(v, x))
    ref = fid_lib.load_stats(args.fid_stats, dim=fid_lib.FEATURE_DIM) if want_fid else None

    _check_same_run(
        out,
        {
            "model": str(args.model),
            "sampler": {**pipe.sampler, **settings},
            "seed": args.seed,
            "num_samples": int(ids.size),
            "batch_size": args.batch_size,
            "classes": [int(c) for c in args.classes],
            # only when set: run.json files of earlier versions stay valid
            **({"latent_channels": args.latent_channels} if args.latent_channels else {}),
        },
    )
    chunks = [ids[i : i + args.batch_size] for i in range(0, ids.size, args.batch_size)]
    mine = [i for i in range(len(chunks)) if i % jax.process_count() == jax.process_index()]
    need_images = args.save_images
    t0, done, skipped = time.time(), 0, 0
    progress = _progress(len(mine))
    for i in mine:
        path = _chunk_path(out, i)
        if _chunk_ok(path, chunks[i], want_fid, need_images):
            skipped += 1
            progress(skipped + done)
            continue
        latents = pipe.generate_latents(
            chunks[i], seed=args.seed, chunk=i, latent_channels=args.latent_channels, **settings
        )
        images = pipe.decode(latents)
        bad = int(np.sum(~np.isfinite(images).reshape(len(images), -1).all(axis=1)))
        if bad:
            raise ValueError(
                f"{args.model}: chunk {i}: {bad} of {len(images)} samples are non-finite (NaN/inf) after decoding; "
                f"it was not written and nothing was scored (a diverged model, or a sampler setting?)"
            )
        pixels = image_io.to_uint8(images)  # clamp(127.5 x + 128) -> uint8: the reference's quantisation
        arrays = {"labels": chunks[i]}
        if fid_fn is not None:
            arrays["features"] = np.asarray(fid_fn(fid_vars, jnp.asarray(pixels)), np.float32)
        if need_images or i * args.batch_size < args.grid:  # the chunks the grid shows keep their pixels
            arrays["images"] = pixels
        _write_atomic(path, **arrays)
        done += 1
        progress(skipped + done)
    distributed.barrier("dcae_jax.sample chunks")

    result = {
        "model": str(args.model),
        "num_samples": int(ids.size),
        "sampler": {**pipe.sampler, **settings},
        "seed": args.seed,
        "chunks_sampled": done,
        "chunks_skipped": skipped,
        "seconds": round(time.time() - t0, 2),
    }
    if want_fid:
        stats = fid_lib.FeatureStats()
        for i in mine:
            stats.update(paths.load_npz(_chunk_path(out, i))["features"])
        stats = fid_lib.allreduce_stats(stats)
        result["fid"] = fid_lib.frechet_distance(*stats.mu_sigma(), *ref)
        result["fid_stats"] = str(args.fid_stats)
    if jax.process_index() == 0:
        grid = _grid_images(out, len(chunks), args.grid)
        if grid is not None:
            columns = int(np.ceil(np.sqrt(len(grid))))  # square-ish, like torchvision save_image(nrow=sqrt(n))
            image_io.save_image(image_grid(grid.astype(np.float32) / 127.5 - 1.0, columns=columns), out / "grid.png")
        paths.write_text_atomic(out / "results.json", json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        wrote = [out / "results.json", *([out / "grid.png"] if grid is not None else [])]
        print(f"wrote {', '.join(map(str, wrote))} and {len(chunks)} sample chunks in {out}")
    return result


def _check_same_run(out: paths.Path, run: dict) -> None:
    """Chunks are only reused by the same run: a different sampler, seed or model needs a new --out."""
    import jax

    path = out / "run.json"
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != json.loads(json.dumps(run)):
            changed = sorted(k for k in run if previous.get(k) != json.loads(json.dumps(run[k])))
            raise ValueError(f"{path}: {out} holds samples of a different run (changed: {changed}); use a new --out")
    elif jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        paths.write_text_atomic(path, json.dumps(run, indent=2))


def _grid_images(out: paths.Path, num_chunks: int, n: int) -> np.ndarray | None:
    """The first `n` samples' pixels from the chunks that kept them (those holding the first `--grid` do)."""
    parts, have = [], 0
    for i in range(num_chunks):
        if have >= n:
            break
        f = paths.load_npz(_chunk_path(out, i))
        if "images" not in f:
            break
        parts.append(f["images"][: n - have])
        have += parts[-1].shape[0]
    return np.concatenate(parts) if parts else None


def _progress(total: int):
    start = time.time()

    def show(k: int) -> None:
        rate = k / max(time.time() - start, 1e-9)
        eta = (total - k) / rate if rate > 0 else float("inf")
        sys.stderr.write(f"\rsample: chunk {k}/{total} ({rate:.2f} chunks/s, eta {eta:.0f} s)")
        if k == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show
