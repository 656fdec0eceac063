"""Config-declared freezing: rule matching, no optimizer state for frozen params, phase defaults."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dcae_jax.autoencoder.model import DCAEModel, tiny_config
from dcae_jax.training import config as common
from dcae_jax.training import loop, optim


@pytest.fixture(scope="module")
def params():
    cfg = tiny_config()
    return jax.eval_shape(DCAEModel(cfg).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]


def _paths(params, labels, label):
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {
        optim.param_path(p) for (p, _), lab in zip(flat, jax.tree_util.tree_leaves(labels), strict=True) if lab == label
    }


def test_first_matching_rule_wins_and_unmatched_params_are_named(params):
    labels = optim.label_params(
        params, [("decoder/head_conv/.*", "train"), ("decoder/.*", "freeze")] + [("encoder/.*", "train")]
    )
    assert _paths(params, labels, "train") >= {"decoder/head_conv/conv/kernel", "encoder/project_out/kernel"}
    assert "decoder/head_norm/scale" in _paths(params, labels, "freeze")
    with pytest.raises(ValueError, match=r"match no rule.*encoder/project_in/conv/kernel"):
        optim.label_params(params, [("decoder/.*", "train")])
    with pytest.raises(ValueError, match="label must be"):
        optim.label_params(params, [(".*", "trainable")])


def test_phase_defaults_select_latent_adjacent_layers_and_head(params):
    p2 = optim.label_params(params, common.trainable_rules(2, num_stages=4))
    assert {p.rsplit("/", 1)[0] for p in _paths(params, p2, "train")} == {"encoder/project_out", "decoder/project_in"}
    p2b = optim.label_params(params, common.trainable_rules(2, num_stages=4, adapt_stages=1))
    assert "encoder/stage_3_block_0/attn/qkv/kernel" in _paths(params, p2b, "train")
    assert "encoder/stage_2_block_0/attn/qkv/kernel" not in _paths(params, p2b, "train")
    p3 = optim.label_params(params, common.trainable_rules(3, num_stages=4))
    assert {p.split("/")[1] for p in _paths(params, p3, "train")} == {"head_norm", "head_conv"}
    assert not any(p.startswith("encoder") for p in _paths(params, p3, "train"))


def test_frozen_params_carry_no_optimizer_state_and_never_change(params):
    real = jax.tree_util.tree_map(lambda s: jnp.ones(s.shape, s.dtype), params)
    labels = optim.label_params(real, common.trainable_rules(3, num_stages=4))
    tx = optim.masked(optim.adamw_with_warmup(1e-2, weight_decay=0.1), labels)
    state = tx.init(real)
    n_state = sum(x.size for x in jax.tree_util.tree_leaves(state) if hasattr(x, "size") and x.ndim > 0)
    n_train = sum(
        x.size
        for x, lab in zip(jax.tree_util.tree_leaves(real), jax.tree_util.tree_leaves(labels), strict=True)
        if lab == "train"
    )
    assert n_state == 2 * n_train  # Adam mu + nu for trainable leaves only
    grads = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 0.5), real)
    updates, _ = tx.update(grads, state, real)
    new = optax.apply_updates(real, updates)
    for x, y, lab in zip(
        jax.tree_util.tree_leaves(real), jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(labels), strict=True
    ):
        assert np.array_equal(x, y) == (lab == "freeze")


def test_trainable_table_counts_per_module(params):
    labels = optim.label_params(params, common.trainable_rules(2, num_stages=4))
    table = optim.trainable_table(params, labels)
    assert "| encoder/project_out |" in table and "| decoder/stage_1 | 0 |" in table


@pytest.mark.parametrize(("warmup", "decay"), [(0, 0), (4, 0), (3, 8)])
def test_logged_learning_rate_is_the_one_each_update_applied(warmup, decay):
    """With a constant gradient and eps -> 0, Adam's k-th update is exactly -lr_k: the trainer's logged value."""
    from dcae_jax.autoencoder import train

    c = common.base_config()
    c.optim.learning_rate, c.optim.warmup_steps, c.optim.decay_steps = 0.5, warmup, decay
    tx = optim.adamw_with_warmup(0.5, warmup_steps=warmup, decay_steps=decay, eps=1e-30)
    p = jnp.zeros((), jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
    opt_state = tx.init(p)
    for step in range(1, 10):
        updates, opt_state = tx.update(jnp.ones_like(p), opt_state, p)
        assert float(-updates) == pytest.approx(
            loop.logged_learning_rate(train.learning_rate_schedule(c.optim), step), rel=1e-4, abs=1e-9
        ), step  # float32 bias corrections
