"""DiT against diffusers' `DiTTransformer2DModel` with identical random weights, the reference's parameter
count, its fixed position embedding, initialisation and train-time label dropout."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_layout
import torch
from torch_reference import make_diffusers_dit as _diffusers_dit

from dcae_jax.diffusion import convert, dit
from dcae_jax.diffusion.dit import DIT_PRESETS, DiT, DiTConfig, count_params, get_dit_config, init_dit_params


def _tiny(patch_size: int = 1, input_size: int = 8, **kw) -> DiTConfig:
    return get_dit_config("dit-tiny", in_channels=4, input_size=input_size, patch_size=patch_size, **kw)


@functools.cache
def _converted(cfg: DiTConfig):
    """(diffusers model, our params converted from its weights through the reference key names)."""
    model = _diffusers_dit(cfg)
    sd = reference_layout.dit_state_dict_from_diffusers(model.state_dict(), cfg)
    return model, convert.convert_dit_state_dict(sd, cfg)


def _inputs(cfg: DiTConfig, batch: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, cfg.input_size, cfg.input_size, cfg.in_channels)).astype(np.float32)  # NHWC
    t = np.array([0.0, 3.25, 250.0, 999.0][:batch], np.float32)
    y = np.array([3, cfg.null_class, 0, 999][:batch], np.int64)
    return x, t, y


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@jax.jit(static_argnums=0)
def _apply(model, params, x, t, y):
    return model.apply({"params": params}, x, t, y)


def _diffusers_forward(model, x_nhwc, t, y) -> np.ndarray:
    with torch.no_grad():
        out = model(
            torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()),
            timestep=torch.from_numpy(t),
            class_labels=torch.from_numpy(y),
        ).sample
    return out.numpy().transpose(0, 2, 3, 1)  # NCHW -> NHWC


# ----------------------------------------------------------------------------------------------


def param_count_closed_form(config: DiTConfig) -> int:
    """Per block 12D^2 + 9D (attn + MLP) + 6D^2 + 6D (adaLN); the embedders; the head. No pos_embed."""
    d, c, p, f = config.hidden_size, config.in_channels, config.patch_size, config.frequency_embedding_size
    hidden = int(d * config.mlp_ratio)
    block = (3 * d * d + 3 * d) + (d * d + d) + (2 * d * hidden + hidden + d) + (6 * d * d + 6 * d)
    embed = (c * p * p * d + d) + (f * d + d + d * d + d) + config.label_table_size * d
    head = (2 * d * d + 2 * d) + (d * p * p * config.out_channels + p * p * config.out_channels)
    return config.depth * block + embed + head


def test_param_count_matches_reference():
    cfg = get_dit_config("dit-xl", in_channels=32, input_size=16)
    n = count_params(cfg)
    assert n == 674_890_048 and round(n / 1e6, 2) == 674.89  # README: 674.89M (pos_embed is not trainable)
    assert n == param_count_closed_form(cfg)
    tiny = _tiny(patch_size=2)
    assert count_params(tiny) == param_count_closed_form(tiny)


@pytest.mark.parametrize("patch_size", [1, 2])
def test_forward_matches_diffusers(patch_size):
    cfg = _tiny(patch_size)
    model, params = _converted(cfg)
    x, t, y = _inputs(cfg)
    out = _apply(DiT(cfg), params, x, t, y)
    assert out.shape == (*x.shape[:3], 2 * cfg.in_channels) and out.dtype == jnp.float32
    ref = _diffusers_forward(model, x, t, y)
    err = _rel_err(out, ref)
    print(f"DiT vs diffusers, patch {patch_size}: max rel err {err:.2e}")
    assert err < 1e-4
    if patch_size == 1:
        # diffusers' stock DiT sinusoid divides by (half - 1), not half: a visibly different function.
        stock = _diffusers_dit(cfg, dit_time_embedding=False)
        assert _rel_err(_diffusers_forward(stock, x, t, y), ref) > 1e-3


def test_pos_embed_is_the_fixed_2d_sincos_table():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    for dim, grid in [(1152, 16), (32, 4)]:
        ours = dit.sincos_pos_embed_2d(dim, grid)
        theirs = get_2d_sincos_pos_embed(dim, grid, base_size=grid, output_type="np")
        assert ours.shape == (grid * grid, dim) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, theirs, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_init():
    cfg = _tiny(input_size=2)
    return cfg, jax.jit(init_dit_params, static_argnums=0)(cfg, jax.random.key(0))  # eager init is slow on CPU


def test_init_is_adaln_zero_and_reference_distributions(tiny_init):
    cfg, params = tiny_init
    x, t, y = _inputs(cfg)
    np.testing.assert_array_equal(_apply(DiT(cfg), params, x, t, y), 0.0)  # zeroed head: output 0 at init
    for name in ("blocks_0", "blocks_1", "final_layer"):
        assert not np.any(params[name]["adaLN_modulation_1"]["kernel"])
    d = cfg.hidden_size
    qkv = params["blocks_0"]["attn"]["qkv"]["kernel"]
    assert np.abs(qkv).max() <= math.sqrt(6 / (d + 3 * d)) and np.std(qkv) > 0.8 * math.sqrt(2 / (4 * d))
    assert np.std(params["y_embedder"]["embedding_table"]["embedding"]) == pytest.approx(0.02, rel=0.05)
    assert np.std(params["t_embedder"]["mlp_0"]["kernel"]) == pytest.approx(0.02, rel=0.1)
    assert not np.any(params["x_embedder"]["proj"]["bias"])
    fan = cfg.in_channels + d  # xavier on the (D, C*p*p) view, p = 1
    assert np.abs(params["x_embedder"]["proj"]["kernel"]).max() <= math.sqrt(6 / fan)


def test_label_dropout_to_null_class(tiny_init):
    cfg, params = tiny_init
    table = params["y_embedder"]["embedding_table"]["embedding"]
    assert table.shape == (cfg.num_classes + 1, cfg.hidden_size)
    n = 8192
    y = jnp.asarray(np.random.default_rng(0).integers(0, cfg.num_classes, n), jnp.int32)
    embed = dit.LabelEmbedder(cfg.num_classes, cfg.hidden_size, cfg.class_dropout_prob)
    p = {"params": {"embedding_table": params["y_embedder"]["embedding_table"]}}

    @functools.partial(jax.jit, static_argnums=1)
    def run(key, train):
        return embed.apply(p, y, train, rngs={"label_dropout": key})

    drop = np.asarray(jnp.all(run(jax.random.key(7), True) == table[cfg.null_class], axis=-1))
    assert abs(drop.mean() - cfg.class_dropout_prob) < 0.015
    np.testing.assert_array_equal(run(jax.random.key(7), False), table[y])
    # Through the model: train=True needs the "label_dropout" stream.
    x, t, _ = _inputs(cfg, batch=2)
    with pytest.raises(Exception, match="label_dropout"):
        DiT(cfg).apply({"params": params}, x, t, y[:2], train=True)


def test_bf16_compute_close_to_f32_and_params_stay_f32():
    cfg = _tiny(patch_size=2)
    params = _converted(cfg)[1]
    x, t, y = _inputs(cfg)
    shapes = jax.eval_shape(DiT(cfg, dtype=jnp.bfloat16).init, {"params": jax.random.key(0)}, x, t, y)["params"]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(shapes))
    out = _apply(DiT(cfg, dtype=jnp.bfloat16), params, x, t, y)
    assert out.dtype == jnp.float32
    assert 0 < _rel_err(out, _apply(DiT(cfg), params, x, t, y)) < 5e-2


def test_unknown_preset_lists_valid_names():
    with pytest.raises(KeyError, match="dit-xl") as err:
        get_dit_config("dit-l", in_channels=32, input_size=16)
    assert all(name in str(err.value) for name in DIT_PRESETS)
    cfg = get_dit_config("dit-xl", in_channels=128, input_size=8, depth=4)
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.out_channels) == (4, 1152, 16, 256)
    assert hash(cfg) == hash(get_dit_config("dit-xl", in_channels=128, input_size=8, depth=4))
