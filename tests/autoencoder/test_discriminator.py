"""PatchDiscriminator against a torch NLayerDiscriminator of the same layout (NCHW torch vs NHWC JAX)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn as tnn

from dcae_jax.autoencoder.discriminator import DISC_NORMS, PatchDiscriminator, get_disc_norm


def torch_nlayer_discriminator(in_ch: int, base: int, num_layers: int, norm: str, groups: int) -> tnn.Sequential:
    """taming-transformers NLayerDiscriminator with a pluggable norm; bias only on un-normed convs."""

    def make_norm(c: int) -> tnn.Module:
        return {"group": lambda: tnn.GroupNorm(groups, c), "batch": lambda: tnn.BatchNorm2d(c)}[norm]()

    bias = norm == "none"
    layers: list[tnn.Module] = [tnn.Conv2d(in_ch, base, 4, 2, 1), tnn.LeakyReLU(0.2)]
    mult = 1
    for i in range(1, num_layers + 1):
        prev, mult = mult, min(2**i, 8)
        layers.append(tnn.Conv2d(base * prev, base * mult, 4, 2 if i < num_layers else 1, 1, bias=bias))
        if norm != "none":
            layers.append(make_norm(base * mult))
        layers.append(tnn.LeakyReLU(0.2))
    layers.append(tnn.Conv2d(base * mult, 1, 4, 1, 1))
    return tnn.Sequential(*layers)


def load_torch_weights(model: tnn.Sequential, variables: dict) -> None:
    """Copies our variables into the torch model in order (conv_i -> i-th Conv2d, norm_i -> i-th norm)."""
    params = variables["params"]
    convs = [m for m in model if isinstance(m, tnn.Conv2d)]
    norms = [m for m in model if isinstance(m, (tnn.GroupNorm, tnn.BatchNorm2d))]
    with torch.no_grad():
        for i, conv in enumerate(convs):
            p = params[f"conv_{i}"]
            conv.weight.copy_(torch.from_numpy(np.asarray(p["kernel"]).transpose(3, 2, 0, 1).copy()))
            assert (conv.bias is None) == ("bias" not in p)
            if conv.bias is not None:
                conv.bias.copy_(torch.from_numpy(np.array(p["bias"])))
        for i, norm in enumerate(norms, start=1):
            norm.weight.copy_(torch.from_numpy(np.array(params[f"norm_{i}"]["scale"])))
            norm.bias.copy_(torch.from_numpy(np.array(params[f"norm_{i}"]["bias"])))


def host_variables(disc: PatchDiscriminator, shape: tuple[int, ...], seed: int = 0) -> dict:
    """Random variables built on the host from `eval_shape` (compiling `init` costs seconds on CPU).

    Norm scales/biases and conv biases are random too, so copying them to torch is tested.
    """
    abstract = jax.eval_shape(disc.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))
    gen = np.random.default_rng(seed)

    def leaf(path, x):
        name = path[-1].key
        if path[0].key == "batch_stats":
            return jnp.full(x.shape, 1.0 if name == "var" else 0.0, x.dtype)
        if name == "kernel":
            return jnp.asarray(gen.standard_normal(x.shape) / np.sqrt(np.prod(x.shape[:-1])), x.dtype)
        return jnp.asarray((1.0 if name == "scale" else 0.0) + 0.1 * gen.standard_normal(x.shape), x.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


@pytest.mark.parametrize(
    "norm,num_layers,hw",
    [("group", 3, (32, 32)), ("group", 2, (24, 20)), ("none", 3, (32, 32)), ("batch", 1, (16, 16))],
)
def test_matches_torch_nlayer_discriminator(norm, num_layers, hw):
    base, groups = 8, 4
    x = np.random.RandomState(0).uniform(-1, 1, (2, *hw, 3)).astype(np.float32)
    disc = PatchDiscriminator(base_features=base, num_layers=num_layers, norm=norm, num_groups=groups)
    variables = host_variables(disc, x.shape)
    ref = torch_nlayer_discriminator(3, base, num_layers, norm, groups)
    load_torch_weights(ref, variables)
    ref.train(norm == "batch")  # BatchNorm: compare training mode (batch statistics)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).permute(0, 2, 3, 1).numpy()
    if norm == "batch":
        out, _ = jax.jit(lambda v, x: disc.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    else:
        out = jax.jit(disc.apply)(variables, x)
    assert out.shape == expected.shape
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


def test_output_shape_and_parameter_layout():
    disc = PatchDiscriminator()  # defaults: 64 features, 3 layers, GroupNorm(32)
    x = jnp.zeros((1, 64, 64, 3))
    shapes = jax.eval_shape(disc.init, jax.random.key(0), x)
    params = shapes["params"]
    assert sorted(params) == ["conv_0", "conv_1", "conv_2", "conv_3", "conv_4", "norm_1", "norm_2", "norm_3"]
    assert params["conv_0"]["kernel"].shape == (4, 4, 3, 64) and "bias" in params["conv_0"]
    assert params["conv_1"]["kernel"].shape == (4, 4, 64, 128) and "bias" not in params["conv_1"]
    assert params["conv_3"]["kernel"].shape == (4, 4, 256, 512)
    assert params["conv_4"]["kernel"].shape == (4, 4, 512, 1)
    assert set(shapes) == {"params"}  # GroupNorm: no batch_stats collection to sync
    # 64 -> 32 -> 16 -> 8 (stride 2) -> 7 -> 6 (stride 1, pad 1, k 4); 256 -> 30 as in pix2pix.
    assert jax.eval_shape(disc.apply, shapes, x).shape == (1, 6, 6, 1)
    assert jax.eval_shape(disc.apply, shapes, jnp.zeros((2, 256, 256, 3))).shape == (2, 30, 30, 1)
    # Channel cap at 8x base.
    deep = jax.eval_shape(PatchDiscriminator(base_features=4, num_layers=5, num_groups=4).init, jax.random.key(0), x)
    assert deep["params"]["conv_5"]["kernel"].shape == (4, 4, 32, 32)


def test_bf16_compute_returns_float32_logits():
    disc = PatchDiscriminator(base_features=8, num_layers=2, num_groups=4, dtype=jnp.bfloat16)
    x = jnp.zeros((1, 16, 16, 3))
    variables = host_variables(disc, x.shape)
    assert all(
        p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(jax.eval_shape(disc.init, jax.random.key(0), x))
    )
    assert jax.jit(disc.apply)(variables, x).dtype == jnp.float32


def test_batch_norm_updates_running_stats_only_in_train():
    disc = PatchDiscriminator(base_features=8, num_layers=2, norm="batch")
    x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
    variables = host_variables(disc, x.shape)
    assert "batch_stats" in variables

    @jax.jit
    def both(v, x):
        train = disc.apply(v, x, train=True, mutable=["batch_stats"])
        return train, disc.apply(v, x, train=False, mutable=["batch_stats"])

    (out_train, train_stats), (out_eval, eval_stats) = both(variables, x)
    before = jax.tree_util.tree_leaves(variables["batch_stats"])
    assert any(not np.allclose(a, b) for a, b in zip(before, jax.tree_util.tree_leaves(train_stats)))
    assert all(np.array_equal(a, b) for a, b in zip(before, jax.tree_util.tree_leaves(eval_stats)))
    assert not np.allclose(out_train, out_eval)  # eval normalizes with the running statistics


def test_norm_registry_errors():
    assert set(DISC_NORMS) == {"batch", "group", "none"}
    with pytest.raises(ValueError, match=r"unknown discriminator norm 'layer'.*\['batch', 'group', 'none'\]"):
        get_disc_norm("layer")
    with pytest.raises(ValueError, match="unknown discriminator norm"):
        jax.eval_shape(PatchDiscriminator(norm="layer").init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="num_layers"):
        jax.eval_shape(PatchDiscriminator(num_layers=0).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
