"""FLOPs of bench.suite's rows as a platform runs them, counted on any machine: no device, no weights, no compile.

    python -m bench.count_flops --scale accelerator --platform cuda --out /tmp/flops.json [--only "ae f32c32"]
    python -m bench.count_flops --platform cuda --results DIR/results.json [--results ...]   # utilisation table

Each row's program (our side: encode+decode, the train step of its phase, the UViT train / guided sample step on
both latent spaces, the high-res decode) is traced with abstract inputs and lowered for `--platform` (cuda, rocm,
tpu or cpu), and XLA's cost analysis counts the lowered program (`bench.cost.flops`; UViT with XLA's attention,
which the cuDNN kernel computes the same FLOPs as). The counts are what `bench.suite` records as `flops` when it
runs on that platform, so a row's achieved FLOP/s can be checked, or recomputed for a run whose counts were
wrong, without the device. Rows that compare two frameworks count ours only.

`--results` (one or more bench.suite results.json files) counts the rows those runs measured and prints a markdown
table of each ok row's FLOPs, our and the reference's achieved TFLOP/s by that count (the autoencoder and train
rows run the same network on both sides; the UViT reference's own count is the SD-VAE program's) and the fraction
of the device's peak.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys


def _lower(jitted, *args, platform: str):
    return jitted.trace(*args).lower(lowering_platforms=(platform,))


def autoencoder_flops(model: str, resolution: int, dtype: str, batch: int, platform: str) -> float:
    import jax
    import jax.numpy as jnp

    from bench import cost
    from bench.autoencoder import _dcae_config
    from dcae_jax.autoencoder.model import DCAEModel

    cfg = _dcae_config(model)
    m = DCAEModel(cfg, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype))
    x = jax.ShapeDtypeStruct((batch, resolution, resolution, cfg.in_channels), jnp.dtype(dtype))
    v = jax.eval_shape(m.init, jax.random.key(0), x)
    enc = jax.jit(lambda v, x: m.apply(v, x, method=DCAEModel.encode))
    dec = jax.jit(lambda v, z: m.apply(v, z, method=DCAEModel.decode))
    z = jax.eval_shape(enc, v, x)
    return cost.flops(_lower(enc, v, x, platform=platform)) + cost.flops(_lower(dec, v, z, platform=platform))


def train_step_flops(model: str, resolution: int, batch: int, phase: int, dtype: str, platform: str) -> float:
    """Our step of `phase` as bench.train_step builds it (LPIPS off), lowered from abstract state."""
    from bench import cost
    from dcae_jax.autoencoder import train
    from dcae_jax.training import config as common

    c = common.base_config()
    c.model.variant = model
    common.apply_phase(c, phase, num_stages=train.model_config(c).num_stages)
    c.loss.lpips_weight = 0.0
    c.model.dtype = dtype
    c.resolution, c.global_batch_size = resolution, batch
    return cost.flops(train.lower_train_step(c, platforms=(platform,)))


def uvit_flops(model: str, latent: tuple[int, int, int], patch: int, batch: int, dtype: str, platform: str):
    """(train step, guided sample step) FLOPs of the UViT on one latent space, as bench.diffusion builds them."""
    import jax
    import jax.numpy as jnp

    from bench import cost, diffusion
    from dcae_jax.diffusion import train as dtrain
    from dcae_jax.runtime import sharding
    from dcae_jax.training import checkpoints
    from dcae_jax.training import config as common

    config = common.diffusion_config()
    config.model.preset, config.model.patch_size = model, patch
    config.model.dtype, config.model.remat, config.model.attention = dtype, "none", "xla"
    config.global_batch_size = batch
    cfg = dtrain.model_config(config, latent)
    trainer = dtrain.build_trainer(config, cfg)
    mesh = sharding.make_mesh((-1, 1), ("data", "fsdp"))
    _, _, abstract, shardings = dtrain._state_shardings(config, trainer, cfg, mesh)
    data = sharding.batch_sharding(mesh)
    x = jax.ShapeDtypeStruct((batch, *latent), jnp.float32)
    y = jax.ShapeDtypeStruct((batch,), jnp.int32)
    step = jax.jit(
        functools.partial(dtrain.train_step, trainer=trainer),
        in_shardings=(shardings, data),
        out_shardings=(shardings, None),
        donate_argnums=(0,),
    )
    state = checkpoints.abstract_with_shardings(abstract, shardings)

    t = jax.ShapeDtypeStruct((), jnp.float32)
    train_flops = cost.flops(_lower(step, state, {"latent": x, "label": y}, platform=platform))
    sample_flops = cost.flops(
        _lower(jax.jit(diffusion.guided_eval_fn(trainer, cfg)), abstract.params, x, t, y, platform=platform)
    )
    return train_flops, sample_flops


def highres_flops(model: str, height: int, width: int, dtype: str, tile: int, overlap: int, platform: str):
    """{"dcae_jax tiled", "dcae_jax sharded"}: one tile's decode x the tile count, and the whole decode (one
    device: the sharded decode is the untiled program)."""
    import jax
    import jax.numpy as jnp

    from bench import cost
    from bench.autoencoder import _dcae_config
    from dcae_jax.autoencoder import inference
    from dcae_jax.autoencoder.model import DCAEModel

    cfg = _dcae_config(model)
    f = cfg.spatial_compression_ratio
    m = DCAEModel(cfg, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype))
    h, w = -(-height // f), -(-width // f)
    v = jax.eval_shape(m.init, jax.random.key(0), jax.ShapeDtypeStruct((1, f, f, cfg.in_channels), jnp.dtype(dtype)))
    dec = jax.jit(lambda v, z: m.apply(v, z, method=DCAEModel.decode))

    def latent(a, b):
        return jax.ShapeDtypeStruct((1, a, b, cfg.latent_channels), jnp.dtype(dtype))

    th, tw = min(tile // f, h), min(tile // f, w)
    tiles = len(inference._tile_starts(h, th, overlap // f)) * len(inference._tile_starts(w, tw, overlap // f))
    return {
        "dcae_jax tiled": cost.flops(_lower(dec, v, latent(th, tw), platform=platform)) * tiles,
        "dcae_jax sharded": cost.flops(_lower(dec, v, latent(h, w), platform=platform)),
    }


def count(spec, platform: str) -> dict[str, float]:
    """Row name -> our FLOPs, for one bench.suite Spec (a UViT or high-res spec yields two rows)."""
    if spec.fn == "autoencoder":
        return {spec.name: autoencoder_flops(spec.model, spec.resolution, spec.dtype, spec.batch, platform)}
    if spec.fn == "train_step":
        flops = train_step_flops(spec.model, spec.resolution, spec.batch, spec.extra["phase"], spec.dtype, platform)
        return {spec.name: flops}
    if spec.fn == "uvit":
        from bench import diffusion

        scale = spec.resolution / 512
        _, (h, w, c), patch = next(lat for lat in diffusion.LATENTS if lat[0] == "DC-AE-f64 p1")
        latent = (int(h * scale), int(w * scale), c)
        train, sample = uvit_flops(spec.model, latent, patch, spec.batch, spec.dtype, platform)
        return {f"{spec.name} train": train, f"{spec.name} sample": sample}
    if spec.fn == "highres":
        e = spec.extra
        f = highres_flops(spec.model, spec.resolution, e["width"], spec.dtype, e["tile"], e["overlap"], platform)
        return {f"{spec.name} tiled": f["dcae_jax tiled"], f"{spec.name} sharded (exact)": f["dcae_jax sharded"]}
    raise ValueError(f"unknown measuring function {spec.fn!r}")


def _utilisation(paths: list[str], platform: str, out: str) -> int:
    """Counts the ok rows of bench.suite results and prints FLOPs, achieved TFLOP/s (ours, reference) and the
    fraction of the device's peak by that count."""
    from bench import suite

    lines = [
        "| row | ours ms | reference ms | GFLOP (ours) | ours TFLOP/s | of peak | reference TFLOP/s | of peak |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    counts: dict[str, float] = {}
    for path in paths:
        try:
            with open(path) as f:
                result = json.load(f)
            rows = [r for r in result["rows"] if r["status"] == "ok"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            print(f"bench.count_flops: {path}: not a bench.suite results.json ({err})", file=sys.stderr)
            return 2
        specs = {s.name: s for s in suite.plan(result["scale"], gpu=True)}
        for row in rows:
            spec = specs.get(row["spec"])
            if spec is None:
                print(f"bench.count_flops: {path}: row {row['spec']!r} is not in today's plan", file=sys.stderr)
                return 2
            if row["name"] not in counts:
                counts.update(count(spec, platform))
            ours_s, ref_s = row["seconds"]["dcae_jax"], row["seconds"]["reference"]
            ours = counts[row["name"]]
            if ref_s is None:  # a row without a reference (a UViT utilisation row)
                ref = None
            elif row["kind"].startswith("uvit"):  # the reference is the SD-VAE program: its own count
                ref = _uvit_reference(spec, row["name"], platform, counts)
            elif row["kind"] in ("autoencoder encode+decode", "train step"):
                ref = ours  # the same network and step on both sides
            else:
                ref = None  # high-res: diffusers' tiling is its own amount of work
            peak = next((v for k, v in suite.PEAK_FLOPS.items() if k in (row["device"] or "").lower()), {})
            peak = peak.get(row["dtype"])
            ref_ms = "–" if ref_s is None else f"{ref_s * 1e3:.1f}"
            cells = [row["name"], f"{ours_s * 1e3:.1f}", ref_ms, f"{ours / 1e9:.0f}"]
            for flops, secs in ((ours, ours_s), (ref, ref_s)):
                rate = flops / secs if flops and secs else None
                cells += [
                    "–" if rate is None else f"{rate / 1e12:.1f}",
                    "–" if not (rate and peak) else f"{rate / peak:.1%}",
                ]
            lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    if out:
        from dcae_jax.runtime import paths

        paths.write_text_atomic(out, json.dumps({"platform": platform, "flops": counts}, indent=1))
    return 0


def _uvit_reference(spec, name: str, platform: str, counts: dict[str, float]) -> float:
    """FLOPs of the UViT row's reference: the same model on SD-VAE-f8 p2 latents."""
    from bench import diffusion

    key = f"{name} reference"
    if key not in counts:
        scale = spec.resolution / 512
        _, (h, w, c), patch = next(lat for lat in diffusion.LATENTS if lat[0] == "SD-VAE-f8 p2")
        train, sample = uvit_flops(
            spec.model, (int(h * scale), int(w * scale), c), patch, spec.batch, spec.dtype, platform
        )
        counts[f"{spec.name} train reference"], counts[f"{spec.name} sample reference"] = train, sample
    return counts[key]


def main(argv: list[str] | None = None) -> int:
    from dcae_jax.runtime import cli

    cli.prepare_process(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", default="accelerator", help="smoke | cpu | accelerator (bench.suite's row lists)")
    p.add_argument("--platform", default="cuda", help="cuda | rocm | tpu | cpu: the platform to lower for")
    p.add_argument("--only", default="", help="only rows whose name contains this")
    p.add_argument("--out", default="", help="also write {row: flops} to this JSON file")
    p.add_argument("--results", nargs="*", default=[], help="bench.suite results.json files: utilisation table")
    args = p.parse_args(argv)
    from bench import suite

    if args.scale not in ("smoke", "cpu", "accelerator"):
        print(f"bench.count_flops: --scale must be smoke, cpu or accelerator, not {args.scale!r}", file=sys.stderr)
        return 2
    if args.platform not in ("cuda", "rocm", "tpu", "cpu"):
        print(f"bench.count_flops: --platform must be cuda, rocm, tpu or cpu, not {args.platform!r}", file=sys.stderr)
        return 2
    if args.results:
        return _utilisation(args.results, args.platform, args.out)
    specs = [s for s in suite.plan(args.scale, gpu=True) if args.only in s.name]
    if not specs:
        print(f"bench.count_flops: no row of scale {args.scale!r} contains {args.only!r}", file=sys.stderr)
        return 2
    counts: dict[str, float] = {}
    for s in specs:
        for name, flops in count(s, args.platform).items():
            counts[name] = flops
            print(f"{name}: {flops / 1e9:.2f} GFLOP", flush=True)
    if args.out:
        from dcae_jax.runtime import paths

        paths.write_text_atomic(
            args.out, json.dumps({"scale": args.scale, "platform": args.platform, "flops": counts}, indent=1)
        )
    print(
        f"bench.count_flops: {len(counts)} rows counted for {args.platform}"
        + (f"; wrote {args.out}" if args.out else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
