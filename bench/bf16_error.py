"""bf16 vs fp32 error of a full-size DC-AE at 512x512 (weights and activations in bf16,
attention and norm reductions in fp32), plus a NaN/Inf check.

    python -m bench.bf16_error --model dc-ae-f32c32-in-1.0 --resolution 512

Weights: diffusers' random init (the released checkpoints cannot be downloaded here), with norm
scales/biases and BatchNorm statistics randomised; input: a real photo (scikit-image astronaut)
resized to the resolution.
"""

from __future__ import annotations

import argparse
import tempfile

import jax.numpy as jnp
import numpy as np


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main(argv=None) -> None:
    from dcae_jax.runtime import cli

    cli.prepare_process(argv)  # before jax starts: no probe for an absent TPU; the host allocator policy
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dc-ae-f32c32-in-1.0")
    p.add_argument("--resolution", type=int, default=512)
    args = p.parse_args(argv)

    import sys

    import skimage.data
    from PIL import Image

    sys.path.insert(0, "tests")
    from torch_reference import make_torch_model

    from dcae_jax import DCAE, get_config

    cfg = get_config(args.model)
    with tempfile.TemporaryDirectory() as d:
        make_torch_model(cfg).save_pretrained(d)
        ae32 = DCAE.from_pretrained(d, variant=args.model)
        ae16 = DCAE.from_pretrained(d, variant=args.model, dtype=jnp.bfloat16)
    img = Image.fromarray(skimage.data.astronaut()).resize((args.resolution, args.resolution), Image.BICUBIC)
    x = (np.asarray(img, np.float32) / 127.5 - 1.0)[None]
    z32, z16 = ae32.encode(x), ae16.encode(x)
    y32, y16 = ae32.decode(z32), ae16.decode(z16)
    finite = bool(jnp.all(jnp.isfinite(z16.astype(jnp.float32))) and jnp.all(jnp.isfinite(y16.astype(jnp.float32))))
    print(f"model={args.model} resolution={args.resolution} bf16 finite={finite}")
    print(
        f"latent: relative L2 error {_rel(z16, z32):.4f}, max|dz| {np.abs(np.asarray(z16, np.float32) - z32).max():.4f}"
        f" (max|z| {np.abs(np.asarray(z32)).max():.2f})"
    )
    print(
        f"image (bf16 end to end): relative L2 error {_rel(y16, y32):.4f}, "
        f"max|dy| {np.abs(np.asarray(y16, np.float32) - y32).max():.4f}"
    )
    y16_dec = ae16.decode(z32)
    print(f"image (bf16 decoder on fp32 latent): relative L2 error {_rel(y16_dec, y32):.4f}")


if __name__ == "__main__":
    main()
