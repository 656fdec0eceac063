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


def main(argv=None) -> None:
    from dcae_jax.runtime import cli

    cli.skip_absent_tpu()  # libtpu (a test requirement) would probe for a TPU and log errors first
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dc-ae-f32c32-in-1.0")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--lr", type=float, default=6.4e-5)
    args = p.parse_args(argv)

    import torch
    from diffusers import AutoencoderDC

    from dcae_jax.autoencoder import train
    from dcae_jax.autoencoder.model import get_config
    from dcae_jax.autoencoder.pretrained import DCAE
    from dcae_jax.runtime import sharding
    from dcae_jax.training import config as common

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    tmodel = AutoencoderDC(**get_config(args.model).to_diffusers())
    with tempfile.TemporaryDirectory() as d:
        tmodel.save_pretrained(d)
        variables = jax.tree_util.tree_map(np.asarray, DCAE.from_pretrained(d, variant=args.model).variables)
    tmodel = tmodel.to(device).train()
    topt = torch.optim.AdamW(tmodel.parameters(), lr=args.lr, weight_decay=0.1)

    x = np.random.RandomState(0).uniform(-1, 1, (args.batch, args.resolution, args.resolution, 3)).astype(np.float32)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(device)

    def torch_step():
        topt.zero_grad(set_to_none=True)
        y = tmodel.decode(tmodel.encode(xt).latent).sample
        loss = (y - xt).abs().mean()
        loss.backward()
        topt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    # Our phase-1 step, built exactly as the trainer builds it.
    c = common.base_config()
    c.model.variant = args.model
    common.apply_phase(c, 1, num_stages=get_config(args.model).num_stages)
    c.resolution, c.global_batch_size = args.resolution, args.batch
    c.optim.learning_rate = args.lr
    cfg = train.model_config(c)
    mesh = sharding.mesh_from_config(c)
    trainer = train.build_trainer(c, cfg, variables["params"])
    state, _ = train.create_train_state(c, trainer, cfg, mesh, variables)
    lowered = train.lower_train_step(c)
    compiled = lowered.compile()
    cost = compiled.cost_analysis()
    flops = float((cost[0] if isinstance(cost, list | tuple) else cost).get("flops", float("nan")))
    batch = sharding.global_batch({"image": x}, sharding.batch_sharding(mesh))
    aux: dict = {}
    holder = {"state": state}

    def jax_step():
        holder["state"], m = compiled(holder["state"], batch, aux)
        jax.block_until_ready(m)

    for fn in (torch_step, jax_step, torch_step, jax_step):
        fn()
    times: dict[str, list[float]] = {"pytorch (diffusers + AdamW)": [], "dcae_jax": []}
    for _ in range(args.repeats):
        for name, fn in (("pytorch (diffusers + AdamW)", torch_step), ("dcae_jax", jax_step)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"model={args.model} resolution={args.resolution} batch={args.batch} device={jax.devices()[0].device_kind}/"
        f"{device} repeats={args.repeats} torch={torch.__version__} jax={jax.__version__}"
    )
    print(f"XLA cost analysis: {flops / 1e12:.3f} TFLOP per train step")
    for k, t in med.items():
        print(f"{k:28s} median {t * 1e3:9.1f} ms  {args.batch / t:7.3f} img/s  {flops / t / 1e9:8.1f} GFLOP/s")
    print(f"speed ratio dcae_jax / pytorch: {med['pytorch (diffusers + AdamW)'] / med['dcae_jax']:.3f}x")


if __name__ == "__main__":
    main()
