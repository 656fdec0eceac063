"""UViT throughput on DC-AE latents vs SD-VAE latents: the DC-AE paper's Table 3 question, on this machine.

    python -m bench.diffusion --model uvit-s --batch 4 --repeats 3

At 512x512, UViT sees DC-AE-f64 latents (8x8x128, patch 1: 64 tokens), DC-AE-f32 latents
(16x16x32, patch 1: 256 tokens) or SD-VAE-f8 latents (64x64x4, patch 2: 1024 tokens), plus the
label and time tokens. For each we time (median of interleaved repeats, compile excluded; short steps timed back to
back, up to --steps of them, as a loop runs them) the real
sharded training step (`dcae_jax.diffusion.train.train_step`: epsilon objective, AdamW, EMA) and one
sampling step (one guided model evaluation: conditional + unconditional batch, as DPM-Solver++ does
30 times per image), count their FLOPs with XLA's cost analysis (bench.cost), and print throughput ratios against
SD-VAE-f8 p2 next to the paper's (UViT-H, H100, fp16: 17.9x training, 19.1x inference for f64).
fp32 unless --dtype bfloat16; per-step compute, not the autoencoder, is what the latent choice changes.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

# (name, latent (H, W, C), patch): the three latent spaces of the paper's comparison at 512x512.
LATENTS = (
    ("SD-VAE-f8 p2", (64, 64, 4), 2),
    ("DC-AE-f32 p1", (16, 16, 32), 1),
    ("DC-AE-f64 p1", (8, 8, 128), 1),
)
# Paper Table 3 (UViT-H, 512x512): images/s on H100, SD-VAE-f8p2 -> DC-AE-f64p1.
PAPER = {"DC-AE-f64 p1": {"train": 984 / 55, "sample": 111.77 / 5.85}}
BACK_TO_BACK_S = 0.25  # measure(): steps timed back to back fill about this long, up to its `steps`


def _timed(fn, repeats: int, steps: int = 1) -> list[float]:
    """Seconds per call: each repeat runs `steps` calls back to back and waits once, at the end, as a training or
    sampling loop does (the host dispatches step k+1 while the device runs step k); steps=1 is one call's latency."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            out = fn()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / steps)
    return times


def guided_eval_fn(trainer, cfg):
    """One guided model evaluation (params, x, t, y) -> output: the conditional and unconditional batch with
    classifier-free guidance scale 1.5, what each of DPM-Solver++'s steps evaluates."""
    from dcae_jax.diffusion.samplers import classifier_free_guidance

    def guided_eval(params, x, t, y):
        def apply_fn(x, t, y):
            return trainer.model.apply({"params": params}, x, jnp.broadcast_to(t, (x.shape[0],)), y)

        return classifier_free_guidance(apply_fn, y, null_class=cfg.null_class, scale=1.5)(x, t)

    return guided_eval


def build(
    model: str, latent: tuple[int, int, int], patch: int, batch: int, dtype: str = "float32", remat: str = "none"
):
    """Compiled train step and guided sampling step for one latent space, with their inputs. `remat`: the blocks'
    recomputation policy (the training default is "full"); the FLOPs counted are the model's, without it."""
    from bench import cost
    from dcae_jax.diffusion import train as dtrain
    from dcae_jax.runtime import sharding
    from dcae_jax.training import config as common

    config = common.diffusion_config()
    config.model.preset, config.model.patch_size = model, patch
    config.model.dtype, config.model.remat = dtype, remat
    config.global_batch_size = batch
    cfg = dtrain.model_config(config, latent)
    trainer = dtrain.build_trainer(config, cfg)
    mesh = sharding.make_mesh((-1, 1), ("data", "fsdp"))
    state, shardings = dtrain.create_train_state(config, trainer, cfg, mesh)
    data = sharding.batch_sharding(mesh)
    rng = np.random.default_rng(0)
    batch_arrays = {
        "latent": jax.device_put(rng.normal(size=(batch, *latent)).astype(np.float32), data),
        "label": jax.device_put(rng.integers(0, 1000, batch).astype(np.int32), data),
    }

    def programs(trainer):
        step = jax.jit(
            functools.partial(dtrain.train_step, trainer=trainer),
            in_shardings=(shardings, data),
            out_shardings=(shardings, None),
            donate_argnums=(0,),
        )

        x, t = batch_arrays["latent"], jnp.asarray(500.0)
        sample = jax.jit(guided_eval_fn(trainer, cfg))
        return step.lower(state, batch_arrays), sample.lower(state.params, x, t, batch_arrays["label"])

    train_lowered, sample_lowered = programs(trainer)
    train_compiled, sample_compiled = train_lowered.compile(), sample_lowered.compile()
    # FLOPs of the same step with XLA's attention: cuDNN's fused attention (chosen on a GPU) is a custom call that
    # XLA's cost analysis does not count (bench.cost). Without remat: model FLOPs, not the recomputed ones.
    config.model.attention, config.model.remat = "xla", "none"
    counted = programs(dtrain.build_trainer(config, cfg))
    x, t = batch_arrays["latent"], jnp.asarray(500.0)
    cost_of = {
        "train_flops": cost.flops(counted[0]),
        # the program timed: with its recomputation (and on a GPU without cuDNN attention, which is not counted)
        "train_executed_flops": cost.flops(train_lowered),
        "sample_flops": cost.flops(counted[1]),
        "train_bytes": cost.footprint(train_compiled),
        "sample_bytes": cost.footprint(sample_compiled),
    }
    holder = {"state": state}

    def run_train():
        holder["state"], metrics = train_compiled(holder["state"], batch_arrays)
        return metrics

    def run_sample():
        return sample_compiled(holder["state"].params, x, t, batch_arrays["label"])

    return cfg, cost_of, run_train, run_sample


def measure(
    model: str,
    batch: int,
    repeats: int,
    latents=LATENTS,
    dtype: str = "float32",
    steps: int = 1,
    remat: str = "none",
) -> dict[str, dict]:
    """Per latent space: tokens, FLOPs and the interleaved train / sample step times (lists of seconds per step).

    Each repeat times up to `steps` steps back to back (`_timed`): as many as fit in `BACK_TO_BACK_S` by the
    warm-up call's time, at least one, so a short step is timed as a loop runs it (its host dispatch overlapped
    with the device) and a long one costs no extra time. The counts used are in the result ("steps").
    Shared by this script's command line and `bench.suite` (which runs it in a child process per row)."""
    rows = {}
    runners = {}
    for name, latent, patch in latents:
        cfg, cost_of, run_train, run_sample = build(model, latent, patch, batch, dtype, remat)
        n = {}
        for step, fn in (("train", run_train), ("sample", run_sample)):
            warm = _timed(fn, 1)[0]  # the first call: waited for, so no repeat below pays for it
            n[step] = max(1, min(steps, int(BACK_TO_BACK_S / warm)))
        runners[name] = (run_train, run_sample, n)
        rows[name] = {"tokens": cfg.seq_len, **cost_of, "train_s": [], "sample_s": [], "steps": n}
    for _ in range(repeats):  # interleaved, so machine load drifts hit every row alike
        for name, (run_train, run_sample, n) in runners.items():
            rows[name]["train_s"] += _timed(run_train, 1, n["train"])
            rows[name]["sample_s"] += _timed(run_sample, 1, n["sample"])
    return rows


def main(argv=None) -> None:
    from dcae_jax.runtime import cli

    cli.prepare_process(argv)  # before jax starts: no probe for an absent TPU; the host allocator policy
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="uvit-s", help="uvit-s | uvit-h | uvit-2b | uvit-tiny")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--steps", type=int, default=1, help="at most this many steps timed back to back per repeat")
    p.add_argument("--remat", default="none", help="the blocks' recomputation policy (none | full | dots)")
    args = p.parse_args(argv)

    rows = measure(args.model, args.batch, args.repeats, dtype=args.dtype, steps=args.steps, remat=args.remat)
    base = rows[LATENTS[0][0]]
    print(f"{args.model}, batch {args.batch}, {args.dtype}, {jax.devices()[0].platform}, median of {args.repeats}")
    print(
        "| latents | tokens | train GFLOP/img | train img/s | train speed-up (FLOP ratio) | sample-step GFLOP/img | "
        "sample img/s | sample speed-up (FLOP ratio) | paper (UViT-H, H100) train / sample |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        train_ips = args.batch / statistics.median(r["train_s"])
        sample_ips = args.batch / statistics.median(r["sample_s"])
        base_train = args.batch / statistics.median(base["train_s"])
        base_sample = args.batch / statistics.median(base["sample_s"])
        paper = PAPER.get(name)
        paper_txt = f"{paper['train']:.1f}x / {paper['sample']:.1f}x" if paper else ("1x / 1x" if r is base else "–")
        print(
            f"| {name} | {r['tokens']} | {r['train_flops'] / args.batch / 1e9:.1f} | {train_ips:.3g} | "
            f"{train_ips / base_train:.2f}x ({base['train_flops'] / r['train_flops']:.2f}x) | "
            f"{r['sample_flops'] / args.batch / 1e9:.1f} | {sample_ips:.3g} | "
            f"{sample_ips / base_sample:.2f}x ({base['sample_flops'] / r['sample_flops']:.2f}x) | {paper_txt} |"
        )


if __name__ == "__main__":
    main()
