"""DCAEDiffusion export/load and guided generation, and the `dcae_jax.sample` CLI (grid, FID, resume)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from dcae_jax.autoencoder.model import init_variables, tiny_config
from dcae_jax.autoencoder.pretrained import DCAE
from dcae_jax.data import images as image_io
from dcae_jax.diffusion.pipeline import DCAEDiffusion, image_grid, sampler_settings
from dcae_jax.diffusion.uvit import get_uvit_config, init_uvit_params
from dcae_jax.metrics import fid as fid_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> pathlib.Path:
    """A tiny DC-AE (f8, 8 latent channels at 32x32 -> 4x4x8) and a tiny UViT on its latents, exported."""
    root = tmp_path_factory.mktemp("pipeline")
    ae_cfg = tiny_config(scaling_factor=0.5)
    ae_dir = DCAE(ae_cfg, init_variables(ae_cfg, jax.random.key(0))).save_pretrained(root / "ae")
    cfg = get_uvit_config("uvit-tiny", in_channels=ae_cfg.latent_channels, input_size=4, num_classes=5)
    params = init_uvit_params(cfg, jax.random.key(1))
    pipe = DCAEDiffusion(
        cfg, params, objective="epsilon", scaling_factor=0.5, sampler={"steps": 6}, autoencoder=str(ae_dir)
    )
    return pipe.save_pretrained(root / "export")


def test_export_round_trip_and_generation(export):
    pipe = DCAEDiffusion.from_pretrained(export)
    assert pipe.sampler == sampler_settings("epsilon", {"steps": 6})
    assert pipe.scaling_factor == 0.5 and pipe.config.num_classes == 5
    a = pipe.generate([0, 1, 4], seed=3)
    b = pipe.generate([0, 1, 4], seed=3)
    assert a.shape == (3, 32, 32, 3) and np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)  # a function of the seed only
    assert not np.allclose(a, pipe.generate([0, 1, 4], seed=4))
    z1 = pipe.generate_latents([0, 1, 4], seed=3, guidance_scale=1.0)
    z6 = pipe.generate_latents([0, 1, 4], seed=3, guidance_scale=6.0)
    assert not np.allclose(z1, z6)  # guidance reaches the solver
    # Decoding divides by the scaling factor, as the reference does.
    np.testing.assert_allclose(pipe.decode(z1), pipe.autoencoder.decode(z1 / 0.5), atol=1e-6)


def test_bad_inputs_are_clear_errors(export, tmp_path):
    pipe = DCAEDiffusion.from_pretrained(export)
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 5\]"):
        pipe.generate_latents([6])
    with pytest.raises(KeyError, match=r"'dopri5' does not fit the 'epsilon' objective; valid .*\['dpm_solver_pp'\]"):
        sampler_settings("epsilon", {"name": "dopri5"})
    with pytest.raises(KeyError, match=r"'foo' is not a sampler; valid for this model: \['dpm_solver_pp'\]"):
        sampler_settings("epsilon", {"name": "foo"})
    for bad, message in (
        ({"steps": 0}, "steps must be an integer >= 1, got 0"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number"),
        ({"order": 4}, "order must be 1, 2 or 3, got 4"),
    ):
        with pytest.raises(ValueError, match=message):
            sampler_settings("epsilon", bad)
    with pytest.raises(ValueError, match="rtol must be > 0"):
        sampler_settings("velocity", {"rtol": 0.0})
    with pytest.raises(ValueError, match=r"no diffusion_config\.json"):
        DCAEDiffusion.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="latent_channels=3: this model has no adaptive channels, it samples all 8"):
        pipe.generate_latents([0], latent_channels=3)
    with pytest.raises(FileNotFoundError, match="this is a diffusion model's export, its autoencoder is in"):
        DCAE.from_pretrained(export)  # the diffusion export where the autoencoder was meant


def test_image_grid_layout():
    images = np.stack([np.full((2, 3, 3), i, np.float32) for i in range(5)])
    grid = image_grid(images, columns=2)
    assert grid.shape == (6, 6, 3)
    assert grid[0, 0, 0] == 0 and grid[0, 3, 0] == 1 and grid[2, 0, 0] == 2 and grid[4, 3, 0] == -1


def _sample(*args: str) -> subprocess.CompletedProcess:
    # The test run's persistent compilation cache (tests/conftest.py): a rerun compiles nothing (Inception alone
    # takes ~30 s here).
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "dcae_jax.sample", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def test_sample_cli_writes_grid_and_fid_and_resumes(export, tmp_path):
    weights = tmp_path / "fid_inception.npz"
    fid_lib.save_fid_weights(fid_lib.init_fid_variables(0), weights)
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(64, fid_lib.FEATURE_DIM))
    fid_lib.save_stats(tmp_path / "ref.npz", feats.mean(0), np.cov(feats, rowvar=False))
    out = tmp_path / "samples"
    args = [f"--model={export}", f"--out={out}", "--num_samples=6", "--batch_size=4", "--seed=1"]
    args += [f"--fid_stats={tmp_path / 'ref.npz'}", f"--fid_weights={weights}"]
    first = _sample(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert result["num_samples"] == 6 and result["chunks_sampled"] == 2 and np.isfinite(result["fid"])
    assert (out / "grid.png").exists()
    grid = image_io.load_image(out / "grid.png")  # all 6 samples (--grid=64), from both chunks: 2 x 3 cells of 32 px
    assert grid.shape == (64, 96, 3)
    # The FID equals the Fréchet distance of the stored features against the reference.
    feats = np.concatenate([np.load(out / "chunks" / f"chunk-{i:05d}.npz")["features"] for i in range(2)])
    stats = fid_lib.FeatureStats().update(feats)
    ref = fid_lib.load_stats(tmp_path / "ref.npz")
    assert result["fid"] == pytest.approx(fid_lib.frechet_distance(*stats.mu_sigma(), *ref), rel=1e-9)
    # A rerun resumes: nothing is sampled again, the result is the same.
    (out / "chunks" / "chunk-00001.npz").write_bytes(b"truncated")
    second = _sample(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads((out / "results.json").read_text())
    assert again["chunks_skipped"] == 1 and again["chunks_sampled"] == 1
    assert again["fid"] == pytest.approx(result["fid"], rel=1e-6)
    # Another sampler setting in the same folder is refused, not mixed in.
    third = _sample(*args[:-2], "--guidance_scale=3")
    assert third.returncode == 2 and "different run" in third.stderr
    # A channel prefix of a model without adaptive channels: one line, exit 2, nothing written.
    fourth = _sample(args[0], "--latent_channels=3", f"--out={tmp_path / 'prefix'}")
    assert fourth.returncode == 2 and "no adaptive channels" in fourth.stderr and "Traceback" not in fourth.stderr
    assert not (tmp_path / "prefix").exists()
    # A bad sampler setting is refused before anything is written (a run.json of it would refuse the fixed rerun).
    fifth = _sample(args[0], "--steps=0", f"--out={tmp_path / 'steps'}")
    assert fifth.returncode == 2 and "steps must be an integer >= 1, got 0" in fifth.stderr
    assert not (tmp_path / "steps").exists()
    # Reference statistics of other features are refused before anything is sampled, naming the file.
    fid_lib.save_stats(tmp_path / "small.npz", feats.mean(0)[:64], np.eye(64))
    small = [f"--fid_stats={tmp_path / 'small.npz'}", f"--fid_weights={weights}", f"--out={tmp_path / 'small'}"]
    sixth = _sample(*args[:-2], *small)
    assert sixth.returncode == 2 and f"{tmp_path / 'small.npz'}: statistics of 64-dimensional" in sixth.stderr
    assert not (tmp_path / "small").exists()


def test_sample_refuses_non_finite_samples(export, tmp_path):
    """A diverged model (NaN weights): one line naming the chunk, exit 2, no chunk written, no FID scored."""
    pipe = DCAEDiffusion.from_pretrained(export)
    leaves, treedef = jax.tree_util.tree_flatten(pipe.params)
    leaves[-1] = np.full(leaves[-1].shape, np.nan, np.float32)
    pipe.params = jax.tree_util.tree_unflatten(treedef, leaves)
    pipe.save_pretrained(tmp_path / "diverged")
    out = tmp_path / "samples"
    proc = _sample(f"--model={tmp_path / 'diverged'}", f"--out={out}", "--num_samples=4", "--batch_size=4")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "chunk 0: 4 of 4 samples are non-finite (NaN/inf) after decoding; it was not written" in proc.stderr
    assert not list(out.glob("chunks/*.npz")) and not (out / "results.json").exists()


def test_dit_pipeline_round_trip_and_ddpm_sampling(tmp_path):
    """A DiT export (learned sigma, DDPM with guidance on the epsilon channels) loads and samples."""
    from dcae_jax.diffusion.dit import get_dit_config, init_dit_params

    ae_cfg = tiny_config()
    ae = DCAE(ae_cfg, init_variables(ae_cfg, jax.random.key(0)))
    cfg = get_dit_config("dit-tiny", in_channels=ae_cfg.latent_channels, input_size=4, num_classes=5)
    pipe = DCAEDiffusion(cfg, init_dit_params(cfg, jax.random.key(2)), objective="dit", sampler={"steps": 5})
    pipe.save_pretrained(tmp_path / "dit")
    loaded = DCAEDiffusion.from_pretrained(tmp_path / "dit", autoencoder=ae)
    assert loaded.model_type == "dit" and loaded.sampler == sampler_settings("dit", {"steps": 5})
    z = loaded.generate_latents([0, 3], seed=1)
    assert z.shape == (2, 4, 4, ae_cfg.latent_channels) and np.all(np.isfinite(z))
    np.testing.assert_array_equal(z, loaded.generate_latents([0, 3], seed=1))  # DDPM noise from (seed, chunk)
    assert not np.allclose(z, loaded.generate_latents([0, 3], seed=1, chunk=1))
    assert loaded.generate([4], seed=0).shape == (1, 32, 32, 3)


def test_sampling_draws_only_the_trained_classes():
    from dcae_jax.diffusion.generate import class_ids

    ids = class_ids(400, 10, seed=0, explicit=[], trained=[2, 7])
    assert set(ids.tolist()) == {2, 7}
    everything = class_ids(400, 10, seed=0, explicit=[])
    assert set(everything.tolist()) == set(range(10))
    np.testing.assert_array_equal(everything, class_ids(400, 10, seed=0, explicit=[], trained=list(range(10))))
    with pytest.warns(UserWarning, match=r"--classes \[0, 1, 9\]: the model saw no training example"):
        np.testing.assert_array_equal(class_ids(3, 10, seed=0, explicit=[9, 0, 1], trained=[2]), [9, 0, 1])


@pytest.mark.gcs
def test_export_and_sample_on_gcs(export, gcs_dir, tmp_path, monkeypatch):
    """An export with its autoencoder bundled, written to and loaded from the bucket; `sample --out=gs://...` writes
    its chunks, grid and results there and resumes (a damaged chunk alone is sampled again)."""
    from dcae_jax import sample
    from dcae_jax.runtime import paths

    monkeypatch.chdir(tmp_path)
    local = DCAEDiffusion.from_pretrained(export)
    remote_dir = local.save_pretrained(f"{gcs_dir}/export", bundle_autoencoder=True)
    assert str(remote_dir) == f"{gcs_dir}/export" and (remote_dir / "autoencoder" / "dcae_config.json").exists()
    remote = DCAEDiffusion.from_pretrained(f"{gcs_dir}/export")
    np.testing.assert_array_equal(remote.generate([0, 3], seed=2), local.generate([0, 3], seed=2))

    out = paths.path(f"{gcs_dir}/samples")
    args = [f"--model={gcs_dir}/export", f"--out={out}", "--num_samples=6", "--batch_size=4", "--seed=1"]
    assert sample.main(args) == 0
    result = json.loads((out / "results.json").read_text())
    assert (result["chunks_sampled"], result["chunks_skipped"]) == (2, 0) and (out / "grid.png").exists()
    first = paths.load_npz(out / "chunks" / "chunk-00000.npz")
    (out / "chunks" / "chunk-00001.npz").write_bytes(b"truncated")
    assert sample.main(args) == 0
    again = json.loads((out / "results.json").read_text())
    assert (again["chunks_sampled"], again["chunks_skipped"]) == (1, 1)
    np.testing.assert_array_equal(paths.load_npz(out / "chunks" / "chunk-00000.npz")["images"], first["images"])
    assert not (tmp_path / "gs:").exists()
