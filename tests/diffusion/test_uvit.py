"""UViT against an independent float64 NumPy forward pass, the reference's parameter counts, and its train-time behaviour."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dcae_jax.diffusion import uvit
from dcae_jax.diffusion.uvit import PRESETS, UViT, UViTConfig, count_params, get_uvit_config, init_uvit_params

_erf = np.vectorize(math.erf)


def _tiny(patch_size: int = 1, depth: int = 4, input_size: int = 8, **kw) -> UViTConfig:
    return get_uvit_config("uvit-tiny", in_channels=4, input_size=input_size, patch_size=patch_size, depth=depth, **kw)


def _random_params(cfg: UViTConfig, seed: int = 0, embed_scale: float = 1.0) -> dict:
    """Random params of the right structure (no init compile), nonzero biases and non-unit LayerNorm
    scales so that no term can hide. A small `embed_scale` shrinks the input tokens so the first
    LayerNorms' eps matters."""
    shapes = jax.eval_shape(functools.partial(init_uvit_params, cfg), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        names = [k.key for k in path]
        offset = 1.0 if names[-1] == "scale" else 0.0
        scale = embed_scale if names[0] in ("patch_embed", "pos_embed", "label_emb") else 1.0
        return jnp.asarray(offset + 0.1 * scale * rng.standard_normal(s.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def _inputs(cfg: UViTConfig, batch: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, cfg.input_size, cfg.input_size, cfg.in_channels)).astype(np.float32)
    t = np.array([0.0, 0.37, 9.5, 1.0][:batch], np.float32)  # small t: the f32 sinusoid argument stays exact
    y = np.array([3, cfg.null_class, 0, 999][:batch], np.int32)
    return x, t, y


# ----------------------------------------------------------------------------------------------
# Independent float64 reference (torch semantics written out, NCHW-free but with explicit index maps).


def _np_layer_norm(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def _np_linear(x, p):
    return x @ p["kernel"] + p["bias"] if "bias" in p else x @ p["kernel"]


def _np_block(x, p, num_heads, skip=None):
    if skip is not None:
        x = _np_linear(np.concatenate([x, skip], -1), p["skip_linear"])
    b, n, d = x.shape
    hd = d // num_heads
    qkv = _np_linear(_np_layer_norm(x, p["norm1"]), p["attn"]["qkv"]).reshape(b, n, 3, num_heads, hd)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # (B, H, N, hd)
    logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    o = (attn @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
    x = x + _np_linear(o, p["attn"]["proj"])
    h = _np_linear(_np_layer_norm(x, p["norm2"]), p["mlp"]["fc1"])
    h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
    return x + _np_linear(h, p["mlp"]["fc2"])


def np_uvit(params, cfg: UViTConfig, x, t, y, *, fifo_skips: bool = False):
    params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
    b, size, _, c = x.shape
    p, d, g = cfg.patch_size, cfg.hidden_size, size // cfg.patch_size
    # Conv2d(kernel = stride = p): out[i, j] = sum_{a, e, ch} x[i*p + a, j*p + e, ch] * K[a, e, ch].
    k = params["patch_embed"]["proj"]["kernel"]
    conv = np.einsum("biajec,aecd->bijd", x.reshape(b, g, p, g, p, c), k) + params["patch_embed"]["proj"]["bias"]
    patches = conv.reshape(b, g * g, d)  # raster order
    half = d // 2
    freqs = np.exp(-math.log(10000.0) * np.arange(half) / half)
    args = np.asarray(t, np.float64)[:, None] * freqs[None]
    time_tok = np.concatenate([np.cos(args), np.sin(args)], -1)[:, None]
    label_tok = params["label_emb"]["embedding_table"]["embedding"][np.asarray(y)][:, None]
    h = np.concatenate([label_tok, time_tok, patches], 1) + params["pos_embed"]
    skips = []
    for i in range(cfg.depth // 2):
        h = _np_block(h, params[f"in_blocks_{i}"], cfg.num_heads)
        skips.append(h)
    h = _np_block(h, params["mid_block"], cfg.num_heads)
    for i in range(cfg.depth // 2):
        skip = skips.pop(0) if fifo_skips else skips.pop()
        h = _np_block(h, params[f"out_blocks_{i}"], cfg.num_heads, skip=skip)
    tok = _np_linear(_np_layer_norm(h, params["norm"]), params["decoder_pred"])[:, 2:]  # (B, g*g, p*p*C)
    tok = tok.reshape(b, g, g, p, p, c)  # "(h w) (p1 p2 C)"
    out = np.empty_like(x)
    for a in range(p):
        for e in range(p):
            out[:, a::p, e::p, :] = tok[:, :, :, a, e, :]
    return out


def _rel_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@jax.jit(static_argnums=0)
def _apply(model, params, x, t, y):
    return model.apply({"params": params}, x, t, y)


# ----------------------------------------------------------------------------------------------


def _closed_form(cfg: UViTConfig) -> int:
    """diffusion.md §2.5."""
    d, c, p = cfg.hidden_size, cfg.in_channels, cfg.patch_size
    blocks = 2 * (cfg.depth // 2) + 1
    return (
        blocks * (12 * d * d + 10 * d)
        + (cfg.depth // 2) * (2 * d * d + d)
        + (cfg.num_classes + 1) * d
        + 2 * d
        + cfg.seq_len * d
        + (c * p * p * d + d)
        + (d * c * p * p + c * p * p)
    )


@pytest.mark.parametrize(("name", "millions"), [("uvit-s", 44.79), ("uvit-h", 500.87), ("uvit-2b", 1580.40)])
@pytest.mark.parametrize(("channels", "size"), [(32, 16), (128, 8)])
def test_param_counts_match_reference(name, millions, channels, size):
    cfg = get_uvit_config(name, in_channels=channels, input_size=size)
    n = count_params(cfg)
    assert round(n / 1e6, 2) == millions
    assert n == _closed_form(cfg)


def test_closed_form_holds_for_patch_2():
    cfg = _tiny(patch_size=2)
    assert count_params(cfg) == _closed_form(cfg)


@pytest.mark.parametrize(("patch_size", "embed_scale"), [(1, 1.0), (2, 1.0), (1, 0.01)])
def test_forward_matches_numpy_reference(patch_size, embed_scale):
    cfg = _tiny(patch_size)
    params = _random_params(cfg, embed_scale=embed_scale)
    x, t, y = _inputs(cfg)
    out = _apply(UViT(cfg), params, x, t, y)
    assert out.shape == x.shape and out.dtype == jnp.float32
    ref = np_uvit(params, cfg, x, t, y)
    assert _rel_err(out, ref) < 1e-5


def test_long_skips_are_lifo():
    cfg = _tiny(depth=6)
    params = _random_params(cfg, seed=3)
    x, t, y = _inputs(cfg, seed=3)
    out = _apply(UViT(cfg), params, x, t, y)
    assert _rel_err(out, np_uvit(params, cfg, x, t, y)) < 1e-5
    # The FIFO pairing is a clearly different function, so the check above discriminates.
    assert _rel_err(out, np_uvit(params, cfg, x, t, y, fifo_skips=True)) > 1e-2


def test_patch_embed_kernel_is_torch_conv_transposed():
    cfg = _tiny(patch_size=2)
    params = _random_params(cfg)
    x, _, _ = _inputs(cfg)
    proj = params["patch_embed"]["proj"]
    tokens = uvit.PatchEmbed(cfg.hidden_size, 2).apply({"params": {"proj": proj}}, x)
    w = torch.from_numpy(np.asarray(proj["kernel"]).transpose(3, 2, 0, 1).copy())  # (D, C, p, p)
    ref = F.conv2d(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), w, torch.from_numpy(np.array(proj["bias"])), 2)
    ref = ref.flatten(2).transpose(1, 2).numpy()  # (B, L, D), as the reference's PatchEmbed
    np.testing.assert_allclose(tokens, ref, rtol=1e-5, atol=1e-5)


def test_label_dropout_to_null_class():
    cfg = _tiny(input_size=2, depth=2)
    params = _random_params(cfg)
    assert params["label_emb"]["embedding_table"]["embedding"].shape == (cfg.num_classes + 1, cfg.hidden_size)
    model = UViT(cfg)
    n = 8192
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, 2, 2, 4)), jnp.float32)
    t = jnp.full((n,), 5.0)
    y = jnp.asarray(rng.integers(0, cfg.num_classes, n), jnp.int32)

    @functools.partial(jax.jit, static_argnums=2)
    def run(y, key, train):
        return model.apply({"params": params}, x, t, y, train=train, rngs={"label_dropout": key})

    key = jax.random.key(7)
    label_out, null_out = run(y, key, False), run(jnp.full_like(y, cfg.null_class), key, False)

    def dropped(out):
        d_label = jnp.abs(out - label_out).max((1, 2, 3))
        d_null = jnp.abs(out - null_out).max((1, 2, 3))
        assert bool(jnp.all(jnp.minimum(d_label, d_null) < 1e-4))  # every sample is one or the other
        return np.asarray(d_null < d_label)

    drop = dropped(run(y, key, True))
    assert abs(drop.mean() - cfg.class_dropout_prob) < 0.015  # 4.5 sigma at n = 8192
    np.testing.assert_array_equal(drop, dropped(run(y, key, True)))  # a fixed rng fixes the mask
    assert (drop != dropped(run(y, jax.random.key(8), True))).any()
    assert not dropped(label_out).any()
    # Without train, or with prob 0, no rng is needed and nothing is dropped.
    table = {"embedding_table": params["label_emb"]["embedding_table"]}
    for prob, train in [(0.1, False), (0.0, True)]:
        emb = uvit.LabelEmbedder(cfg.num_classes, cfg.hidden_size, prob).apply({"params": table}, y, train)
        np.testing.assert_array_equal(emb, table["embedding_table"]["embedding"][y])


def test_bf16_compute_close_to_f32_and_params_stay_f32():
    cfg = _tiny(patch_size=2)
    model = UViT(cfg, dtype=jnp.bfloat16)
    x, t, y = _inputs(cfg)
    shapes = jax.eval_shape(model.init, {"params": jax.random.key(0)}, x, t, y)["params"]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(shapes))
    params = _random_params(cfg)
    out = _apply(model, params, x, t, y)
    assert out.dtype == jnp.float32
    ref = _apply(UViT(cfg), params, x, t, y)
    err = _rel_err(out, np.asarray(ref, np.float64))
    assert 0 < err < 5e-2


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch", True])
def test_remat_same_outputs_and_gradients(policy):
    cfg = _tiny(patch_size=2, depth=2, input_size=4)
    params = _random_params(cfg)
    x, t, y = _inputs(cfg)

    def loss_and_grad(remat):
        model = UViT(cfg, remat=remat)
        loss = lambda p: jnp.sum(model.apply({"params": p}, x, t, y) ** 2)
        compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
        return compiled(params), compiled.cost_analysis()["flops"]

    ((l0, g0), flops0), ((l1, g1), flops1) = loss_and_grad("none"), loss_and_grad(policy)
    assert flops1 > flops0  # the backward pass recomputes
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    # Recomputation may fuse differently: compare each gradient leaf relative to its own scale.
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
        assert _rel_err(a, np.asarray(b, np.float64)) < 1e-5
    assert float(jnp.abs(g0["label_emb"]["embedding_table"]["embedding"]).sum()) > 0


def test_init_distributions():
    cfg = _tiny(patch_size=2, depth=2)
    params = jax.jit(init_uvit_params, static_argnums=0)(cfg, jax.random.key(0))  # eager init is slow on CPU
    fan_in = 4 * 2 * 2
    assert np.abs(params["patch_embed"]["proj"]["kernel"]).max() <= 1 / math.sqrt(fan_in)
    assert np.abs(params["patch_embed"]["proj"]["bias"]).max() <= 1 / math.sqrt(fan_in)
    assert np.std(params["patch_embed"]["proj"]["bias"]) > 0.5 / math.sqrt(3 * fan_in)  # torch: bias not zero
    assert np.std(params["label_emb"]["embedding_table"]["embedding"]) == pytest.approx(1.0, rel=0.05)
    assert np.std(params["pos_embed"]) == pytest.approx(0.02, rel=0.05)
    assert np.std(params["mid_block"]["mlp"]["fc1"]["kernel"]) == pytest.approx(0.02, rel=0.05)
    assert not np.any(params["mid_block"]["mlp"]["fc1"]["bias"])
    np.testing.assert_array_equal(params["norm"]["scale"], 1.0)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(KeyError, match="uvit-s") as err:
        get_uvit_config("uvit-xl", in_channels=32, input_size=16)
    assert all(name in str(err.value) for name in PRESETS)


# ----------------------------------------------------------------------------------------------
# Adaptive channels (the USiT of DC-AE 1.5).


def _prefix_params(params: dict, c: int, p: int) -> dict:
    """The reference's slicing: the patch conv's first c input channels, decoder_pred's first p*p*c outputs."""
    out = jax.tree_util.tree_map(lambda a: a, params)
    out["patch_embed"] = {"proj": {**params["patch_embed"]["proj"]}}
    out["patch_embed"]["proj"]["kernel"] = params["patch_embed"]["proj"]["kernel"][:, :, :c]
    pred = params["decoder_pred"]
    out["decoder_pred"] = {"kernel": pred["kernel"][:, : p * p * c], "bias": pred["bias"][: p * p * c]}
    return out


@pytest.mark.parametrize(("patch_size", "channels"), [(1, 1), (1, 3), (2, 3), (1, 4)])
def test_adaptive_channels_run_the_prefix_with_sliced_weights(patch_size, channels):
    """A model with adaptive channels given c of its C channels is the reference's sliced model, checked against
    the float64 NumPy forward of a c-channel UViT with the sliced weights; all C channels are the plain model."""
    cfg = _tiny(patch_size, adaptive_channels=True)
    params = _random_params(cfg, seed=5)
    x, t, y = _inputs(cfg, seed=5)
    x = x[..., :channels]
    out = _apply(UViT(cfg), params, x, t, y)
    assert out.shape == x.shape
    small = dataclasses.replace(cfg, in_channels=channels, adaptive_channels=False)
    ref = np_uvit(_prefix_params(params, channels, patch_size), small, x, t, y)
    assert _rel_err(out, ref) < 1e-5
    if channels == cfg.in_channels:
        plain = dataclasses.replace(cfg, adaptive_channels=False)
        np.testing.assert_array_equal(out, _apply(UViT(plain), params, x, t, y))


def test_only_adaptive_models_take_a_channel_prefix():
    cfg = _tiny()
    params = _random_params(cfg)
    x, t, y = _inputs(cfg)
    with pytest.raises(ValueError, match=r"expected latents \(B, 8, 8, 4\), got \(3, 8, 8, 2\)"):
        UViT(cfg).apply({"params": params}, x[..., :2], t, y)
    adaptive = dataclasses.replace(cfg, adaptive_channels=True)
    too_many = np.concatenate([x, x[..., :1]], axis=-1)
    with pytest.raises(ValueError, match=r"expected latents \(B, 8, 8, 1..4\), got \(3, 8, 8, 5\)"):
        UViT(adaptive).apply({"params": params}, too_many, t, y)
    # The same parameters: adaptive channels add no weights.
    assert count_params(adaptive) == count_params(cfg)
