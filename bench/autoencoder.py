"""Encode+decode throughput: dcae_jax vs diffusers `AutoencoderDC`, same weights, one process.

    python -m bench.autoencoder --model dc-ae-f32c32-in-1.0 --resolution 512 --batch 1 --repeats 5

Both models get identical random weights (diffusers init, converted). Compile and warm-up are
excluded; each repeat times torch then JAX back to back (interleaved) and the median is reported.
FLOPs come from XLA's cost analysis of the lowered encode and decode (bench.cost). `--stages` adds a
per-stage timing of our model (what each encoder/decoder stage costs), to explain the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def _dcae_config(model: str):
    """The DCAEConfig for a released name, or the test-sized "tiny" one (smoke runs of `bench.suite`)."""
    from dcae_jax.autoencoder.model import get_config, tiny_config

    return tiny_config() if model == "tiny" else get_config(model)


def twin_models(cfg, device: str):
    """diffusers `AutoencoderDC` with its random init (seed 0), built on `device`, and its weights converted to our
    float32 variables in memory (no checkpoint round trip: a save and reload of f128c512's 1.1 B parameters took
    ~40 s on 2 CPU cores, most of an accelerator row's time limit)."""
    import torch
    from diffusers import AutoencoderDC

    from dcae_jax.autoencoder import convert

    torch.manual_seed(0)
    with torch.device(device):  # a GPU draws the initial weights itself instead of copying them over
        tmodel = AutoencoderDC(**cfg.to_diffusers())
    return tmodel, convert.convert_state_dict(tmodel.state_dict(), cfg, "diffusers")


def measure(
    model: str,
    resolution: int,
    batch: int,
    repeats: int,
    dtype: str = "float32",
    torch_compile: bool = False,
    stages: bool = False,
    warmup: int = 2,
) -> dict:
    """Times encode+decode of both frameworks on identical weights; returns medians (s) and XLA's FLOPs.

    Shared by this script's command line and `bench.suite` (which runs it in a child process per row)."""
    import torch

    from bench import cost
    from dcae_jax import DCAE
    from dcae_jax.autoencoder.model import DCAEModel

    cfg = _dcae_config(model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    tmodel, variables = twin_models(cfg, device)
    ae = DCAE(cfg, variables, jnp.dtype(dtype))
    del variables
    tmodel = tmodel.eval().to(dtype=tdtype)

    x = np.random.RandomState(0).uniform(-1, 1, (batch, resolution, resolution, 3)).astype(np.float32)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(device=device, dtype=tdtype)
    xj = jnp.asarray(x, ae.dtype)

    def run_torch(m):
        with torch.no_grad():
            y = m.decode(m.encode(xt).latent).sample
        if device == "cuda":
            torch.cuda.synchronize()
        return y

    def run_jax():
        return ae.decode(ae.encode(xj)).block_until_ready()

    enc = ae._encode_fn.lower(ae.variables, xj)
    z = ae.encode(xj)
    dec = ae._decode_fn.lower(ae.variables, z)
    flops = cost.flops(enc) + cost.flops(dec)
    sizes = [cost.footprint(lowered.compile()) for lowered in (enc, dec)]  # the two run one after the other
    footprint = None if None in sizes else max(sizes)

    runners = {"diffusers eager": lambda: run_torch(tmodel), "dcae_jax": run_jax}
    if torch_compile:
        compiled = torch.compile(tmodel)
        runners["diffusers torch.compile"] = lambda: run_torch(compiled)
    for _ in range(warmup):  # compile + warm up
        for fn in runners.values():
            fn()
    times = {k: [] for k in runners}
    for _ in range(repeats):
        for k, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    if stages:
        _stage_report(ae, DCAEModel, xj, repeats)
    return {
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "flops": flops,
        "memory_bytes": {"dcae_jax": footprint},
        "device": f"{jax.devices()[0].device_kind}/{device}",
    }


def main(argv=None) -> None:
    from dcae_jax.runtime import cli

    cli.prepare_process(argv)  # before jax starts: no probe for an absent TPU; the host allocator policy
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dc-ae-f32c32-in-1.0", help='a released variant, or "tiny"')
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--torch_compile", action="store_true", help="also time torch.compile (GPU)")
    p.add_argument("--stages", action="store_true", help="per-stage timing of our model")
    args = p.parse_args(argv)

    r = measure(args.model, args.resolution, args.batch, args.repeats, args.dtype, args.torch_compile, args.stages)
    med, flops = r["median_s"], r["flops"]
    print(
        f"model={args.model} resolution={args.resolution} batch={args.batch} dtype={args.dtype} "
        f"device={r['device']} repeats={args.repeats}"
    )
    print(f"XLA cost analysis: {flops / 1e12:.3f} TFLOP per encode+decode")
    for k, t in med.items():
        print(f"{k:26s} median {t * 1e3:9.1f} ms  {args.batch / t:8.3f} img/s  {flops / t / 1e9:8.1f} GFLOP/s")
    print(f"speed ratio dcae_jax / diffusers eager: {med['diffusers eager'] / med['dcae_jax']:.3f}x")
    if "diffusers torch.compile" in med:
        print(f"speed ratio dcae_jax / torch.compile: {med['diffusers torch.compile'] / med['dcae_jax']:.3f}x")


def _stage_report(ae, DCAEModel, x, repeats: int) -> None:
    """Times each encoder and decoder stage of our model in isolation (jitted, median)."""
    from dcae_jax.autoencoder import layers

    cfg = ae.config
    params = ae.variables
    print("\nper-stage time of dcae_jax (ms), jitted in isolation:")
    # Capture the intermediate activations with `capture_intermediates`, then time each module.
    model = ae.model
    _, state = model.apply(params, x, method=DCAEModel.encode, capture_intermediates=True, mutable=["intermediates"])
    del state, layers, cfg
    enc_out = model.apply(params, x, method=DCAEModel.encode)
    for name, fn, arg in (
        ("encoder", lambda v, a: model.apply(v, a, method=DCAEModel.encode), x),
        ("decoder", lambda v, a: model.apply(v, a, method=DCAEModel.decode), enc_out),
    ):
        jf = jax.jit(fn)
        jf(params, arg).block_until_ready()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jf(params, arg).block_until_ready()
            ts.append(time.perf_counter() - t0)
        print(f"  {name:10s} {statistics.median(ts) * 1e3:9.1f}")


if __name__ == "__main__":
    main()
