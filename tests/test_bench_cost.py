"""bench.cost: FLOPs from the lowered program (the dots and convs the model asks for) and the compiled footprint."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import cost


def test_flops_count_the_lowered_dots_and_convs():
    a = jnp.ones((64, 96), jnp.float32)
    b = jnp.ones((96, 32), jnp.float32)
    assert cost.flops(jax.jit(jnp.matmul).lower(a, b)) == 2 * 64 * 96 * 32

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    x, w = jnp.ones((2, 10, 10, 8), jnp.bfloat16), jnp.ones((3, 3, 8, 16), jnp.bfloat16)
    macs = 2 * 8 * 8 * 16 * 3 * 3 * 8  # output elements x kernel taps x input channels
    assert cost.flops(jax.jit(conv).lower(x, w)) == pytest.approx(2 * macs, rel=0.02)


def test_flops_of_another_platforms_lowering():
    """A program lowered for a GPU on this CPU is counted as the GPU would run it (platform_dependent picks the
    branch at lowering): how the H200 rows' counts can be checked without a GPU."""
    a = jnp.ones((32, 32), jnp.float32)

    def f(x):
        return jax.lax.platform_dependent(x, cpu=lambda x: x @ x @ x, default=lambda x: x @ x)

    assert cost.flops(jax.jit(f).lower(a)) == 2 * 2 * 32**3
    assert cost.flops(jax.jit(f).trace(a).lower(lowering_platforms=("cuda",))) == 2 * 32**3


def test_footprint_holds_arguments_and_outputs_less_donated_ones():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(256, 256)), jnp.float32)
    kept = cost.footprint(jax.jit(lambda x: x * 2 + 1).lower(x).compile())
    donated = cost.footprint(jax.jit(lambda x: x * 2 + 1, donate_argnums=0).lower(x).compile())
    assert kept >= 2 * x.nbytes
    assert donated < kept and donated >= x.nbytes
