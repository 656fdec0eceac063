"""Phase-1 train step throughput: dcae_jax vs a PyTorch equivalent, same weights, one process.

    python -m bench.train_step --model dc-ae-f32c32-in-1.0 --resolution 256 --batch 2 --repeats 5

PyTorch side: diffusers `AutoencoderDC` in train mode (BatchNorm batch statistics), L1
reconstruction loss, `torch.optim.AdamW`, one optimizer step per iteration. JAX side: our jitted
`train_step` (phase 1: everything trainable, BatchNorm in train mode, L1, AdamW) with donation.
Compile and warm-up are excluded; repeats are interleaved and the median is reported. FLOPs come
from XLA's cost analysis of the compiled step.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import numpy as np


def measure(
    model: str, resolution: int, batch: int, repeats: int, lr: float = 6.4e-5, phase: int = 1, warmup: int = 2
) -> dict:
    """Times one train step of both frameworks on identical weights; returns medians (s) and XLA's FLOPs.

    Phase 1 has a PyTorch equivalent (below). Phases 2 and 3 (frozen layers, BatchNorm in eval mode,
    phase 3's GAN loss) are timed on our side only: no PyTorch equivalent of their freezing exists here yet,
    so "pytorch" is absent from the result for them. LPIPS is off (its weights would need a download).
    Shared by this script's command line and `bench.suite` (which runs it in a child process per row)."""
    import torch
    from diffusers import AutoencoderDC

    from dcae_jax.autoencoder import train
    from dcae_jax.autoencoder.pretrained import DCAE
    from dcae_jax.runtime import sharding
    from dcae_jax.training import config as common

    device = "cuda" if torch.cuda.is_available() else "cpu"
    c = common.base_config()
    c.model.variant = model
    mcfg = train.model_config(c)
    torch.manual_seed(0)
    tmodel = AutoencoderDC(**mcfg.to_diffusers())
    with tempfile.TemporaryDirectory() as d:
        tmodel.save_pretrained(d)
        variant = None if model == "tiny" else model
        variables = jax.tree_util.tree_map(np.asarray, DCAE.from_pretrained(d, variant=variant).variables)
    x = np.random.RandomState(0).uniform(-1, 1, (batch, resolution, resolution, 3)).astype(np.float32)
    runners = {}
    if phase == 1:
        tmodel = tmodel.to(device).train()
        topt = torch.optim.AdamW(tmodel.parameters(), lr=lr, weight_decay=0.1)
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(device)

        def torch_step():
            topt.zero_grad(set_to_none=True)
            y = tmodel.decode(tmodel.encode(xt).latent).sample
            loss = (y - xt).abs().mean()
            loss.backward()
            topt.step()
            if device == "cuda":
                torch.cuda.synchronize()

        runners["pytorch (diffusers + AdamW)"] = torch_step
    else:
        del tmodel

    # Our step, built exactly as the trainer builds it.
    common.apply_phase(c, phase, num_stages=mcfg.num_stages)
    c.loss.lpips_weight = 0.0
    c.resolution, c.global_batch_size = resolution, batch
    if phase == 1:
        c.optim.learning_rate = lr
    cfg = train.model_config(c)
    mesh = sharding.mesh_from_config(c)
    trainer = train.build_trainer(c, cfg, variables["params"])
    state, _ = train.create_train_state(c, trainer, cfg, mesh, variables)
    lowered = train.lower_train_step(c)
    compiled = lowered.compile()
    cost = compiled.cost_analysis()
    flops = float((cost[0] if isinstance(cost, list | tuple) else cost).get("flops", float("nan")))
    jbatch = sharding.global_batch({"image": x}, sharding.batch_sharding(mesh))
    aux: dict = {}
    holder = {"state": state}

    def jax_step():
        holder["state"], m = compiled(holder["state"], jbatch, aux)
        jax.block_until_ready(m)

    runners["dcae_jax"] = jax_step
    for _ in range(warmup):
        for fn in runners.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "flops": flops,
        "device": f"{jax.devices()[0].device_kind}/{device}",
    }


def main(argv=None) -> None:
    from dcae_jax.runtime import cli

    cli.skip_absent_tpu()  # libtpu (a test requirement) would probe for a TPU and log errors first
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dc-ae-f32c32-in-1.0", help='a released variant, or "tiny"')
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--lr", type=float, default=6.4e-5)
    args = p.parse_args(argv)

    import torch

    r = measure(args.model, args.resolution, args.batch, args.repeats, args.lr)
    med, flops = r["median_s"], r["flops"]
    print(
        f"model={args.model} resolution={args.resolution} batch={args.batch} device={r['device']} "
        f"repeats={args.repeats} torch={torch.__version__} jax={jax.__version__}"
    )
    print(f"XLA cost analysis: {flops / 1e12:.3f} TFLOP per train step")
    for k, t in med.items():
        print(f"{k:28s} median {t * 1e3:9.1f} ms  {args.batch / t:7.3f} img/s  {flops / t / 1e9:8.1f} GFLOP/s")
    print(f"speed ratio dcae_jax / pytorch: {med['pytorch (diffusers + AdamW)'] / med['dcae_jax']:.3f}x")


if __name__ == "__main__":
    main()
