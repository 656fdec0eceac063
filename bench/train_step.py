"""Train step throughput of phases 1, 2 and 3: dcae_jax vs a PyTorch equivalent, same weights, one process.

    python -m bench.train_step --model dc-ae-f32c32-in-1.0 --resolution 256 --batch 2 --repeats 5 [--phase 2]

PyTorch side: diffusers `AutoencoderDC`, L1 reconstruction loss, `torch.optim.AdamW` with the phase's
hyper-parameters, one optimizer step per iteration. Phase 1: everything trainable, BatchNorm batch statistics
(train mode). Phases 2 and 3: frozen parameters have `requires_grad=False` (autograd builds no graph for them),
the model in eval mode (BatchNorm running statistics), trainable exactly what our phase trains: phase 2 the
encoder's `conv_out` and the decoder's `conv_in`, phase 3 the decoder head (`norm_out`, `conv_out`) plus a
PatchGAN (the architecture of `dcae_jax.autoencoder.discriminator`, GroupNorm, Adam), hinge loss and the
adaptive GAN weight from the gradients of both losses at the head conv, as taming-transformers computes it.
JAX side: our jitted `train_step`, built exactly as the trainer builds it, with donation. Compile and warm-up
are excluded; repeats are interleaved and the median is reported. FLOPs come from XLA's cost analysis of the
lowered step (bench.cost). LPIPS is off on both sides.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

REFERENCE = "pytorch (diffusers + AdamW)"


def _torch_discriminator(base: int, num_layers: int):
    """Our PatchDiscriminator's layout in torch: conv4x4/2 + LeakyReLU, then normed convs (GroupNorm(32), no
    bias) doubling the width up to 8x, the last at stride 1, and a conv to one logit."""
    import torch.nn as tnn

    layers = [tnn.Conv2d(3, base, 4, 2, 1), tnn.LeakyReLU(0.2)]
    width = base
    for i in range(1, num_layers + 1):
        out = base * min(2**i, 8)
        layers += [
            tnn.Conv2d(width, out, 4, 2 if i < num_layers else 1, 1, bias=False),
            tnn.GroupNorm(32, out, eps=1e-5),
            tnn.LeakyReLU(0.2),
        ]
        width = out
    return tnn.Sequential(*layers, tnn.Conv2d(width, 1, 4, 1, 1))


def torch_step_fn(tmodel, x, phase: int, config, device: str):
    """One PyTorch train step of `phase` with the hyper-parameters of our `config` (see the module docstring).
    `config.model.dtype=bfloat16`: the forward passes under `torch.autocast` in bf16 (float32 weights and
    optimizer, as ours)."""
    import contextlib

    import torch

    bf16 = config.model.dtype == "bfloat16"
    autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    o = config.optim
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if phase == 1:
        tmodel.train()
        params = list(tmodel.parameters())
    else:
        tmodel.eval()
        tmodel.requires_grad_(False)
        heads = {
            2: [tmodel.encoder.conv_out, tmodel.decoder.conv_in],
            3: [tmodel.decoder.norm_out, tmodel.decoder.conv_out],
        }
        for m in heads[phase]:
            m.requires_grad_(True)
        params = [p for p in tmodel.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay)
    if phase != 3:

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast():
                y = tmodel.decode(tmodel.encode(xt).latent).sample
            (y.float() - xt).abs().mean().backward()
            opt.step()
            sync()

        return step

    d = config.disc
    disc = _torch_discriminator(d.base_features, d.num_layers).to(device)
    dopt = torch.optim.Adam(disc.parameters(), lr=d.learning_rate, betas=(d.b1, d.b2))
    head = list(tmodel.decoder.conv_out.parameters())
    gan_weight = config.loss.gan_weight

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            y = tmodel.decode(tmodel.encode(xt).latent).sample
            gen = -disc(y).float().mean()
        y = y.float()
        rec = (y - xt).abs().mean()
        g_rec = torch.autograd.grad(rec, head, retain_graph=True)
        g_gen = torch.autograd.grad(gen, head, retain_graph=True)
        norm = lambda gs: torch.sqrt(sum((g.float() ** 2).sum() for g in gs))
        weight = torch.clamp(norm(g_rec) / (norm(g_gen) + 1e-4), 0.0, 1e4).detach() * gan_weight
        (rec + weight * gen).backward()
        opt.step()
        dopt.zero_grad(set_to_none=True)
        fake = y.detach()
        with autocast():
            real_logits, fake_logits = disc(xt).float(), disc(fake).float()
        d_loss = 0.5 * (torch.relu(1 - real_logits).mean() + torch.relu(1 + fake_logits).mean())
        d_loss.backward()
        dopt.step()
        sync()

    return step


def measure(
    model: str,
    resolution: int,
    batch: int,
    repeats: int,
    lr: float | None = None,
    phase: int = 1,
    warmup: int = 2,
    dtype: str = "float32",
) -> dict:
    """Times one train step of `phase` in both frameworks on identical weights; returns medians (s), XLA's FLOPs.

    `lr`: phase 1's learning rate (default: the phase's own). Shared by this script's command line and
    `bench.suite` (which runs it in a child process per row)."""
    import torch

    from bench import cost
    from bench.autoencoder import twin_models
    from dcae_jax.autoencoder import train
    from dcae_jax.runtime import sharding
    from dcae_jax.training import config as common

    device = "cuda" if torch.cuda.is_available() else "cpu"
    c = common.base_config()
    c.model.variant = model
    mcfg = train.model_config(c)
    common.apply_phase(c, phase, num_stages=mcfg.num_stages)
    c.loss.lpips_weight = 0.0
    c.model.dtype = dtype  # our compute dtype; torch: autocast
    c.resolution, c.global_batch_size = resolution, batch
    if lr is not None:
        c.optim.learning_rate = lr
    tmodel, variables = twin_models(mcfg, device)
    variables = jax.tree_util.tree_map(np.asarray, variables)
    x = np.random.RandomState(0).uniform(-1, 1, (batch, resolution, resolution, 3)).astype(np.float32)
    runners = {REFERENCE: torch_step_fn(tmodel.to(device), x, phase, c, device)}

    # Our step, built exactly as the trainer builds it.
    cfg = train.model_config(c)
    mesh = sharding.mesh_from_config(c)
    trainer = train.build_trainer(c, cfg, variables["params"])
    state, _ = train.create_train_state(c, trainer, cfg, mesh, variables)
    lowered = train.lower_train_step(c)
    compiled = lowered.compile()
    flops = cost.flops(lowered)
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
        "memory_bytes": {"dcae_jax": cost.footprint(compiled)},
        "device": f"{jax.devices()[0].device_kind}/{device}",
    }


def main(argv=None) -> None:
    from dcae_jax.runtime import cli

    cli.prepare_process(argv)  # before jax starts: no probe for an absent TPU; the host allocator policy
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dc-ae-f32c32-in-1.0", help='a released variant, or "tiny"')
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--phase", type=int, default=1, choices=[1, 2, 3])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the phase's)")
    args = p.parse_args(argv)

    import torch

    r = measure(args.model, args.resolution, args.batch, args.repeats, args.lr, phase=args.phase, dtype=args.dtype)
    med, flops = r["median_s"], r["flops"]
    print(
        f"model={args.model} phase={args.phase} resolution={args.resolution} batch={args.batch} device={r['device']} "
        f"repeats={args.repeats} torch={torch.__version__} jax={jax.__version__}"
    )
    print(f"XLA cost analysis: {flops / 1e12:.3f} TFLOP per train step")
    for k, t in med.items():
        print(f"{k:28s} median {t * 1e3:9.1f} ms  {args.batch / t:7.3f} img/s  {flops / t / 1e9:8.1f} GFLOP/s")
    print(f"speed ratio dcae_jax / pytorch: {med[REFERENCE] / med['dcae_jax']:.3f}x")


if __name__ == "__main__":
    main()
