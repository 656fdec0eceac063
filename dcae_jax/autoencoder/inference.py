"""Large-image inference: approximate tiled encode/decode, and exact spatially sharded encode/decode.

Two ways to run a DC-AE on images too large for one accelerator:

* `tiled_encode` / `tiled_decode` run the model on overlapping tiles one (batch) at a time and
  blend the overlaps with linear ramps, like diffusers' `AutoencoderDC` tiling. Memory is bounded
  by the tile size, but the result is APPROXIMATE: the EfficientViT linear attention is global over
  the image, and inside a tile it only sees that tile (plus every conv's receptive field is cut at
  tile borders). Overlap blending hides the seams, it does not make the result exact.
* `sharded_encode` / `sharded_decode` split the image height over a device mesh axis and let GSPMD
  partition the single jitted model: conv halos are exchanged between neighbouring devices and the
  attention sums are all-reduced, so the result equals single-device inference up to float
  summation order. Memory per device shrinks with the number of devices; nothing is approximated.

    ae = DCAE.from_pretrained(...)
    z = tiled_encode(ae, big_image, tile=512, overlap=64)          # host numpy, approximate
    mesh = make_spatial_mesh()                                     # all local devices
    z = sharded_encode(ae, image, mesh)                            # exact, H split over devices
"""

from __future__ import annotations

import json
import pathlib
import sys
import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dcae_jax.autoencoder.model import DCAEModel
from dcae_jax.autoencoder.pretrained import DCAE
from dcae_jax.data.images import ImageReadError, load_image, save_image, to_uint8
from dcae_jax.metrics.image import SSIM_WINDOW, format_metric, json_metric, psnr, psnr_ssim
from dcae_jax.runtime import paths as paths_lib

# ----------------------------------------------------------------------------------------------
# Shared input handling.


def _as_images(ae: DCAE, images: Any) -> np.ndarray:
    """NHWC host array with the model's input channels; a single (H, W, C) image gets a batch axis."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != ae.config.in_channels:
        raise ValueError(f"expected NHWC images with {ae.config.in_channels} channels, got shape {tuple(x.shape)}")
    return x


def _as_latents(ae: DCAE, latents: Any) -> np.ndarray:
    z = np.asarray(latents)
    if z.ndim != 4 or z.shape[-1] != ae.config.latent_channels:
        raise ValueError(f"expected NHWC latents with {ae.config.latent_channels} channels, got shape {tuple(z.shape)}")
    return z


def _pad_to_multiple(x: np.ndarray, f: int) -> np.ndarray:
    """Edge-pads H and W up to multiples of f, exactly as `DCAE.encode` does (so results agree)."""
    ph, pw = -x.shape[1] % f, -x.shape[2] % f
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    return x


# ----------------------------------------------------------------------------------------------
# Tiled (approximate, bounded memory).


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of equal-size tiles covering [0, length), spread evenly; neighbours overlap >= `overlap`.

    Equal tile shapes mean one compiled executable for every tile (and tiles can be batched).
    """
    if length <= tile:
        return [0]
    n = -(-(length - tile) // (tile - overlap)) + 1  # ceil((L - T) / stride) + 1 tiles
    return [(k * (length - tile) + (n - 1) // 2) // (n - 1) for k in range(n)]


def _ramp_weights(starts: list[int], size: int, scale: int) -> list[np.ndarray]:
    """Per-tile 1D blend weights (in output units: positions and sizes times `scale`).

    Inside an overlap with a neighbour the weight ramps linearly from ~0 at the tile's edge to 1 at
    the neighbour's edge; image borders get no ramp. With two tiles per overlap the weights sum to
    one (a linear cross-fade); callers still divide by the sum to cover any overlap pattern.
    """
    n_out = size * scale
    pos = np.arange(n_out, dtype=np.float64) + 0.5
    weights = []
    for k, s in enumerate(starts):
        w = np.ones(n_out)
        if k > 0:
            lo = (starts[k - 1] + size - s) * scale  # overlap with the previous tile
            if lo > 0:
                w = np.minimum(w, pos / lo)
        if k < len(starts) - 1:
            hi = (s + size - starts[k + 1]) * scale  # overlap with the next tile
            if hi > 0:
                w = np.minimum(w, (n_out - pos) / hi)
        weights.append(w.astype(np.float32))
    return weights


def _tiled_apply(
    fn: Callable[[np.ndarray], Any],
    x: np.ndarray,
    grid: tuple[int, int],
    tile: int,
    overlap: int,
    in_scale: int,
    out_scale: int,
    out_channels: int,
    batch_tiles: int,
) -> np.ndarray:
    """Runs `fn` on overlapping tiles of x and blends the outputs with linear ramps.

    Tiles are laid out on a (gh, gw) grid (the latent grid) in tile/overlap grid units; a tile at
    grid (y, x) reads x[:, y*in_scale : (y+t)*in_scale, ...] and `fn` returns it at `out_scale`
    per grid unit: (k*B, t*in_scale, ., C) -> (k*B, t*out_scale, ., out_channels). The output
    canvas lives on the host, so only one batch of tiles is ever on the device.
    """
    (gh, gw), b = grid, x.shape[0]
    th, tw = min(tile, gh), min(tile, gw)
    ys, xs = _tile_starts(gh, th, overlap), _tile_starts(gw, tw, overlap)
    wy, wx = _ramp_weights(ys, th, out_scale), _ramp_weights(xs, tw, out_scale)
    out = np.zeros((b, gh * out_scale, gw * out_scale, out_channels), np.float32)
    wsum = np.zeros((gh * out_scale, gw * out_scale), np.float32)
    jobs = [(i, j) for i in range(len(ys)) for j in range(len(xs))]
    for first in range(0, len(jobs), batch_tiles):
        group = jobs[first : first + batch_tiles]
        # Repeat the last tile to keep the batch shape fixed (one compilation for every group).
        padded = group + [group[-1]] * (batch_tiles - len(group)) if len(jobs) > batch_tiles else group
        crops = [
            x[:, ys[i] * in_scale : (ys[i] + th) * in_scale, xs[j] * in_scale : (xs[j] + tw) * in_scale]
            for i, j in padded
        ]
        result = np.asarray(fn(np.concatenate(crops, axis=0)), np.float32)  # (k*B, th*s, tw*s, C_out)
        for n, (i, j) in enumerate(group):
            wt = wy[i][:, None] * wx[j][None, :]  # (th*s, tw*s)
            rows = slice(ys[i] * out_scale, (ys[i] + th) * out_scale)
            cols = slice(xs[j] * out_scale, (xs[j] + tw) * out_scale)
            out[:, rows, cols] += result[n * b : (n + 1) * b] * wt[None, :, :, None]
            wsum[rows, cols] += wt
    return out / wsum[None, :, :, None]


def _check_tiling(f: int, tile: int, overlap: int, batch_tiles: int) -> tuple[int, int]:
    """Pixel tile/overlap -> latent-grid units, validated."""
    if tile % f or overlap % f:
        raise ValueError(f"tile={tile} and overlap={overlap} must be multiples of the compression factor {f}")
    if not 0 <= overlap < tile:
        raise ValueError(f"need 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    if batch_tiles < 1:
        raise ValueError(f"batch_tiles must be >= 1, got {batch_tiles}")
    return tile // f, overlap // f


def tiled_encode(ae: DCAE, images: Any, tile: int = 512, overlap: int = 64, batch_tiles: int = 1) -> np.ndarray:
    """(B, H, W, 3) in [-1, 1] -> (B, ceil(H/f), ceil(W/f), c) latents, encoding tile by tile.

    APPROXIMATE: each tile is encoded on its own, so attention and convs only see the tile
    (attention becomes tile-local); overlapping latents are cross-faded with linear ramps.
    One tile covering the (padded) image is exactly `ae.encode`. `tile`/`overlap` are pixels and
    multiples of f; the effective overlap may be larger, since tiles are spread evenly and all have
    one shape (one compilation). `batch_tiles` tiles run per jitted call. Returns host float32.
    """
    f = ae.config.spatial_compression_ratio
    t, o = _check_tiling(f, tile, overlap, batch_tiles)
    x = _pad_to_multiple(_as_images(ae, images), f)  # (B, Hp, Wp, 3), edge-padded like ae.encode
    grid = (x.shape[1] // f, x.shape[2] // f)  # latent (h, w)
    return _tiled_apply(ae.encode, x, grid, t, o, f, 1, ae.config.latent_channels, batch_tiles)


def tiled_decode(ae: DCAE, latents: Any, tile: int = 512, overlap: int = 64, batch_tiles: int = 1) -> np.ndarray:
    """(B, h, w, c) latents -> (B, h*f, w*f, 3) images (not clamped), decoding tile by tile.

    APPROXIMATE for the same reason as `tiled_encode` (attention becomes tile-local). `tile` and
    `overlap` are in output pixels (latent tile = tile / f); the decoded tiles are cross-faded with
    linear ramps in pixel space. One tile covering the latent is exactly `ae.decode`. Returns host
    float32.
    """
    f = ae.config.spatial_compression_ratio
    t, o = _check_tiling(f, tile, overlap, batch_tiles)
    z = _as_latents(ae, latents)  # (B, h, w, c)
    return _tiled_apply(ae.decode, z, z.shape[1:3], t, o, 1, f, ae.config.in_channels, batch_tiles)


def tiled_reconstruct(ae: DCAE, images: Any, tile: int = 512, overlap: int = 64, batch_tiles: int = 1) -> np.ndarray:
    """tiled_decode(tiled_encode(x)) cropped back to the input H, W (any size); approximate."""
    x = _as_images(ae, images)
    z = tiled_encode(ae, x, tile, overlap, batch_tiles)
    return tiled_decode(ae, z, tile, overlap, batch_tiles)[:, : x.shape[1], : x.shape[2]]


# ----------------------------------------------------------------------------------------------
# Spatially sharded (exact).


def make_spatial_mesh(num_devices: int | None = None, axis: str = "space") -> Mesh:
    """A 1D mesh over the first `num_devices` devices (default: all) for `sharded_encode/decode`.

    The axis is `AxisType.Auto` (jax's default is Explicit), so GSPMD may propagate shardings
    through the convolutions and reshapes of the model on its own.
    """
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ValueError(f"num_devices={num_devices}: {len(devices)} devices are available")
    from dcae_jax.runtime import sharding

    return sharding.make_mesh([n], [axis], devices[:n])


# ae -> {(method, mesh, axis): jitted fn, (mesh, "variables"): (source variables, replicated copy)}.
# Weak keys: the cache dies with the DCAE (the jitted fns hold `ae.model`, never `ae`).
_SHARDED_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _sharded_fn(ae: DCAE, mesh: Mesh, axis: str, method: str):
    """The jitted, height-sharded encode or decode, compiled once per (ae, mesh, axis) and shape."""
    cache = _SHARDED_CACHE.setdefault(ae, {})
    key = (method, mesh, axis)
    if key not in cache:
        spatial = NamedSharding(mesh, P(None, axis, None, None))  # (B, H/n per device, W, C)
        replicated = NamedSharding(mesh, P())
        model = ae.model
        module_method = DCAEModel.encode if method == "encode" else DCAEModel.decode
        cache[key] = jax.jit(
            lambda v, x: model.apply(v, x, method=module_method),
            in_shardings=(replicated, spatial),
            out_shardings=spatial,
        )
    return cache[key]


def _replicated_variables(ae: DCAE, mesh: Mesh):
    """ae.variables on every mesh device, copied once (and again only if `ae.variables` is replaced)."""
    cache = _SHARDED_CACHE.setdefault(ae, {})
    src, rep = cache.get((mesh, "variables"), (None, None))
    if src is not ae.variables:
        rep = jax.device_put(ae.variables, NamedSharding(mesh, P()))
        cache[(mesh, "variables")] = (ae.variables, rep)
    return rep


def _axis_size(mesh: Mesh, axis: str) -> int:
    if axis not in mesh.shape:
        raise ValueError(f"mesh has no axis {axis!r}; its axes are {tuple(mesh.shape)}")
    return mesh.shape[axis]


def sharded_encode(ae: DCAE, images: Any, mesh: Mesh, axis: str = "space") -> jax.Array:
    """(B, H, W, 3) -> (B, ceil(H/f), ceil(W/f), c), EXACT, with H split over `mesh` axis `axis`.

    Same result as `ae.encode` (up to summation order): GSPMD exchanges conv halos between
    neighbouring devices and all-reduces the attention sums. H is edge-padded to a multiple of f
    like `ae.encode`; the latent height ceil(H/f) must then be divisible by the axis size n.
    Returns a jax.Array sharded as P(None, axis, None, None).
    """
    f = ae.config.spatial_compression_ratio
    n = _axis_size(mesh, axis)
    x = _pad_to_multiple(_as_images(ae, images), f)  # (B, Hp, Wp, 3)
    if (x.shape[1] // f) % n:
        raise ValueError(
            f"sharded_encode: images of shape {tuple(np.shape(images))} (padded to {tuple(x.shape)}) have latent "
            f"height {x.shape[1] // f}, not divisible by the {n} devices of mesh axis {axis!r}; "
            f"use an image height that is a multiple of f*n = {f * n}"
        )
    spatial = NamedSharding(mesh, P(None, axis, None, None))
    x = jax.device_put(jnp.asarray(x, ae.dtype), spatial)
    return _sharded_fn(ae, mesh, axis, "encode")(_replicated_variables(ae, mesh), x)


def sharded_decode(ae: DCAE, latents: Any, mesh: Mesh, axis: str = "space") -> jax.Array:
    """(B, h, w, c) -> (B, h*f, w*f, 3), EXACT, with h split over `mesh` axis `axis`.

    Same result as `ae.decode` (up to summation order). h must be divisible by the axis size.
    Returns a jax.Array sharded as P(None, axis, None, None).
    """
    n = _axis_size(mesh, axis)
    z = _as_latents(ae, latents)  # (B, h, w, c)
    if z.shape[1] % n:
        raise ValueError(
            f"sharded_decode: latents of shape {tuple(z.shape)} have height {z.shape[1]}, not divisible by "
            f"the {n} devices of mesh axis {axis!r}"
        )
    spatial = NamedSharding(mesh, P(None, axis, None, None))
    z = jax.device_put(jnp.asarray(z, ae.dtype), spatial)
    return _sharded_fn(ae, mesh, axis, "decode")(_replicated_variables(ae, mesh), z)


# ----------------------------------------------------------------------------------------------
# Reconstructing image files (the `reconstruct` command).


def output_names(paths: list[pathlib.Path], root: pathlib.Path) -> list[pathlib.Path]:
    """Relative output paths (.png) that keep the folder structure and never collide."""
    rels = [p.relative_to(root) if root.is_dir() else pathlib.Path(p.name) for p in paths]
    stems = [r.with_suffix("") for r in rels]
    dup = {s for s in stems if stems.count(s) > 1}
    return [
        (s.with_name(f"{s.name}_{r.suffix.lstrip('.').lower()}") if s in dup else s).with_suffix(".png")
        for r, s in zip(rels, stems, strict=True)
    ]


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def results_markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# Reconstruction: {results['model']}",
        "",
        (
            f"resolution: {results['resolution'] or 'full size'}, dtype: {results['dtype']}, "
            f"{len(results['images'])} images, {len(results['failed'])} failed"
        ),
        "",
        "| image | size | PSNR (dB) | SSIM |",
        "|---|---|---:|---:|",
    ]
    for r in results["images"]:
        lines.append(
            f"| {r['name']} | {r['width']}x{r['height']} | {format_metric(r['psnr'], 2)} | {format_metric(r['ssim'], 4)} |"
        )
    m = results["mean"]
    lines.append(f"| **mean** | | **{format_metric(m['psnr'], 2)}** | **{format_metric(m['ssim'], 4)}** |")
    if results["failed"]:
        lines += ["", "Failed:", ""] + [f"- {f['name']}: {f['error']}" for f in results["failed"]]
    return "\n".join(lines) + "\n"


def reconstruct_files(
    model: str, inp: pathlib.Path, out: pathlib.Path, paths: list[pathlib.Path], resolution: int | None, dtype: str
) -> tuple[dict[str, Any], str]:
    """Reconstructs `paths` (found under `inp`) with the DC-AE `model`; writes `out/reconstructions/`,
    `out/comparisons/`, `out/results.md` and `out/results.json`. Returns (results, the markdown table).

    Unreadable files are reported (stderr and `failed`) and skipped; a non-finite reconstruction is an error.
    """
    from tqdm import tqdm

    ae = DCAE.from_pretrained(model, dtype=getattr(jnp, dtype))
    names = output_names(paths, inp)
    images: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    for path, rel in zip(tqdm(paths, desc="reconstruct", unit="img", file=sys.stderr), names, strict=True):
        name = path.relative_to(inp).as_posix() if inp.is_dir() else path.name
        try:
            x = load_image(path, resolution=resolution)
        except ImageReadError as err:
            tqdm.write(f"skipped {name}: {err.reason}", file=sys.stderr)
            failed.append({"name": name, "error": err.reason})
            continue
        rec = np.asarray(ae.reconstruct(x[None]).astype(jnp.float32))[0]
        if not np.isfinite(rec).all():  # NaN would quantize to black and be scored; a broken model is an error
            raise ValueError(
                f"{model}: non-finite (NaN/inf) reconstruction of {name}; nothing scored (a diverged or corrupt model?)"
            )
        orig_u8, rec_u8 = to_uint8(x), to_uint8(rec)
        if min(x.shape[:2]) >= SSIM_WINDOW:
            p, s = (float(v[0]) for v in psnr_ssim(orig_u8[None], rec_u8[None]))
        else:  # SSIM's 11x11 window does not fit
            p, s = float(psnr(orig_u8[None], rec_u8[None])[0]), None
        rec_path = save_image(rec_u8, out / "reconstructions" / rel)
        cmp_path = save_image(np.concatenate([orig_u8, rec_u8], axis=1), out / "comparisons" / rel)
        images.append(
            {
                "name": name,
                "width": int(x.shape[1]),
                "height": int(x.shape[0]),
                "psnr": p,
                "ssim": s,
                "reconstruction": str(rec_path.relative_to(out)),
                "comparison": str(cmp_path.relative_to(out)),
            }
        )

    results = {
        "model": str(model),
        "resolution": resolution,
        "dtype": dtype,
        "images": images,
        "mean": {"psnr": _mean([r["psnr"] for r in images]), "ssim": _mean([r["ssim"] for r in images])},
        "failed": failed,
    }
    out.mkdir(parents=True, exist_ok=True)
    md = results_markdown(results)
    paths_lib.write_text_atomic(out / "results.md", md)
    as_json = {
        **results,
        "images": [{**r, "psnr": json_metric(r["psnr"]), "ssim": json_metric(r["ssim"])} for r in images],
        "mean": {k: json_metric(v) for k, v in results["mean"].items()},
    }
    paths_lib.write_text_atomic(out / "results.json", json.dumps(as_json, indent=2) + "\n")
    return results, md
