"""Primitive layers against their torch definitions (NCHW torch vs NHWC JAX)."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dcae_jax.autoencoder import layers
from dcae_jax.runtime import compute


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


@pytest.fixture
def x():
    return np.random.RandomState(0).randn(2, 8, 12, 16).astype(np.float32)


def test_pixel_unshuffle_and_shuffle_match_torch(x):
    np.testing.assert_array_equal(layers.pixel_unshuffle(jnp.asarray(x), 2), _nhwc(F.pixel_unshuffle(_nchw(x), 2)))
    np.testing.assert_array_equal(layers.pixel_shuffle(jnp.asarray(x), 2), _nhwc(F.pixel_shuffle(_nchw(x), 2)))
    with pytest.raises(ValueError, match="divisible"):
        layers.pixel_unshuffle(jnp.zeros((1, 3, 4, 1)), 2)


def test_shortcuts_match_reference_definitions(x):
    t = _nchw(x)
    # Encoder shortcut: unshuffle, then mean over consecutive groups of G channels.
    ref = F.pixel_unshuffle(t, 2).unflatten(1, (8, -1)).mean(2)
    np.testing.assert_allclose(layers.space_to_channel_average(jnp.asarray(x), 8), _nhwc(ref), rtol=1e-6, atol=1e-6)
    # Decoder shortcut: repeat_interleave (not tile), then pixel-shuffle.
    ref = F.pixel_shuffle(t.repeat_interleave(2, dim=1), 2)
    np.testing.assert_array_equal(layers.channel_duplicate_to_space(jnp.asarray(x), 8), _nhwc(ref))
    np.testing.assert_array_equal(
        layers.upsample_nearest2x(jnp.asarray(x)), _nhwc(F.interpolate(t, scale_factor=2, mode="nearest"))
    )


@pytest.mark.parametrize("stride,kernel,hw", [(1, 3, (8, 12)), (2, 3, (8, 12)), (2, 3, (7, 9)), (1, 1, (5, 5))])
def test_conv_uses_torch_padding(stride, kernel, hw):
    rng = np.random.RandomState(1)
    x = rng.randn(1, *hw, 6).astype(np.float32)
    conv = layers.Conv2d(5, kernel, stride=stride)
    params = conv.init(jax.random.key(0), jnp.asarray(x))
    w = np.asarray(params["params"]["kernel"]).transpose(3, 2, 0, 1)
    b = rng.randn(5).astype(np.float32)
    params = {"params": {"kernel": params["params"]["kernel"], "bias": jnp.asarray(b)}}
    ref = F.conv2d(_nchw(x), torch.from_numpy(w), torch.from_numpy(b), stride=stride, padding=kernel // 2)
    np.testing.assert_allclose(jax.jit(conv.apply)(params, jnp.asarray(x)), _nhwc(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("channels", [(6, 4), (136, 128)], ids=["narrow", "wide"])
def test_conv_gradients_equal_torch_on_both_kernel_gradient_paths(k, dtype, channels, monkeypatch):
    """`conv_same`'s custom backward gives torch's input and kernel gradients, jitted, on both of its CPU paths:
    the conv's own transpose (narrow kernels) and k matmuls (wide ones: no kernel-gradient convolution)."""
    monkeypatch.setenv(compute.CONV_KERNEL_GRAD_ENV, "dots")  # the default picks by processor vendor
    c_in, c_out = channels
    rng = np.random.RandomState(2)
    x, g = rng.randn(2, 9, 11, c_in).astype(np.float32), rng.randn(2, 9, 11, c_out).astype(np.float32)
    w = (0.3 * rng.randn(k, k, c_in, c_out) / np.sqrt(c_in)).astype(np.float32)

    def loss(x, w):
        return jnp.sum(layers.conv_same(x.astype(dtype), w.astype(dtype)).astype(jnp.float32) * g)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    dx, dw = grad(jnp.asarray(x), jnp.asarray(w))
    xt, wt = _nchw(x).requires_grad_(), torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).requires_grad_()
    (F.conv2d(xt, wt, padding=k // 2) * _nchw(g)).sum().backward()
    tol = 1e-4 if dtype == jnp.float32 else 3e-2
    for got, ref in ((dx, _nhwc(xt.grad)), (dw, wt.grad.numpy().transpose(2, 3, 1, 0))):
        assert got.dtype == jnp.float32 and got.shape == ref.shape
        np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=tol * np.abs(ref).max())
    wide = c_in * c_out > 128 * 128
    assert layers.kernel_grad_as_dots(x.shape, w.shape) == wide
    assert _lowered_convs(layers.conv_same, x.shape, w.shape) == (1 if wide else 2)


def _lowered_convs(conv, x_shape, w_shape) -> int:
    """Convolutions in the lowered input + kernel gradient of `conv` (abstract shapes: nothing runs)."""
    f = jax.grad(lambda x, w: jnp.sum(conv(x, w)), argnums=(0, 1))
    args = (jax.ShapeDtypeStruct(x_shape, jnp.float32), jax.ShapeDtypeStruct(w_shape, jnp.float32))
    return jax.jit(f).lower(*args).as_text().count("stablehlo.convolution")


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "dots"),
    [
        ((8, 64, 64, 16), (3, 3, 16, 16), False),  # the quickstart's 64² stage: XLA's conv ~1.1x faster
        ((8, 32, 32, 32), (3, 3, 32, 32), False),  # 32 inputs: about even, XLA's conv kept
        ((8, 16, 16, 64), (3, 3, 64, 64), True),  # 64 inputs on few pixels: the matmuls 1.5x faster
        ((1, 256, 256, 128), (3, 3, 128, 128), True),  # 128 x 128 on 256² pixels: the matmuls ~3.7x faster
        ((1, 256, 256, 128), (3, 3, 128, 3), True),  # a decoder's head conv (3 outputs): the matmuls 3.6x faster
        ((1, 256, 256, 3), (3, 3, 3, 128), False),  # an encoder's input conv (3 inputs): XLA's conv 3.5x faster
        ((1, 64, 64, 256), (3, 3, 256, 256), True),  # released models' wide stages: the matmuls 1.5-5x faster
    ],
)
def test_kernel_gradient_path_follows_the_measured_rule(x_shape, w_shape, dots, monkeypatch):
    monkeypatch.setenv(compute.CONV_KERNEL_GRAD_ENV, "dots")
    monkeypatch.setenv(compute.CONV3X3_ENV, "xla")  # counts the kernel-gradient path's convs alone
    assert layers.kernel_grad_as_dots(x_shape, w_shape) == dots
    assert _lowered_convs(layers.conv_same, x_shape, w_shape) == (1 if dots else 2)
    assert _lowered_convs(layers._conv, x_shape, w_shape) == 2  # the plain conv: input and kernel gradient


@pytest.mark.parametrize(
    ("setting", "vendor", "dots"),
    [
        (None, "GenuineIntel", True),  # measured: the 256² phase-1 step 1.5x faster with the matmuls
        (None, "AuthenticAMD", True),  # measured (Zen 3): 1.7x faster (docs/performance.md)
        (None, "", False),  # no vendor id (an ARM host, macOS): XLA's conv, the unmeasured default
        ("auto", "AuthenticAMD", True),
        ("xla", "AuthenticAMD", False),
        ("dots", "", True),
        ("xla", "GenuineIntel", False),
    ],
)
def test_kernel_gradient_path_follows_the_setting_and_the_processor(setting, vendor, dots, monkeypatch):
    wide = ((1, 64, 64, 256), (3, 3, 256, 256))
    monkeypatch.setattr(compute, "cpu_vendor", lambda: vendor)
    monkeypatch.setenv(compute.CONV3X3_ENV, "xla")  # counts the kernel-gradient path's convs alone
    if setting is None:
        monkeypatch.delenv(compute.CONV_KERNEL_GRAD_ENV, raising=False)
    else:
        monkeypatch.setenv(compute.CONV_KERNEL_GRAD_ENV, setting)
    assert layers.kernel_grad_as_dots(*wide) == dots
    assert _lowered_convs(layers.conv_same, *wide) == (1 if dots else 2)


def test_a_bad_kernel_gradient_setting_names_the_variable_and_the_choices(monkeypatch):
    monkeypatch.setenv(compute.CONV_KERNEL_GRAD_ENV, "matmul")
    with pytest.raises(ValueError, match=r"DCAE_JAX_CONV_KERNEL_GRAD='matmul': use one of auto, dots, xla"):
        layers.kernel_grad_as_dots((1, 64, 64, 256), (3, 3, 256, 256))


@pytest.mark.parametrize("shape", [(2, 9, 11, 5, 6), (1, 1, 1, 3, 4), (1, 8, 12, 7, 3), (3, 2, 5, 4, 2)])
def test_winograd_conv_equals_torch(shape):
    """F(2x2, 3x3) on odd and even sizes, a 1x1 image and batches: torch's conv to float32 rounding, jitted."""
    b, h, w, c_in, c_out = shape
    rng = np.random.RandomState(3)
    x = rng.randn(b, h, w, c_in).astype(np.float32)
    k = (rng.randn(3, 3, c_in, c_out) / np.sqrt(9 * c_in)).astype(np.float32)
    out = jax.jit(layers.conv3x3_winograd)(jnp.asarray(x), jnp.asarray(k))
    ref = _nhwc(F.conv2d(_nchw(x), torch.from_numpy(k.transpose(3, 2, 0, 1).copy()), padding=1))
    assert out.shape == ref.shape
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=2e-6 * np.abs(ref).max())


@pytest.mark.parametrize("kernel_grad", ["xla", "dots"])
def test_winograd_conv_same_forward_and_gradients_equal_torch(kernel_grad, monkeypatch):
    """At a shape the rule sends to Winograd (256 -> 256 channels on 64x64 pixels): forward, input gradient and
    kernel gradient (both kernel-gradient paths) equal torch's, jitted, and no XLA conv is left but the kernel
    gradient's own on the "xla" path."""
    monkeypatch.setenv(compute.CONV_KERNEL_GRAD_ENV, kernel_grad)
    monkeypatch.delenv(compute.CONV3X3_ENV, raising=False)  # the default: Winograd
    rng = np.random.RandomState(4)
    x, g = rng.randn(1, 64, 64, 256).astype(np.float32), rng.randn(1, 64, 64, 256).astype(np.float32)
    w = (rng.randn(3, 3, 256, 256) / np.sqrt(9 * 256)).astype(np.float32)
    assert layers.winograd_fits(x.shape, w.shape, jnp.float32)
    y, vjp = jax.jit(lambda x, w: jax.vjp(layers.conv_same, x, w))(jnp.asarray(x), jnp.asarray(w))
    dx, dw = jax.jit(vjp)(jnp.asarray(g))
    # The reference runs in float64: torch's own float32 conv is itself up to 1.9e-6 of the max off the exact
    # result on an AVX2 EPYC (ours 6.7e-7 there), so a float32 reference would leave no room for our rounding.
    xt = _nchw(x).double().requires_grad_()
    wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).double().requires_grad_()
    yt = F.conv2d(xt, wt, padding=1)
    (yt * _nchw(g).double()).sum().backward()
    # The kernel gradient sums 4096 pixels' products in either path: float32 rounding is larger there.
    refs = ((y, _nhwc(yt), 2e-6), (dx, _nhwc(xt.grad), 2e-6), (dw, wt.grad.numpy().transpose(2, 3, 1, 0), 2e-5))
    for got, ref, tol in refs:
        np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=tol * np.abs(ref).max())
    forward = jax.jit(layers.conv_same).lower(jnp.asarray(x), jnp.asarray(w)).as_text()
    assert forward.count("stablehlo.convolution") == 0
    assert _lowered_convs(layers.conv_same, x.shape, w.shape) == (1 if kernel_grad == "xla" else 0)


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "dtype", "winograd"),
    [
        ((1, 64, 64, 256), (3, 3, 256, 256), jnp.float32, True),  # released models' ResBlock stages: 1.35-1.7x faster
        ((2, 256, 256, 512), (3, 3, 512, 512), jnp.float32, True),
        ((1, 64, 64, 256), (3, 3, 256, 256), jnp.bfloat16, False),  # bf16: the transforms would round in bf16
        ((1, 32, 32, 1024), (3, 3, 1024, 1024), jnp.float32, False),  # few pixels: the kernel transform dominates
        ((1, 256, 256, 128), (3, 3, 128, 128), jnp.float32, False),  # 128 channels: XLA's conv is faster
        ((1, 256, 256, 256), (3, 3, 256, 12), jnp.float32, False),  # a head conv
        ((1, 256, 256, 3), (3, 3, 3, 256), jnp.float32, False),  # a stem conv
        ((1, 64, 64, 256), (5, 5, 256, 256), jnp.float32, False),  # F(2x2, 3x3) is for 3x3 kernels only
    ],
)
def test_winograd_follows_the_measured_rule(x_shape, w_shape, dtype, winograd, monkeypatch):
    monkeypatch.delenv(compute.CONV3X3_ENV, raising=False)
    assert layers.winograd_fits(x_shape, w_shape, dtype) == winograd
    forward = jax.jit(layers.conv_same).lower(
        jax.ShapeDtypeStruct(x_shape, dtype), jax.ShapeDtypeStruct(w_shape, dtype)
    )
    assert forward.as_text().count("stablehlo.convolution") == (0 if winograd else 1)
    monkeypatch.setenv(compute.CONV3X3_ENV, "xla")
    assert not layers.winograd_fits(x_shape, w_shape, dtype)


def test_a_bad_conv3x3_setting_names_the_variable_and_the_choices(monkeypatch):
    monkeypatch.setenv(compute.CONV3X3_ENV, "fft")
    with pytest.raises(ValueError, match=r"DCAE_JAX_CONV3X3='fft': use one of winograd, xla"):
        layers.winograd_fits((1, 64, 64, 256), (3, 3, 256, 256), jnp.float32)


def test_the_processor_vendor_is_read_from_cpuinfo():
    vendor = compute.cpu_vendor()
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        assert vendor == ""
    else:
        assert (vendor and f": {vendor}" in text) or ("vendor_id" not in text and vendor == "")


@pytest.mark.parametrize("k", [3, 5])
def test_depthwise_and_grouped_pointwise_match_torch(k):
    rng = np.random.RandomState(2)
    x = rng.randn(2, 9, 7, 12).astype(np.float32)
    wd = rng.randn(12, 1, k, k).astype(np.float32)
    ref = F.conv2d(_nchw(x), torch.from_numpy(wd), padding=k // 2, groups=12)
    out = jax.jit(layers.depthwise_conv)(jnp.asarray(x), jnp.asarray(wd.transpose(2, 3, 1, 0)))
    np.testing.assert_allclose(out, _nhwc(ref), rtol=1e-5, atol=1e-5)
    wg = rng.randn(12, 4, 1, 1).astype(np.float32)  # 3 groups of 4
    ref = F.conv2d(_nchw(x), torch.from_numpy(wg), groups=3)
    out = layers.GroupedPointwiseConv2d(3).apply({"params": {"kernel": wg.transpose(2, 3, 1, 0)}}, jnp.asarray(x))
    np.testing.assert_allclose(out, _nhwc(ref), rtol=1e-5, atol=1e-5)


def test_batchnorm_train_and_eval_match_torch(x):
    bn_t = torch.nn.BatchNorm2d(16)
    with torch.no_grad():
        bn_t.weight.normal_()
        bn_t.bias.normal_()
    bn = layers.BatchNorm()
    variables = bn.init(jax.random.key(0), jnp.asarray(x))
    variables = {
        "params": {"scale": jnp.asarray(bn_t.weight.detach().numpy()), "bias": jnp.asarray(bn_t.bias.detach().numpy())},
        "batch_stats": variables["batch_stats"],
    }
    y, updates = bn.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    bn_t.train()
    y_t = bn_t(_nchw(x))
    np.testing.assert_allclose(y, _nhwc(y_t), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], bn_t.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(updates["batch_stats"]["var"], bn_t.running_var.numpy(), rtol=1e-5, atol=1e-6)
    bn_t.eval()
    y_eval = bn.apply({**variables, "batch_stats": updates["batch_stats"]}, jnp.asarray(x))
    np.testing.assert_allclose(y_eval, _nhwc(bn_t(_nchw(x))), rtol=1e-5, atol=1e-5)


def test_rmsnorm_has_bias_and_computes_in_float32():
    x = jnp.asarray(np.random.RandomState(3).randn(2, 4, 4, 8) * 100, jnp.bfloat16)
    norm = layers.RMSNorm()
    v = norm.init(jax.random.key(0), x)
    assert set(v["params"]) == {"scale", "bias"}
    y = norm.apply(v, x)
    assert y.dtype == jnp.bfloat16
    x32 = x.astype(jnp.float32)
    ref = x32 / jnp.sqrt(jnp.mean(x32**2, -1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y.astype(jnp.float32), ref, rtol=1e-2, atol=1e-2)


def test_linear_and_quadratic_attention_agree_under_jit_and_eagerly():
    rng = np.random.RandomState(4)
    q, k, v = (jnp.asarray(np.maximum(rng.randn(2, 30, 3, 8), 0), jnp.float32) for _ in range(3))
    lin = layers.relu_linear_attention(q, k, v, 1e-15)
    quad = layers.relu_quadratic_attention(q, k, v, 1e-15)
    lin_jit = jax.jit(layers.relu_linear_attention, static_argnums=3)(q, k, v, 1e-15)
    np.testing.assert_allclose(lin, quad, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lin_jit, lin, rtol=1e-5, atol=1e-6)
    # Direct definition: out_n = sum_m v_m (k_m . q_n) / sum_m (k_m . q_n).
    a = jnp.einsum("bmgd,bngd->bgnm", k, q)
    ref = jnp.einsum("bgnm,bmgd->bngd", a, v) / (a.sum(-1).transpose(0, 2, 1)[..., None] + 1e-15)
    np.testing.assert_allclose(lin_jit, ref, rtol=1e-5, atol=1e-6)


def test_registries_name_the_valid_choices():
    with pytest.raises(ValueError, match="ResBlock"):
        layers.get_block("ResNetBlock")
    with pytest.raises(ValueError, match="rms_norm"):
        layers.get_norm("layer_norm")
    with pytest.raises(ValueError, match="silu"):
        layers.get_activation("swish")


def _blocks_constant(y):
    return all(np.allclose(y[:, 0::2, 0::2], y[:, i::2, j::2]) for i in (0, 1) for j in (0, 1))


def test_icnr_up_block_starts_as_nearest_upsampling():
    x = jax.random.normal(jax.random.key(0), (2, 5, 6, 16))
    m = layers.UpBlock(8, shortcut=False)
    y = np.asarray(m.apply(m.init(jax.random.key(1), x), x))
    assert y.shape == (2, 10, 12, 8) and _blocks_constant(y) and y.std() > 0
