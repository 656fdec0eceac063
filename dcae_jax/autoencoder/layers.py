"""DC-AE building blocks as Flax linen modules, NHWC.

Every module reproduces the PyTorch reference (efficientvit `dc_ae.py`, diffusers `AutoencoderDC`)
numerically: symmetric ``k // 2`` padding (also for stride-2 convs), RMSNorm with scale *and* bias,
torch-semantics BatchNorm, head-major LiteMLA channel layout. Parameter layouts follow Flax
conventions (conv kernels HWIO, depthwise kernels ``(k, k, 1, C)``) so converted checkpoints are
plain transposes of the torch tensors.

`dtype` is the computation dtype (bf16 for fast inference/training); parameters stay in
`param_dtype`. Norm statistics and linear attention always run in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dcae_jax.runtime import compute

Array = jax.Array
Dtype = Any

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "silu": nn.silu,
    "relu": nn.relu,
    "relu6": nn.relu6,
    "gelu": lambda x: nn.gelu(x, approximate=True),
    "identity": lambda x: x,
}


def get_activation(name: str) -> Callable[[Array], Array]:
    """Looks up an activation by name; raises with the valid names."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid names: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# ----------------------------------------------------------------------------------------------
# Parameter-free space/channel rearrangements (torch channel order, NHWC layout).


def pixel_unshuffle(x: Array, factor: int) -> Array:
    """(B, H, W, C) -> (B, H/f, W/f, C*f*f); channel c*f*f + i*f + j as torch.pixel_unshuffle."""
    b, h, w, c = x.shape
    if h % factor or w % factor:
        raise ValueError(f"pixel_unshuffle needs H, W divisible by {factor}, got {(h, w)}")
    x = x.reshape(b, h // factor, factor, w // factor, factor, c)
    x = x.transpose(0, 1, 3, 5, 2, 4)  # (B, H/f, W/f, C, f_i, f_j)
    return x.reshape(b, h // factor, w // factor, c * factor * factor)


def pixel_shuffle(x: Array, factor: int) -> Array:
    """(B, H, W, C*f*f) -> (B, H*f, W*f, C); inverse of `pixel_unshuffle`."""
    b, h, w, c = x.shape
    out_c = c // (factor * factor)
    x = x.reshape(b, h, w, out_c, factor, factor)
    x = x.transpose(0, 1, 4, 2, 5, 3)  # (B, H, f_i, W, f_j, C)
    return x.reshape(b, h * factor, w * factor, out_c)


def channel_average(x: Array, out_channels: int) -> Array:
    """Mean over consecutive channel groups: out channel o = mean(x[..., o*G:(o+1)*G])."""
    *lead, c = x.shape
    if c % out_channels:
        raise ValueError(f"cannot average {c} channels into {out_channels}")
    return x.reshape(*lead, out_channels, c // out_channels).mean(-1)


def channel_duplicate(x: Array, out_channels: int) -> Array:
    """Repeats each channel consecutively (c0, c0, c1, c1, ...) as torch.repeat_interleave."""
    c = x.shape[-1]
    if out_channels % c:
        raise ValueError(f"cannot duplicate {c} channels into {out_channels}")
    return jnp.repeat(x, out_channels // c, axis=-1)


def space_to_channel_average(x: Array, out_channels: int, factor: int = 2) -> Array:
    """The encoder's residual shortcut: pixel-unshuffle then channel averaging."""
    return channel_average(pixel_unshuffle(x, factor), out_channels)


def channel_duplicate_to_space(x: Array, out_channels: int, factor: int = 2) -> Array:
    """The decoder's residual shortcut: channel duplicating then pixel-shuffle."""
    return pixel_shuffle(channel_duplicate(x, out_channels * factor * factor), factor)


def upsample_nearest2x(x: Array) -> Array:
    """torch `F.interpolate(scale_factor=2, mode='nearest')` == repeat by 2 along H and W."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


# ----------------------------------------------------------------------------------------------
# Convolutions and norms.


def icnr(init: Callable | None = None, factor: int = 2) -> Callable:
    """ICNR (Aitken et al. 2017) for a conv feeding `pixel_shuffle(factor)`: the factor**2 sub-pixel channels
    of every output channel start with identical kernels, so conv + pixel-shuffle starts as conv + nearest
    upsampling (no checkerboard at initialisation). Same per-weight variance as `init` (default lecun-normal)."""
    init = init or nn.initializers.lecun_normal()

    def init_fn(key, shape, dtype=jnp.float32):
        *lead, out = shape
        r = factor * factor
        if out % r:
            raise ValueError(f"icnr: {out} output channels are not a multiple of {r}")
        return jnp.repeat(init(key, (*lead, out // r), dtype), r, axis=-1)  # channel c*r + s: sub-pixel s of c

    return init_fn


def _conv(x: Array, kernel: Array, stride: int = 1) -> Array:
    pad = kernel.shape[0] // 2
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _winograd_in(x: Array, axis: int, n: int) -> list[Array]:
    """B^T of Winograd F(2x2, 3x3) along `axis` (Lavin & Gray 2016): the padded axis (2n + 2 long) in pairs, tile i
    = pairs i and i + 1 (d0..d3), transformed with adds only (B^T's entries are 0 and +-1): 4 arrays, n long."""
    pairs = x.reshape(*x.shape[:axis], n + 1, 2, *x.shape[axis + 1 :])
    even, odd = (jax.lax.index_in_dim(pairs, j, axis + 1, keepdims=False) for j in (0, 1))
    d0, d1 = (jax.lax.slice_in_dim(a, 0, n, axis=axis) for a in (even, odd))
    d2, d3 = (jax.lax.slice_in_dim(a, 1, n + 1, axis=axis) for a in (even, odd))
    return [d0 - d2, d1 + d2, d2 - d1, d1 - d3]


def _winograd_out(m0: Array, m1: Array, m2: Array, m3: Array) -> list[Array]:
    """A^T of Winograd F(2x2, 3x3) along one tile axis: 4 transformed values -> the 2 outputs."""
    return [m0 + m1 + m2, m1 - m2 - m3]


def conv3x3_winograd(x: Array, kernel: Array) -> Array:
    """Stride-1 3x3 conv with 'same' padding as Winograd F(2x2, 3x3): each 2x2 output tile from 16 products of
    transformed 4x4 input tiles with the transformed kernel, i.e. 16 matmuls of C_in x C_out over the tiles
    instead of 36 per 2x2 outputs (2.25x fewer multiplies; the transforms are adds and halvings, so the result
    agrees with the direct conv to float32 rounding). x: (B, H, W, C_in), kernel: (3, 3, C_in, C_out)."""
    b, h, w, _ = x.shape
    n_rows, n_cols = -(-h // 2), -(-w // 2)
    xp = jnp.pad(x, ((0, 0), (1, 2 * n_rows + 1 - h), (1, 2 * n_cols + 1 - w), (0, 0)))
    g = jnp.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]], kernel.dtype)
    u = jnp.einsum("ik,jl,klco->ijco", g, g, kernel)  # G g G^T per channel pair
    tiles = [v for r in _winograd_in(xp, 1, n_rows) for v in _winograd_in(r, 2, n_cols)]  # tile (i, j): 4 i + j
    m = [jnp.einsum("brcx,xo->brco", v, u[s // 4, s % 4]) for s, v in enumerate(tiles)]
    cols = [_winograd_out(*m[4 * i : 4 * i + 4]) for i in range(4)]  # cols[i][q]: output column q of tile row i
    y = [[_winograd_out(*(cols[i][q] for i in range(4)))[p] for q in range(2)] for p in range(2)]
    y = jnp.stack([jnp.stack(row, axis=3) for row in y], axis=2)  # (B, n_rows, 2, n_cols, 2, C_out)
    return y.reshape(b, 2 * n_rows, 2 * n_cols, -1)[:, :h, :w]


def conv_kernel_grad_dots(x: Array, g: Array, k: int) -> Array:
    """(B, H, W, C_in), (B, H, W, C_out) -> (k, k, C_in, C_out): the kernel gradient of a stride-1 'same' conv
    as k*k matmuls, equal to the conv's own (`jax.vjp`) kernel gradient: dk[i, j] = x^T @ g_ij over the pixels,
    where g_ij is g shifted by (p - i, p - j) (p = k // 2) with zeros shifted in. The shifted copies are of g, not
    of x, so XLA can only build them in the backward pass, when g exists (copies of x, which exists from the
    forward pass on, were scheduled early and all kept: +650 MiB per 256² x 256 layer)."""
    p = k // 2
    b, h, w, c = x.shape
    gp = jnp.pad(g, ((0, 0), (p, p), (p, p), (0, 0)))
    xf = x.reshape(b * h * w, c)

    def tap(i: int, j: int) -> Array:
        return xf.T @ gp[:, 2 * p - i : 2 * p - i + h, 2 * p - j : 2 * p - j + w, :].reshape(b * h * w, -1)

    return jnp.stack([jnp.stack([tap(i, j) for j in range(k)]) for i in range(k)])


def kernel_grad_as_dots(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...]) -> bool:
    """Whether `conv_same` computes this kernel gradient as matmuls (`conv_kernel_grad_dots`) on the CPU: when
    `compute.conv_kernel_grad()` says "dots" (by default on x86 CPUs), for kernels with at least 64 input
    channels. Measured on XLA:CPU (jax 0.10.2, AMD EPYC Zen 3, docs/performance.md): XLA's own weight-gradient
    conv is 1.2-5.4x slower than the matmuls there (3.6x for a decoder head's 128 -> 3), and 1.0-3.5x faster
    with 3-32 input channels (a 3 -> 128 input conv, the quickstart's 16- and 32-channel stages)."""
    if compute.conv_kernel_grad() == "xla":
        return False
    return kernel_shape[2] >= 64


def winograd_fits(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], dtype) -> bool:
    """Whether `conv_same` runs this stride-1 conv as `conv3x3_winograd` on the CPU: when `compute.conv3x3()` says
    "winograd" (the default), for float32 3x3 kernels of at least 256 -> 256 channels on at least 64² pixels.
    Measured on XLA:CPU (jax 0.10.2, AMD EPYC Zen 4, `python -m bench.conv`, docs/performance.md): 1.35-1.7x
    faster than XLA's conv there, and slower on fewer pixels (the kernel transform and small matmuls dominate) or
    narrower kernels."""
    if compute.conv3x3() != "winograd" or jnp.dtype(dtype) != jnp.float32 or kernel_shape[:2] != (3, 3):
        return False
    return min(kernel_shape[2:]) >= 256 and x_shape[1] * x_shape[2] >= 64 * 64


def _conv_same_forward(x: Array, kernel: Array) -> Array:
    if not winograd_fits(x.shape, kernel.shape, x.dtype):
        return _conv(x, kernel)
    return jax.lax.platform_dependent(x, kernel, cpu=conv3x3_winograd, default=_conv)


@jax.custom_vjp
def conv_same(x: Array, kernel: Array) -> Array:
    """Stride-1 conv with torch's 'same' padding (k // 2), NHWC x HWIO. On the CPU, wide float32 3x3 convs and
    their input gradients run as Winograd F(2x2, 3x3) (`winograd_fits`), and kernels with 64+ inputs get their
    kernel gradient as matmuls (`conv_kernel_grad_dots`, chosen by `kernel_grad_as_dots`); everything else, and every
    other platform, runs XLA's conv and its own transposes."""
    return _conv_same_forward(x, kernel)


def _conv_same_fwd(x: Array, kernel: Array):
    return _conv_same_forward(x, kernel), (x, kernel)


def _conv_same_bwd(res, g):
    x, kernel = res
    # The input gradient is the same 'same' conv of g with the kernel flipped in space and in/out swapped.
    dx = _conv_same_forward(g, jnp.flip(kernel, (0, 1)).swapaxes(2, 3))

    def transpose(x, g):
        return jax.vjp(lambda k_: _conv(x, k_), kernel)[1](g)[0]

    if not kernel_grad_as_dots(x.shape, kernel.shape):
        return dx, transpose(x, g)
    dk = jax.lax.platform_dependent(
        x,
        g,
        cpu=lambda x, g: conv_kernel_grad_dots(x, g, kernel.shape[0]).astype(kernel.dtype),
        default=transpose,
    )
    return dx, dk


conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)


class Conv2d(nn.Module):
    """Dense conv with torch padding (`k // 2` on every side, stride-2 included).

    1x1 convs run as a matmul (faster than `conv_general_dilated` on XLA:CPU, identical math).
    Kernel layout (kh, kw, in, out).
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k = self.kernel_size
        in_features = x.shape[-1]
        kernel = self.param(
            "kernel",
            self.kernel_init,
            (k, k, in_features, self.features),
            self.param_dtype,
        )
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        if k == 1 and self.stride == 1:
            y = jnp.einsum("bhwi,io->bhwo", x, kernel[0, 0])
        elif self.stride == 1:
            y = conv_same(x, kernel)
        else:
            y = _conv(x, kernel, self.stride)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def depthwise_conv(x: Array, kernel: Array) -> Array:
    """Depthwise conv, stride 1, torch padding, as k*k shifted multiply-adds.

    XLA:CPU runs `feature_group_count=C` convs ~10x slower than torch; the shifted form fuses into
    one elementwise loop and is fast on every backend.  x: (B, H, W, C); kernel: (k, k, 1, C).
    """
    k = kernel.shape[0]
    pad = k // 2
    _, h, w, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = None
    for i in range(k):
        for j in range(k):
            term = xp[:, i : i + h, j : j + w, :] * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


class DepthwiseConv2d(nn.Module):
    """Depthwise (groups = channels) conv with torch padding; kernel (k, k, 1, C)."""

    kernel_size: int = 3
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, c), self.param_dtype)
        y = depthwise_conv(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class GroupedPointwiseConv2d(nn.Module):
    """1x1 conv with `groups` equal groups, as a batched matmul; kernel (1, 1, C/groups, C)."""

    groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        gs = c // self.groups
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (1, 1, gs, c), self.param_dtype)
        # Output channel o belongs to group o // gs (torch grouped-conv order).
        w_g = kernel[0, 0].reshape(gs, self.groups, gs).transpose(1, 0, 2)  # (G, in, out)
        xg = x.astype(self.dtype).reshape(b, h, w, self.groups, gs)
        y = jnp.einsum("bhwgi,gio->bhwgo", xg, w_g.astype(self.dtype))
        return y.reshape(b, h, w, c)


class RMSNorm(nn.Module):
    """RMSNorm over channels with scale and bias, computed in float32 (trms2d / diffusers RMSNorm)."""

    epsilon: float = 1e-5
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        del train  # no state
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(x.dtype)


class BatchNorm(nn.Module):
    """BatchNorm2d with torch semantics: eps 1e-5, momentum 0.1, unbiased running variance.

    Under `jax.jit` with a batch-sharded input, the batch mean is already global over the
    data-parallel axis (GSPMD inserts the all-reduce), i.e. SyncBatchNorm.
    """

    epsilon: float = 1e-5
    momentum: float = 0.1  # torch convention: running = (1 - m) * running + m * batch
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        x32 = x.astype(jnp.float32)
        if train:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x32, axis=axes)
            var = jnp.mean(jnp.square(x32 - mean), axis=axes)
            if not self.is_initializing():
                n = x32.size // c
                unbiased = var * (n / max(n - 1, 1))
                ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
                ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
        else:
            mean, var = ra_mean.value, ra_var.value
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(x.dtype)


NORMS: dict[str, type[nn.Module]] = {"rms_norm": RMSNorm, "batch_norm": BatchNorm}


def get_norm(name: str) -> type[nn.Module]:
    """Looks up a norm class by name; raises with the valid names."""
    if name not in NORMS:
        raise ValueError(f"unknown norm {name!r}; valid names: {sorted(NORMS)}")
    return NORMS[name]


# ----------------------------------------------------------------------------------------------
# Blocks.


class ResBlock(nn.Module):
    """x + norm(conv3x3_nobias(act(conv3x3(x))))."""

    norm: str = "rms_norm"
    act: str = "silu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        c = x.shape[-1]
        conv = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = Conv2d(c, 3, name="conv1", **conv)(x)
        h = get_activation(self.act)(h)
        h = Conv2d(c, 3, use_bias=False, name="conv2", **conv)(h)
        h = get_norm(self.norm)(param_dtype=self.param_dtype, name="norm")(h, train=train)
        return x + h


def relu_linear_attention(q: Array, k: Array, v: Array, eps: float) -> Array:
    """out_n = sum_m v_m (k_m . q_n) / (sum_m k_m . q_n + eps); O(N d^2).  q, k, v: (B, N, G, d)."""
    vk = jnp.einsum("bmgd,bmge->bgde", v, k)  # (B, G, d_v, d_k)
    num = jnp.einsum("bgde,bnge->bngd", vk, q)  # (B, N, G, d_v)
    # Written as (sum_m k_m) . q_n: an all-ones broadcast form of this is miscompiled by XLA:CPU.
    den = jnp.einsum("bge,bnge->bng", k.sum(axis=1), q)  # (B, N, G)
    return num / (den[..., None] + eps)


def relu_quadratic_attention(q: Array, k: Array, v: Array, eps: float) -> Array:
    """Same result as `relu_linear_attention` via the (N, N) score matrix; used when N <= d."""
    scores = jnp.einsum("bmgd,bngd->bgmn", k, q)  # (B, G, keys, queries)
    scores = scores / (jnp.sum(scores, axis=2, keepdims=True) + eps)
    return jnp.einsum("bmgd,bgmn->bngd", v, scores)


class LiteMLA(nn.Module):
    """EfficientViT ReLU linear attention with optional multi-scale (e.g. 5x5) qkv aggregation.

    Channel layout is head-major as in the reference: the fused qkv (3C channels, plus 3C per
    scale) is split into groups of 3*head_dim channels, each [q | k | v].
    """

    head_dim: int = 32
    scales: tuple[int, ...] = ()
    eps: float = 1e-15
    norm: str = "rms_norm"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        b, h, w, c = x.shape
        d = self.head_dim
        heads = c // d
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = Conv2d(3 * c, 1, use_bias=False, name="qkv", **kw)(x)  # (B, H, W, 3C)
        branches = [qkv]
        for i, s in enumerate(self.scales):
            agg = DepthwiseConv2d(s, use_bias=False, name=f"aggreg_{i}_dw", **kw)(qkv)
            agg = GroupedPointwiseConv2d(3 * heads, name=f"aggreg_{i}_pw", **kw)(agg)
            branches.append(agg)
        t = jnp.concatenate(branches, axis=-1) if len(branches) > 1 else qkv
        groups = t.shape[-1] // (3 * d)
        t = t.astype(jnp.float32).reshape(b, h * w, groups, 3 * d)  # (B, N, G, 3d)
        q, k, v = t[..., :d], t[..., d : 2 * d], t[..., 2 * d :]
        q, k = nn.relu(q), nn.relu(k)
        if h * w > d:
            out = relu_linear_attention(q, k, v, self.eps)
        else:
            out = relu_quadratic_attention(q, k, v, self.eps)
        out = out.reshape(b, h, w, groups * d).astype(self.dtype)
        out = Conv2d(c, 1, use_bias=False, name="proj", **kw)(out)
        out = get_norm(self.norm)(param_dtype=self.param_dtype, name="norm")(out, train=train)
        return x + out


class GLUMBConv(nn.Module):
    """x + norm(pw(a * act(g))), with [a | g] = dw3x3(act(pw_expand(x)))."""

    expand_ratio: int = 4
    act: str = "silu"
    norm: str = "rms_norm"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        c = x.shape[-1]
        mid = c * self.expand_ratio
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        act = get_activation(self.act)
        h = act(Conv2d(2 * mid, 1, name="inverted_conv", **kw)(x))  # (B, H, W, 2*mid)
        h = DepthwiseConv2d(3, name="depth_conv", **kw)(h)
        a, g = jnp.split(h, 2, axis=-1)
        h = a * act(g)
        h = Conv2d(c, 1, use_bias=False, name="point_conv", **kw)(h)
        h = get_norm(self.norm)(param_dtype=self.param_dtype, name="norm")(h, train=train)
        return x + h


class EfficientViTBlock(nn.Module):
    """LiteMLA (global context) then GLUMBConv (local), each residual."""

    norm: str = "rms_norm"
    act: str = "silu"
    head_dim: int = 32
    scales: tuple[int, ...] = ()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = LiteMLA(self.head_dim, self.scales, norm=self.norm, name="attn", **kw)(x, train)
        return GLUMBConv(act=self.act, norm=self.norm, name="mlp", **kw)(x, train)


class DownBlock(nn.Module):
    """2x downsampling: conv (+ pixel-unshuffle) or stride-2 conv, plus the averaging shortcut.

    `pixel_unshuffle=True`: conv3x3 to out/4 channels then pixel-unshuffle (the -in/-mix models);
    otherwise a stride-2 conv3x3 (SANA). `shortcut` adds space-to-channel + channel averaging.
    """

    features: int
    pixel_unshuffle: bool = True
    shortcut: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.pixel_unshuffle:
            y = pixel_unshuffle(Conv2d(self.features // 4, 3, name="conv", **kw)(x), 2)
        else:
            y = Conv2d(self.features, 3, stride=2, name="conv", **kw)(x)
        if self.shortcut:
            y = y + space_to_channel_average(x, self.features).astype(y.dtype)
        return y


class UpBlock(nn.Module):
    """2x upsampling: conv + pixel-shuffle or nearest-interpolate + conv, plus the duplicating shortcut."""

    features: int
    interpolate: bool = False
    shortcut: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.interpolate:
            y = Conv2d(self.features, 3, name="conv", **kw)(upsample_nearest2x(x))
        else:
            y = pixel_shuffle(Conv2d(self.features * 4, 3, name="conv", kernel_init=icnr(factor=2), **kw)(x), 2)
        if self.shortcut:
            y = y + channel_duplicate_to_space(x, self.features).astype(y.dtype)
        return y


BLOCKS: dict[str, type[nn.Module]] = {"ResBlock": ResBlock, "EfficientViTBlock": EfficientViTBlock}


def get_block(name: str) -> type[nn.Module]:
    """Looks up a block class by (diffusers) name; raises with the valid names."""
    if name not in BLOCKS:
        raise ValueError(f"unknown block type {name!r}; valid names: {sorted(BLOCKS)}")
    return BLOCKS[name]


def make_block(
    block_type: str, *, norm: str, act: str, head_dim: int, scales: Sequence[int], remat: str = "none", **kw: Any
) -> nn.Module:
    """Builds a stage block; ResBlocks ignore the attention arguments. `remat`: a `compute.REMAT_POLICIES` name
    (the block's activations recomputed in the backward pass; parameter names unchanged)."""
    base = get_block(block_type)
    cls = compute.remat(base, remat, static_argnums=(2,))  # (self, x, train): train is a Python bool
    if base is EfficientViTBlock:
        return cls(norm=norm, act=act, head_dim=head_dim, scales=tuple(scales), **kw)
    return cls(norm=norm, act=act, **kw)
