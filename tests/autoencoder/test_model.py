"""DCAE config, registry, parameter counts and the no-shortcut ablation switch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcae_jax.autoencoder.model import (
    VARIANTS,
    DCAEConfig,
    DCAEModel,
    count_params,
    get_config,
    init_variables,
    tiny_config,
)

# Parameter counts of the PyTorch reference (efficientvit and diffusers agree).
REFERENCE_PARAMS = {
    "dc-ae-f32c32-in-1.0": (323_356_460, 123_172_384, 200_184_076),
    "dc-ae-f64c128-in-1.0": (676_896_140, 264_550_528, 412_345_612),
    "dc-ae-f128c512-in-1.0": (1_120_682_252, 415_661_056, 705_021_196),
    "dc-ae-f32c32-sana-1.0": (312_250_275, 153_027_104, 159_223_171),
}


def _abstract_params(cfg: DCAEConfig):
    res = cfg.spatial_compression_ratio
    return jax.eval_shape(DCAEModel(cfg).init, jax.random.key(0), jnp.zeros((1, res, res, 3)))["params"]


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_parameter_counts_equal_reference(name):
    params = _abstract_params(get_config(name))
    total, enc, dec = REFERENCE_PARAMS[name]
    assert count_params(params["encoder"]) == enc
    assert count_params(params["decoder"]) == dec
    assert count_params(params) == total


def test_registry_has_the_released_models_and_rejects_others():
    assert len(VARIANTS) == 12  # eight DC-AE 1.0, in-1.0-256px, Lite, two DC-AE 1.5
    assert get_config("mit-han-lab/dc-ae-f64c128-in-1.0-diffusers").latent_channels == 128
    assert get_config("dc-ae-f32c32-sana-1.1").scaling_factor == 0.41407
    assert get_config("dc-ae-f128c512-mix-1.0").spatial_compression_ratio == 128
    with pytest.raises(KeyError, match=r"dc-ae-f32c32-in-1\.0"):
        get_config("dc-ae-f16c16-in-1.0")


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="decoder_act_fns"):
        tiny_config(decoder_act_fns=("relu",))
    with pytest.raises(ValueError, match="downsample_block_type"):
        tiny_config(downsample_block_type="maxpool")
    with pytest.raises(ValueError, match="unknown DCAEConfig fields"):
        DCAEConfig.from_dict({"latent_chanels": 4})


def test_config_roundtrips_through_json_and_diffusers_format():
    for cfg in VARIANTS.values():
        assert DCAEConfig.from_dict(cfg.to_dict()) == cfg
        back = DCAEConfig.from_diffusers(cfg.to_diffusers(), name=cfg.name)
        assert back == cfg.replace(scaling_factor=cfg.scaling_factor or 1.0)  # diffusers has no "unknown" factor


def test_no_shortcut_ablation_has_equal_parameters_and_differs():
    cfg = tiny_config()
    plain = cfg.replace(residual=False)
    variables = init_variables(cfg, jax.random.key(0), 32)
    assert count_params(init_variables(plain, jax.random.key(0), 32)) == count_params(variables)
    x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (1, 32, 32, 3)), jnp.float32)
    y_res, z_res = DCAEModel(cfg).apply(variables, x)
    y_plain, z_plain = DCAEModel(plain).apply(variables, x)
    assert z_res.shape == z_plain.shape == (1, 4, 4, 8)
    assert not np.allclose(z_res, z_plain)
    assert y_res.shape == y_plain.shape == x.shape


def test_bf16_model_stays_finite_and_close_to_fp32():
    cfg = tiny_config()
    variables = init_variables(cfg, jax.random.key(1), 32)
    x = jnp.asarray(np.random.RandomState(1).uniform(-1, 1, (2, 64, 64, 3)), jnp.float32)
    y32, _ = jax.jit(DCAEModel(cfg).apply)(variables, x)
    vb = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), variables)
    yb, zb = jax.jit(DCAEModel(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16).apply)(vb, x.astype(jnp.bfloat16))
    assert yb.dtype == jnp.bfloat16 and zb.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(yb.astype(jnp.float32))))
    rel = float(jnp.linalg.norm(yb.astype(jnp.float32) - y32) / jnp.linalg.norm(y32))
    assert rel < 0.05, rel


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_policies_recompute_without_changing_names_loss_or_gradients(policy):
    """Per-block remat (config.model.remat): the same parameter tree, the same loss and gradients, and the
    backward pass really recomputes (more FLOPs in XLA's count of the compiled step; "dots" saves the conv
    outputs and recomputes only elementwise work)."""
    cfg = tiny_config()
    variables = init_variables(cfg, jax.random.key(2), 32)
    x = jnp.asarray(np.random.RandomState(2).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)

    def compiled(remat):
        model = DCAEModel(cfg, remat=remat)
        assert jax.tree_util.tree_structure(
            jax.eval_shape(model.init, jax.random.key(0), x)["params"]
        ) == jax.tree_util.tree_structure(variables["params"])

        def loss(p):
            (y, _), _ = model.apply({**variables, "params": p}, x, train=True, mutable=["batch_stats"])
            return jnp.mean(jnp.abs(y - x))

        return jax.jit(jax.value_and_grad(loss)).lower(variables["params"]).compile()

    base, remat = compiled("none"), compiled(policy)
    (l0, g0), (l1, g1) = base(variables["params"]), remat(variables["params"])
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0), strict=True):
        scale = float(jnp.abs(b).max()) or 1.0
        assert float(jnp.abs(a - b).max()) / scale < 1e-4
    assert remat.cost_analysis()["flops"] > base.cost_analysis()["flops"] * (1.05 if policy == "full" else 1.001)


def _blocks_constant(y):
    return all(np.allclose(y[:, 0::2, 0::2], y[:, i::2, j::2]) for i in (0, 1) for j in (0, 1))


def test_init_variables_uses_icnr_like_flax_init():
    cfg = tiny_config()
    v = init_variables(cfg, 0)
    dec = v["params"]["decoder"]
    ups = [k for k in dec if k.endswith("_up")] + (["head_conv"] if "conv" in dec.get("head_conv", {}) else [])
    assert ups
    for name in ups:
        k = np.asarray(dec[name]["conv"]["kernel"])
        assert np.array_equal(k, np.repeat(k[..., 0::4], 4, axis=-1)), name
        np.testing.assert_allclose(k.std() * np.sqrt(np.prod(k.shape[:-1])), 1.0, rtol=0.2)
    enc_k = np.asarray(v["params"]["encoder"]["project_in"]["conv"]["kernel"])
    assert not np.array_equal(enc_k, np.repeat(enc_k[..., 0::4], 4, axis=-1))  # down blocks untouched
    # The whole decoder starts free of sub-pixel (checkerboard) structure at its last 2x step.
    z = jax.random.normal(jax.random.key(2), (1, 2, 2, cfg.latent_channels))
    y = np.asarray(DCAEModel(cfg).apply(v, z, method=DCAEModel.decode))
    assert _blocks_constant(y)
