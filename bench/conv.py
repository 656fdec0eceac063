"""Single convolutions at DC-AE's main shapes: XLA vs torch, same data, one process, interleaved.

    python -m bench.conv --repeats 5
    python -m bench.conv --repeats 5 --pass input_grad     # the backward convolutions (training)
    python -m bench.conv --repeats 5 --pass weight_grad
    # Both frameworks limited to AVX2 (to compare with an AVX2-only processor):
    XLA_FLAGS=--xla_cpu_max_isa=AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python -m bench.conv
    # Other shapes: batch x size² x channels in -> out, kernel (here the quickstart model's 64² and 8² stages):
    python -m bench.conv --pass weight_grad --shapes 8x64x16x16x3,8x8x128x256x3

The 3x3 convolutions of the ResBlock stages hold most of an f32c32 encode+decode's FLOPs; the 1x1 ones are
LiteMLA's and GLUMBConv's projections. Batch 1, fp32, compile and warm-up excluded, median of the repeats.
`--pass`: the forward convolution, or a train step's two backward ones (gradient w.r.t. the input, and w.r.t.
the kernel: XLA's from `jax.vjp`, torch's `torch.nn.grad.conv2d_input/conv2d_weight`). The dcae_jax column
is what our `Conv2d` runs: a matmul for 1x1, else `layers.conv_same`, which on the CPU runs wide float32 3x3
convs as Winograd F(2x2, 3x3) (`layers.winograd_fits`; `DCAE_JAX_CONV3X3=xla` turns it off), else XLA's conv,
with kernel gradients as k*k matmuls on x86 CPUs for kernels with 64+ inputs (`layers.kernel_grad_as_dots`).
Prints the processor (lscpu model name and vector extensions) beside the numbers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

# (spatial size, channels in = out, kernel): f32c32 at 512², ResBlock stages at H/2 and H/4, and the H/8 stage;
# the last: the H/2 ResBlock stage of a 256² phase-1 train step (its H/4 stage is the third). As
# (batch, spatial size, channels in, channels out, kernel).
SHAPES = tuple(
    (1, s, c, c, k)
    for s, c, k in ((256, 256, 3), (128, 512, 3), (64, 512, 3), (256, 256, 1), (128, 512, 1), (128, 256, 3))
)


def parse_shapes(text: str) -> tuple[tuple[int, int, int, int, int], ...]:
    """ "8x64x16x16x3,1x256x128x128x3" -> ((8, 64, 16, 16, 3), ...): batch x size x in x out x kernel."""
    shapes = []
    for item in filter(None, text.split(",")):
        parts = item.strip().split("x")
        if len(parts) != 5 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--shapes: {item!r} is not batch x size x channels-in x channels-out x kernel")
        shapes.append(tuple(int(p) for p in parts))
    return tuple(shapes)


PASSES = ("forward", "input_grad", "weight_grad")


def processor() -> str:
    from dcae_jax.runtime.compute import cpuinfo

    info = cpuinfo()
    isa = sorted(f for f in info.get("flags", "").split() if f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"))
    name = f"{info.get('model name', 'unknown')} (family {info.get('cpu family', '?')} model {info.get('model', '?')})"
    return f"{name}, {', '.join(isa) or 'no AVX2'}, {os.cpu_count()} cores"


def main(argv=None) -> None:
    from dcae_jax.runtime import cli

    cli.prepare_process(argv)  # before jax starts: no probe for an absent TPU; the host allocator policy
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--pass", dest="which", default="forward", choices=PASSES)
    p.add_argument("--shapes", default="", help="batch x size x in x out x kernel, comma-separated (default: DC-AE's)")
    args = p.parse_args(argv)
    try:
        shapes = parse_shapes(args.shapes) or SHAPES
    except ValueError as err:
        p.error(str(err))

    import jax
    import jax.numpy as jnp
    import torch

    torch.set_grad_enabled(False)

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    xla = {
        "forward": jax.jit(lambda x, w, g: conv(x, w)),
        "input_grad": jax.jit(lambda x, w, g: jax.vjp(conv, x, w)[1](g)[0]),
        "weight_grad": jax.jit(lambda x, w, g: jax.vjp(conv, x, w)[1](g)[1]),
    }[args.which]
    from dcae_jax.autoencoder import layers

    def ours(x, w):  # what our Conv2d runs: a matmul for 1x1, else conv_same (Winograd / dots on the CPU)
        return jnp.einsum("bhwi,io->bhwo", x, w[0, 0]) if w.shape[0] == 1 else layers.conv_same(x, w)

    dcae = {
        "forward": jax.jit(lambda x, w, g: ours(x, w)),
        "input_grad": jax.jit(lambda x, w, g: jax.vjp(ours, x, w)[1](g)[0]),
        "weight_grad": jax.jit(lambda x, w, g: jax.vjp(ours, x, w)[1](g)[1]),
    }[args.which]
    print(f"processor: {processor()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; torch {torch.__version__}")
    print(f"{args.which} (XLA: lax.conv_general_dilated and its jax.vjp; dcae_jax: what Conv2d runs):")
    print(
        "| shape (batch x H=W x C in -> out, kernel) | XLA conv ms | dcae_jax ms | torch ms | torch / XLA conv | torch / dcae_jax |\n"
        "|---|---:|---:|---:|---:|---:|"
    )
    rng = np.random.default_rng(0)
    for batch, size, c, c_out, k in shapes:
        x = rng.standard_normal((batch, size, size, c), dtype=np.float32)
        w = (0.01 * rng.standard_normal((k, k, c, c_out))).astype(np.float32)
        g = rng.standard_normal((batch, size, size, c_out), dtype=np.float32)
        xj, wj, gj = jax.device_put(x), jax.device_put(w), jax.device_put(g)
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        wt = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous()
        gt = torch.from_numpy(g).permute(0, 3, 1, 2).contiguous()
        pad = k // 2
        torch_fn = {
            "forward": lambda xt=xt, wt=wt, pad=pad: torch.nn.functional.conv2d(xt, wt, padding=pad),
            "input_grad": lambda xt=xt, wt=wt, gt=gt, pad=pad: torch.nn.grad.conv2d_input(
                xt.shape, wt, gt, padding=pad
            ),
            "weight_grad": lambda xt=xt, wt=wt, gt=gt, pad=pad: torch.nn.grad.conv2d_weight(
                xt, wt.shape, gt, padding=pad
            ),
        }[args.which]
        runs = {
            "xla": lambda xj=xj, wj=wj, gj=gj: xla(xj, wj, gj).block_until_ready(),
            "dcae": lambda xj=xj, wj=wj, gj=gj: dcae(xj, wj, gj).block_until_ready(),
            "torch": torch_fn,
        }
        ref = np.asarray(runs["xla"]())
        layout = (2, 3, 1, 0) if args.which == "weight_grad" else (0, 2, 3, 1)  # OIHW -> HWIO, NCHW -> NHWC
        for name, got in (("torch", runs["torch"]().permute(*layout).numpy()), ("dcae_jax", runs["dcae"]())):
            err = np.abs(ref - np.asarray(got)).max()
            assert err <= 1e-3 * np.abs(ref).max(), f"{name}'s {args.which} disagrees with XLA's conv"
        times = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        print(
            f"| {batch} x {size}² x {c} -> {c_out}, {k}x{k} | {med['xla']:.1f} | {med['dcae']:.1f} | {med['torch']:.1f} | "
            f"{med['torch'] / med['xla']:.2f} | {med['torch'] / med['dcae']:.2f} |"
        )


if __name__ == "__main__":
    main()
