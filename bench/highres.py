"""High-resolution decode: diffusers' tiling vs ours tiled vs ours exact (spatially sharded), same weights.

    python -m bench.highres --model dc-ae-f32c32-sana-1.0 --height 2160 --width 3840 --dtype bfloat16

One latent of the image's size is decoded four ways: diffusers `AutoencoderDC` with `enable_tiling()` (tiles of
`--tile` pixels overlapping by `--overlap`, its defaults 512 / 64), `dcae_jax.autoencoder.inference.tiled_decode`
(same tile and overlap, linear cross-fade), `sharded_decode` (exact: the image's rows split over every device,
GSPMD exchanges conv halos and all-reduces the attention sums) and, where it fits, plain untiled `DCAE.decode`,
the exact answer the other three are scored against (max and mean absolute error in 8-bit levels of the
[-1, 1] output, and relative to the reference's standard deviation).

Weights are random (diffusers' init, converted: no download here), so the errors show where tiling departs from
the exact decode, not how visible its seams are on a released model's images. Memory: a GPU reports each
method's own peak (torch: `max_memory_allocated` after a reset; ours: the compiled call's footprint from XLA's
memory analysis, arguments + outputs + temporaries, per device, per tile for tiled decode); on a CPU only the
process's peak RSS is known, as in the other scripts. Latents of a height not divisible by f are rounded up
and the decoded image cropped (3840x2160 at f32: 68 latent rows, 2176 pixel rows).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

METHODS = ("diffusers tiled", "dcae_jax tiled", "dcae_jax sharded", "dcae_jax untiled")


def _errors(y: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    d = np.abs(y.astype(np.float64) - ref.astype(np.float64))
    return {
        "max_8bit": float(d.max() * 127.5),
        "mean_8bit": float(d.mean() * 127.5),
        "max_rel_std": float(d.max() / (ref.std() or 1.0)),
    }


def measure(
    model: str,
    height: int,
    width: int,
    dtype: str = "bfloat16",
    tile: int = 512,
    overlap: int = 64,
    repeats: int = 3,
    warmup: int = 1,
    untiled: bool = True,
) -> dict:
    """Times and scores the four decodes of one (1, height/f, width/f, c) latent; see the module docstring.

    Returns {"median_s": {method: s}, "errors": {method: {...}}, "memory_bytes": {method: bytes | None},
    "flops": {method: XLA's count}, "status": {method: "ok" | reason}, "devices": n, "latent_shape": ...}. A
    method that runs out of memory is recorded with its reason and no time; `untiled=False` skips running the
    untiled decode (it is still compiled: its footprint says what it would need). Shared by the command line
    and `bench.suite`."""
    import jax
    import jax.numpy as jnp
    import torch

    from bench import cost
    from bench.autoencoder import _dcae_config, twin_models
    from dcae_jax import DCAE
    from dcae_jax.autoencoder import inference

    cfg = _dcae_config(model)
    f = cfg.spatial_compression_ratio
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    tmodel, variables = twin_models(cfg, device)
    ae = DCAE(cfg, variables, jnp.dtype(dtype))
    del variables
    tmodel = tmodel.eval().to(dtype=tdtype)
    stride = tile - overlap
    tmodel.enable_tiling(tile, tile, stride, stride)

    n = len(jax.devices())
    h = -(-height // f)
    h = -(-h // n) * n  # sharded decode splits latent rows evenly over the devices
    w = -(-width // f)
    z = np.random.RandomState(0).standard_normal((1, h, w, cfg.latent_channels)).astype(np.float32)
    zt = torch.from_numpy(z).permute(0, 3, 1, 2).contiguous().to(device=device, dtype=tdtype)
    mesh = inference.make_spatial_mesh()
    crop = (slice(None), slice(0, height), slice(0, width))

    def run_diffusers():
        with torch.no_grad():
            y = tmodel.decode(zt).sample
        if gpu:
            torch.cuda.synchronize()
        return y

    runners = {
        "diffusers tiled": lambda: run_diffusers(),
        "dcae_jax tiled": lambda: inference.tiled_decode(ae, z, tile, overlap),
        "dcae_jax sharded": lambda: jax.block_until_ready(inference.sharded_decode(ae, z, mesh)),
    }
    if untiled:
        runners["dcae_jax untiled"] = lambda: jax.block_until_ready(ae.decode(jnp.asarray(z, ae.dtype)))

    def as_nhwc(y) -> np.ndarray:
        if isinstance(y, torch.Tensor):
            y = y.float().permute(0, 2, 3, 1).cpu().numpy()
        return np.asarray(jax.device_get(y), np.float32)[crop]

    status: dict[str, str] = {}
    outputs: dict[str, np.ndarray] = {}
    memory: dict[str, int | None] = dict.fromkeys(runners)
    for name, fn in list(runners.items()):
        try:
            if gpu and name.startswith("diffusers"):
                torch.cuda.reset_peak_memory_stats()
            for _ in range(max(warmup, 1)):  # the first call compiles; its output is the one scored
                y = fn()
            outputs[name] = as_nhwc(y)
            del y
            if gpu and name.startswith("diffusers"):
                memory[name] = int(torch.cuda.max_memory_allocated())
            status[name] = "ok"
        except Exception as err:  # out of memory is a result here, not a failure of the benchmark
            status[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}" if str(err) else type(err).__name__
            runners.pop(name)
            if gpu:
                torch.cuda.empty_cache()
    # Our footprints from XLA's memory analysis (per device, per tile), and XLA's FLOP counts. The untiled decode
    # is compiled even when it is not run: its footprint is what decoding without tiling or sharding would need.
    zl = jnp.asarray(z, ae.dtype)
    whole = ae._decode_fn.lower(ae.variables, zl)
    memory["dcae_jax untiled"] = cost.footprint(whole.compile())
    t = min(tile // f, h), min(tile // f, w)
    one_tile = ae._decode_fn.lower(ae.variables, zl[:, : t[0], : t[1]])
    tiles = len(inference._tile_starts(h, t[0], overlap // f)) * len(inference._tile_starts(w, t[1], overlap // f))
    flops = {"dcae_jax tiled": cost.flops(one_tile) * tiles, "dcae_jax sharded": cost.flops(whole)}
    flops["dcae_jax untiled"] = flops["dcae_jax sharded"]
    if "dcae_jax tiled" in runners:
        memory["dcae_jax tiled"] = cost.footprint(one_tile.compile())
    if "dcae_jax sharded" in runners:
        fn = inference._sharded_fn(ae, mesh, "space", "decode")
        zs = jax.device_put(zl, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "space")))
        memory["dcae_jax sharded"] = cost.footprint(fn.lower(inference._replicated_variables(ae, mesh), zs).compile())

    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(repeats):
        for k, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    ref = outputs.get("dcae_jax untiled")
    errors = {k: _errors(v, ref) for k, v in outputs.items() if ref is not None and k != "dcae_jax untiled"}
    return {
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "errors": errors,
        "memory_bytes": memory,
        "flops": flops,
        "status": status,
        "devices": n,
        "latent_shape": list(z.shape),
        "device": f"{jax.devices()[0].device_kind}/{device}",
    }


def main(argv=None) -> None:
    from dcae_jax.runtime import cli

    cli.prepare_process(argv)  # before jax starts: no probe for an absent TPU; the host allocator policy
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dc-ae-f32c32-sana-1.0", help='a released variant, or "tiny"')
    p.add_argument("--height", type=int, default=2048)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--overlap", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no_untiled", action="store_true", help="skip the exact untiled reference (too big)")
    args = p.parse_args(argv)
    r = measure(
        args.model,
        args.height,
        args.width,
        args.dtype,
        args.tile,
        args.overlap,
        args.repeats,
        untiled=not args.no_untiled,
    )
    print(f"{args.model} {args.width}x{args.height} {args.dtype}, latent {r['latent_shape']}, {r['devices']} device(s)")
    for k in METHODS:
        t, mem, e = r["median_s"].get(k), r["memory_bytes"].get(k), r["errors"].get(k)
        line = f"{k:18s} " + (f"{t * 1e3:10.1f} ms" if t is not None else f"{r['status'].get(k, 'not run')}")
        line += f"  {mem / 2**30:7.2f} GiB" if mem else ""
        line += f"  max {e['max_8bit']:.2f} / mean {e['mean_8bit']:.3f} 8-bit levels" if e else ""
        print(line)


if __name__ == "__main__":
    main()
