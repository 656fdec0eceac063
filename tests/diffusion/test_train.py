"""The diffusion trainer: the reference schedule/EMA formulas, the step's wiring, learning, resume, sharding."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dcae_jax.diffusion import train as dtrain
from dcae_jax.training import config as common

LATENT_SHAPE = (4, 4, 8)


def tiny_config(objective: str = "epsilon", **changes):
    c = common.diffusion_config()
    c.objective = objective
    c.model.preset = "uvit-tiny"
    c.model.dtype, c.model.remat = "float32", "none"
    c.model.overrides = {"num_classes": 4}
    c.optim.learning_rate, c.optim.warmup_steps, c.optim.weight_decay = 1e-3, 10, 0.03
    c.ema.decay, c.ema.warmup_steps = 0.99, 5
    c.global_batch_size = 8
    c.num_steps = 6
    c.sample.every = 0
    c.log_every, c.checkpoint_every = 2, 3
    c.mesh.shape = (-1, 1)
    for k, v in changes.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


def _batch(seed: int = 0, n: int = 8):
    rng = np.random.default_rng(seed)
    return {
        "latent": jnp.asarray(rng.normal(size=(n, *LATENT_SHAPE)).astype(np.float32)),
        "label": jnp.asarray(rng.integers(0, 4, n).astype(np.int32)),
    }


def test_learning_rate_is_the_reference_constant_with_warmup():
    o = tiny_config().optim
    o.learning_rate, o.warmup_steps = 2e-4, 5000
    lr = dtrain.learning_rate_schedule(o)
    for k in (0, 1, 2499, 4998, 4999, 5000, 10**6):
        expected = 2e-4 * (k + 1) / 5000 if k < 5000 else 2e-4
        np.testing.assert_allclose(float(lr(k)), expected, rtol=1e-6)


def test_ema_decay_follows_the_reference_warmup():
    for step in (1, 10, 2000, 20000):
        got = float(dtrain.ema_decay_at(jnp.asarray(step), 0.9999, 2000))
        np.testing.assert_allclose(got, 0.9999 * (1 - np.exp(-step / 2000)), rtol=1e-6)
    assert float(dtrain.ema_decay_at(jnp.asarray(7), 0.9, 0)) == pytest.approx(0.9)


@pytest.mark.parametrize("objective", ["epsilon", "velocity"])
def test_train_step_is_loss_gradient_adamw_then_ema(objective):
    """One step equals the hand-written composition: same keys, optax AdamW, EMA with the warm-up decay."""
    config = tiny_config(objective)
    cfg = dtrain.model_config(config, LATENT_SHAPE)
    trainer = dtrain.build_trainer(config, cfg)
    init = dtrain._init_state_fn(trainer, cfg)
    state = jax.jit(init, static_argnums=1)(jax.random.key_data(jax.random.key(0)), None)
    state = state.replace(step=jnp.asarray(3, jnp.int32))  # EMA decay and lr depend on the step
    batch = _batch()
    new_state, metrics = jax.jit(functools.partial(dtrain.train_step, trainer=trainer))(state, batch)

    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 3)
    k_obj, k_drop = jax.random.split(key)

    def loss_fn(p):
        def apply_fn(x_t, t):
            return trainer.model.apply(
                {"params": p}, x_t, t, batch["label"], train=True, rngs={"label_dropout": k_drop}
            )

        return trainer.objective.loss(apply_fn, batch["latent"], k_obj)[0]

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(state.params)
    updates, _ = trainer.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    d = 0.99 * (1 - np.exp(-4 / 5))
    ema = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, state.ema_params, params)
    np.testing.assert_allclose(float(metrics.compute()["loss"]), float(loss), rtol=1e-5)
    assert int(new_state.step) == 4
    for a, b in zip(jax.tree_util.tree_leaves(new_state.params), jax.tree_util.tree_leaves(params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree_util.tree_leaves(new_state.ema_params), jax.tree_util.tree_leaves(ema), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_training_lowers_the_loss_on_a_fixed_set():
    config = tiny_config("epsilon", **{"optim.warmup_steps": 1})
    cfg = dtrain.model_config(config, LATENT_SHAPE)
    trainer = dtrain.build_trainer(config, cfg)
    state = jax.jit(dtrain._init_state_fn(trainer, cfg), static_argnums=1)(jax.random.key_data(jax.random.key(1)), None)
    step = jax.jit(functools.partial(dtrain.train_step, trainer=trainer))
    # Latents with structure (class-dependent means), so there is something to learn beyond noise.
    batch = _batch(n=16)
    batch["latent"] = 0.3 * batch["latent"] + jnp.asarray(batch["label"], jnp.float32)[:, None, None, None] - 1.5
    losses = []
    for _ in range(150):
        state, m = step(state, batch)
        losses.append(m.compute()["loss"])
    losses = np.asarray(jax.device_get(losses))
    assert losses[-20:].mean() < 0.6 * losses[:10].mean(), (losses[:10].mean(), losses[-20:].mean())


def _run(config, workdir):
    return dtrain.train_and_evaluate(config, workdir)


def _params(workdir):
    from dcae_jax.diffusion.pipeline import DCAEDiffusion

    return DCAEDiffusion.from_pretrained(workdir / "export").params


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("objective", "eps", "config.objective='eps'; valid: ['epsilon', 'velocity']"),
        ("model.preset", "uvit-xx", "config.model.preset: unknown UViT preset 'uvit-xx'; valid names: ['uvit-2b'"),
        ("model.overrides", {"widht": 8}, "config.model.overrides={'widht': 8}: UViTConfig.__init__() got an"),
        ("sample.name", "heun", "config.sample: sampler 'heun' does not fit the 'epsilon' objective; valid for this"),
        ("sample.steps", 0, "config.sample: sampler steps must be an integer >= 1, got 0"),
        ("sample.every", -1, "config.sample.every=-1 must be 0 (no grids) or a positive integer"),
        ("num_steps", 0, "config.num_steps=0 must be a positive integer"),
    ],
)
def test_a_config_mistake_is_named_before_anything_is_read_or_written(tmp_path, field, value, message):
    """Model, objective and sampler as well as the loop: not at the first sample grid, hours in."""
    from dcae_jax.training import loop

    config = tiny_config(**{field: value, "data.latents": str(tmp_path / "no_latents")})
    with pytest.raises(loop.ConfigError, match="^invalid config:\n  " + re.escape(message)):
        _run(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_an_autoencoder_that_cannot_decode_the_latents_is_named_before_anything_is_written(tiny_latents, tmp_path):
    """4-channel autoencoder, 8-channel latents: found at the start (it was found at the first sample grid, after
    the export had been written with it), and the same when sampling from an export with it."""
    from dcae_jax.autoencoder.model import init_variables
    from dcae_jax.autoencoder.model import tiny_config as ae_config
    from dcae_jax.autoencoder.pretrained import DCAE
    from dcae_jax.diffusion.pipeline import DCAEDiffusion

    cfg = ae_config(latent_channels=4)
    ae4 = DCAE(cfg, init_variables(cfg, jax.random.key(0))).save_pretrained(tmp_path / "ae4")
    latents = str(tiny_latents / "latents")
    message = f"{latents} has 8-channel latents; the autoencoder {ae4} (4 channels) does not decode them"
    with pytest.raises(ValueError, match=re.escape(message)):
        _run(tiny_config(**{"data.latents": latents, "autoencoder": str(ae4)}), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    _run(tiny_config(**{"data.latents": latents, "num_steps": 1, "checkpoint_every": 1}), tmp_path / "ok")
    pipe = DCAEDiffusion.from_pretrained(tmp_path / "ok" / "export", autoencoder=str(ae4))
    with pytest.raises(ValueError, match=re.escape("this diffusion model has 8-channel latents; the autoencoder")):
        pipe.generate([0])


def test_a_missing_latents_folder_fails_before_anything_is_written(tmp_path):
    config = tiny_config()
    config.data.latents = str(tmp_path / "no_latents")
    with pytest.raises(OSError, match="no_latents"):
        _run(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_resume_continues_exactly_and_exports(tiny_latents, tmp_path):
    kw = {"data.latents": str(tiny_latents / "latents"), "autoencoder": str(tiny_latents / "ae")}
    straight = tmp_path / "straight"
    result = _run(tiny_config(**kw), straight)
    assert result["steps"] == 6 and np.isfinite(result["train"]["loss"])
    assert (straight / "samples" / "step0000006.png").exists()  # decoded by the autoencoder
    resumed = tmp_path / "resumed"
    _run(tiny_config(num_steps=3, **kw), resumed)  # "crash" after step 3 (checkpoint at 3)
    _run(tiny_config(**kw), resumed)
    a, b = _params(straight), _params(resumed)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    # A checkpoint written by another process count (here: relabelled as a 2-process job's) resumes too: the state
    # is restored, the data restarts at the checkpoint's global batch, and the run still equals the straight one.
    relaid = tmp_path / "relaid"
    _run(tiny_config(num_steps=3, **kw), relaid)
    states = relaid / "checkpoints" / "3" / "data_iter"
    (only,) = states.glob("process_*-of-*.json")
    only.rename(states / "process_0-of-2.json")
    shutil.copy(states / "process_0-of-2.json", states / "process_1-of-2.json")
    _run(tiny_config(**kw), relaid)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(_params(relaid)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sharded_training_matches_single_device_on_8_cpu_devices(tiny_latents, tmp_path):
    """data x fsdp = 4 x 2 over 8 fake CPU devices: the same parameters and sample grids as one device (float
    noise); the grids are sampled with the EMA parameters as they are sharded for training, never gathered."""
    code = textwrap.dedent(
        f"""
        import json, sys
        import jax, numpy as np
        sys.path.insert(0, {str(os.getcwd())!r})
        from tests.diffusion.test_train import tiny_config
        from dcae_jax.data import images
        from dcae_jax.diffusion import train as dtrain
        from dcae_jax.diffusion.pipeline import DCAEDiffusion
        seen = []  # per sampling call: the parameters' device counts, and whether some are sharded
        generate_latents = DCAEDiffusion.generate_latents
        def spy(self, *args, **kwargs):
            leaves = jax.tree_util.tree_leaves(self.params)
            seen.append([sorted({{len(x.sharding.device_set) for x in leaves}}),
                         any(not x.sharding.is_fully_replicated for x in leaves)])
            return generate_latents(self, *args, **kwargs)
        DCAEDiffusion.generate_latents = spy
        kw = {{"data.latents": {str(tiny_latents / "latents")!r}, "autoencoder": {str(tiny_latents / "ae")!r},
               "sample.every": 3, "sample.steps": 5}}
        out, grids, calls = {{}}, {{}}, {{}}
        for name, shape, n in (("one", (1, 1), 1), ("mesh", (4, 2), 0)):
            seen.clear()
            c = tiny_config(**kw, **{{"mesh.shape": shape, "mesh.num_devices": n, "sharding.min_size": 1}})
            dtrain.train_and_evaluate(c, {str(tmp_path)!r} + "/" + name)
            p = DCAEDiffusion.from_pretrained({str(tmp_path)!r} + "/" + name + "/export").params
            out[name] = [np.asarray(x) for x in jax.tree_util.tree_leaves(p)]
            grids[name] = [np.round(127.5 * (1 + images.load_image(
                {str(tmp_path)!r} + f"/{{name}}/samples/step{{k:07d}}.png"))).astype(int) for k in (3, 6)]
            calls[name] = list(seen)
        print(json.dumps({{
            "params": max(float(np.max(np.abs(a - b))) for a, b in zip(out["one"], out["mesh"])),
            "grids": max(int(np.max(np.abs(a - b))) for a, b in zip(grids["one"], grids["mesh"])),
            "calls": calls,
        }}))
        """
    )
    from cpu_jobs import xla_flags  # here: the subprocess imports this module without tests/ on its path

    env = {**os.environ, "XLA_FLAGS": xla_flags(8), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["params"] < 1e-5
    assert result["grids"] <= 2, result  # 8-bit levels: float noise in the weights, nothing else
    assert result["calls"] == {"one": [[[1], False]] * 2, "mesh": [[[8], True]] * 2}, result["calls"]


def test_latent_diffusion_quickstart_end_to_end(tmp_path):
    """configs/latent_diffusion_quickstart.py through `python -m dcae_jax.main`: autoencoder -> latents ->
    UViT -> sample grids -> an export that `DCAEDiffusion.from_pretrained` loads and samples from."""
    from dcae_jax.data.latents import LatentDataset
    from dcae_jax.diffusion.pipeline import DCAEDiffusion

    workdir = tmp_path / "ldm"
    config = "--config=configs/latent_diffusion_quickstart.py:ae_steps=10,steps=10,sample_every=5,width=32,depth=2"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "dcae_jax.main", config, f"--workdir={workdir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Progress through the chain, curves per phase, and a closing summary naming what was written and what next.
    assert "== 1/2 autoencoder (phase 1, 10 steps)" in proc.stdout and "== 2/2 diffusion (diffusion" in proc.stdout
    assert f"model       {workdir / 'export'}" in proc.stdout and f"tensorboard --logdir {workdir}" in proc.stdout
    assert "Next: python -m dcae_jax.sample --model=" in proc.stdout
    assert (workdir / "autoencoder" / "curves.png").is_file() and (workdir / "diffusion" / "curves.png").is_file()
    data = LatentDataset(workdir / "diffusion" / "latents")
    assert data.latent_shape == (8, 8, 16) and len(data) == 8
    assert data.metadata["stats"]["rms"] == pytest.approx(1.0, rel=1e-3)  # "auto": scaled by 1/RMS
    assert sorted(p.name for p in (workdir / "diffusion" / "samples").glob("*.png")) == [
        "step0000005.png",
        "step0000010.png",
    ]
    # The label table has the data's classes; the export knows which ones had training images.
    counts = data.metadata["label_counts"]
    assert len(counts) == data.num_classes == 3 and sum(counts) == len(data)
    assert data.trained_classes == [i for i, n in enumerate(counts) if n > 0]
    eval_md = (workdir / "eval.md").read_text()
    assert "| diffusion | uvit-32x2 (epsilon) | 10 |" in eval_md  # the closing table's diffusion row
    # The export bundles its autoencoder: the whole workdir moves and the export still loads and decodes.
    moved = tmp_path / "moved"
    shutil.move(workdir, moved)
    pipe = DCAEDiffusion.from_pretrained(moved / "export")
    assert pipe.config.num_classes == 3 and pipe.config.name == "uvit-32x2" and pipe.classes == data.trained_classes
    assert pipe.scaling_factor == pytest.approx(data.scaling_factor)
    images = pipe.generate([0, 2], seed=0, steps=3)
    assert images.shape == (2, 128, 128, 3) and np.all(np.isfinite(images))

    # Reusing that autoencoder (ae=...): the chain is the diffusion phase alone, with the same data classes.
    reuse = tmp_path / "reuse"
    config = f"{config},ae={moved / 'autoencoder' / 'export'}"
    proc = subprocess.run(
        [*cmd[:-2], config, f"--workdir={reuse}"], capture_output=True, text=True, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "== 1/1 diffusion" in proc.stdout and not (reuse / "autoencoder").exists()
    assert "next: python -m dcae_jax.main --config=configs/uvit.py" not in proc.stdout  # precompute_latents' own hint
    assert (reuse / "eval.md").read_text().startswith("| diffusion phase |")  # no empty autoencoder table
    assert DCAEDiffusion.from_pretrained(reuse / "export").classes == data.trained_classes


def test_training_on_a_channel_prefix_of_a_structured_latent(tmp_path):
    """DC-AE 1.5's use: the trainer encodes the images with an autoencoder that has no shortcut around its latent,
    keeps the first 3 of its 8 channels (`data.latent_channels`), trains a 3-channel UViT, and the export's
    samples decode through the autoencoder (the missing channels as zeros)."""
    from dcae_jax.autoencoder.model import init_variables
    from dcae_jax.autoencoder.model import tiny_config as ae_config
    from dcae_jax.autoencoder.pretrained import DCAE
    from dcae_jax.data.latents import LatentDataset
    from dcae_jax.diffusion.pipeline import DCAEDiffusion

    ae_cfg = ae_config(encoder_out_shortcut=False, decoder_in_shortcut=False)
    ae_dir = DCAE(ae_cfg, init_variables(ae_cfg, jax.random.key(0))).save_pretrained(tmp_path / "ae")
    changes = {
        "autoencoder": str(ae_dir),
        "data.images": "bundled",
        "data.resolution": 32,
        "data.latent_channels": 3,
        "data.scaling_factor": "auto",
        "num_steps": 2,
        "checkpoint_every": 2,
    }
    result = _run(tiny_config(**changes), tmp_path / "run")
    assert result["steps"] == 2 and np.isfinite(result["train"]["loss"])
    data = LatentDataset(tmp_path / "run" / "latents")
    assert data.latent_shape == (4, 4, 3)
    full = DCAE.from_pretrained(ae_dir).encode(jnp.zeros((1, 32, 32, 3)))
    assert full.shape == (1, 4, 4, 8)  # the autoencoder has 8 channels; the diffusion model sees 3
    pipe = DCAEDiffusion.from_pretrained(tmp_path / "run" / "export")
    assert pipe.config.in_channels == 3 and pipe.latent_shape == (4, 4, 3)
    images = pipe.generate([0, 1], seed=0, steps=2)
    assert images.shape == (2, 32, 32, 3) and np.all(np.isfinite(images))


@pytest.mark.gcs
def test_trains_from_gcs_latents_into_a_gcs_workdir_and_resumes(tiny_latents, gcs_dir, tmp_path, monkeypatch):
    """Latents, autoencoder and workdir in the bucket: killed after step 3's checkpoint ("crash": a 3-step run),
    resumed to 6 steps, the export equals that of the same run on local disk."""
    from dcae_jax.runtime import paths

    monkeypatch.chdir(tmp_path)
    for name in ("latents", "ae"):
        paths.copytree(tiny_latents / name, f"{gcs_dir}/{name}")
    kw = {"data.latents": f"{gcs_dir}/latents", "autoencoder": f"{gcs_dir}/ae"}
    workdir = paths.path(f"{gcs_dir}/run")
    _run(tiny_config(num_steps=3, **kw), workdir)
    result = _run(tiny_config(**kw), workdir)
    assert result["steps"] == 6 and (workdir / "samples" / "step0000006.png").exists()
    local = tmp_path / "local"
    _run(tiny_config(**{"data.latents": str(tiny_latents / "latents"), "autoencoder": str(tiny_latents / "ae")}), local)
    for x, y in zip(
        jax.tree_util.tree_leaves(_params(local)), jax.tree_util.tree_leaves(_params(workdir)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not (tmp_path / "gs:").exists()
