"""Smoke test of the reproduction study: every experiment for real at the tiny `smoke` scale."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dcae_jax.data import pipeline as input_pipeline
from dcae_jax.studies import experiments, measure

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> pathlib.Path:
    """The bundled real photos laid out as `--data` expects: train/ and val/ subfolders."""
    root = tmp_path_factory.mktemp("photos")
    for split, folder in (("train", "train"), ("validation", "val")):
        (root / folder).mkdir()
        for path in input_pipeline.bundled_photos(split):
            shutil.copy(path, root / folder / path.name)
    return root


def test_smoke_scale_runs_all_three_experiments(photo_folder, tmp_path, genuine_weights):
    out = tmp_path / "out"
    env = os.environ | {"JAX_PLATFORMS": "cpu"}  # with the run's compile flags (tests/conftest.py)
    # The documented command, in a fresh process (XLA_FLAGS only take effect before the backend starts).
    cmd = [sys.executable, "-m", "dcae_jax.reproduce", "--data", str(photo_folder), "--out", str(out)]
    # CI time: --compilation_cache (a documented flag) names the test run's cache (tests/conftest.py), so the runs'
    # identical computations compile once.
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    cmd += ["--compilation_cache", os.environ["JAX_COMPILATION_CACHE_DIR"]]
    proc = subprocess.run([*cmd, "--scale", "smoke"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    scale = experiments.SCALES["smoke"]

    e1 = results["experiment1"]
    assert {(r["residual"], r["factor"]) for r in e1["runs"]} == {(True, 4), (False, 4)}
    assert len({r["params"] for r in e1["runs"]}) == 1  # the ablation keeps the parameter count
    assert all(np.isfinite(r["psnr"]) and r["num_images"] == scale.eval_images for r in e1["runs"])
    # LPIPS (genuine VGG16) and rFID (genuine Inception, on the rFID views) in every table's rows.
    for row in e1["runs"] + results["experiment2"]["rows"] + results["experiment3"]["rows"]:
        assert 0 < row["lpips"] < 1 and np.isfinite(row["rfid"]) and row["rfid"] >= 0, row
        assert row["rfid_images"] == scale.eval_images * scale.rfid_views
    # Training used L1 + LPIPS (AlexNet) in every phase: the trainer logged a non-zero LPIPS term.
    for run in ("f4c4_s0", "f4c4_s0_phase2_at64", "f4c4_phase3_head_gan_s0"):
        logged = [json.loads(line) for line in (out / "runs" / run / "metrics.jsonl").read_text().splitlines()]
        assert any(m.get("lpips", 0) > 0 for m in logged), run

    e2 = results["experiment2"]
    r = scale.resolution
    assert {(row["model"], row["eval_resolution"]) for row in e2["rows"]} == {
        (m, q) for m in ("contrast", "phase1", "phase2") for q in (r, 2 * r, 4 * r)
    }
    assert e2["memory"]["phase2_mib"] < e2["memory"]["phase1_mib"]
    assert [p["eval_resolution"] for p in e2["penalty"]] == [2 * r, 4 * r]

    e3 = results["experiment3"]
    assert {row["arm"] for row in e3["rows"]} == {"none", "head_gan", "full_gan"}
    # Head-only refinement must leave the encoder, hence the latents, bit-identical; the full-model arm not.
    assert e3["latents"]["head_gan_s0"]["bit_identical"]
    assert not e3["latents"]["full_gan_s0"]["bit_identical"]

    for name in ("exp1_residual.png", "exp2_generalization.png", "exp3_refinement.png", "exp3_crops.png"):
        assert (out / "figures" / name).stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "Experiment 1" in report and "Experiment 3" in report and "bit-identical" in report
    assert "LPIPS (VGG)" in report and "rFID" in report


def test_spectral_error_sees_blur_but_not_identity():
    rng = np.random.default_rng(0)
    x = np.clip(rng.normal(0, 0.5, (2, 32, 32, 3)), -1, 1).astype(np.float32)
    blurred = (x + np.roll(x, 1, 1) + np.roll(x, 1, 2) + np.roll(x, (1, 1), (1, 2))) / 4
    same_abs, same_signed = measure.spectral_error(x, x)
    blur_abs, blur_signed = measure.spectral_error(x, blurred)
    assert np.allclose(same_abs, 0) and np.allclose(same_signed, 0)
    assert np.all(blur_abs > 3) and np.all(blur_signed < -3)  # blur removes high-frequency energy


def test_lpips_and_rfid_go_through_the_evaluation_modules(tmp_path):
    """With weights files (random here), the study's LPIPS and rFID equal the metrics modules' own."""
    import jax
    import jax.numpy as jnp

    from dcae_jax.metrics import fid as fid_lib
    from dcae_jax.metrics import lpips as lpips_lib

    lpips_vars = jax.jit(lpips_lib.LPIPS(net="vgg").init)(jax.random.key(0), *[jnp.zeros((1, 64, 64, 3))] * 2)
    lpips_lib.save_lpips_weights(lpips_vars, tmp_path / "lpips.npz", "vgg")
    fid_lib.save_fid_weights(fid_lib.init_fid_variables(0), tmp_path / "fid.npz")
    rng = np.random.default_rng(0)
    ref = rng.uniform(-1, 1, (16, 64, 64, 3)).astype(np.float32)
    pred = np.clip(0.7 * ref + rng.normal(0, 0.1, ref.shape), -1, 1).astype(np.float32)
    p = measure.Perceptual(str(tmp_path / "lpips.npz"), str(tmp_path / "fid.npz"))

    module, variables = lpips_lib.load_lpips(tmp_path / "lpips.npz")
    np.testing.assert_allclose(p.lpips(ref, pred), np.asarray(jax.jit(module.apply)(variables, ref, pred)), rtol=1e-5)
    net, fid_vars = fid_lib.load_fid_inception(tmp_path / "fid.npz")
    features = jax.jit(net.apply)
    stats = [fid_lib.FeatureStats().update(np.asarray(features(fid_vars, x))) for x in (ref, pred)]
    expected = fid_lib.frechet_distance(*stats[0].mu_sigma(), *stats[1].mu_sigma())
    assert p.rfid(ref, pred) == pytest.approx(expected, rel=1e-6)


def test_rfid_views_single_center_view_is_the_adm_center_crop(tmp_path):
    """One view at zoom 1 is exactly the evaluation's ADM center crop; more views are distinct crops of one scale."""
    from PIL import Image

    from dcae_jax.data import images as image_io

    rng = np.random.default_rng(0)
    for size in ((97, 61), (50, 120)):  # landscape and portrait
        img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        (one,) = measure.adm_views(img, 32, 1, zoom=1.0)
        np.testing.assert_array_equal(one, image_io.pil_to_array(image_io.center_crop_adm(img, 32)))
        views = measure.adm_views(img, 32, 3, zoom=1.5)
        assert [v.shape for v in views] == [(32, 32, 3)] * 3
        assert not np.array_equal(views[0], views[1]) and not np.array_equal(views[1], views[2])


def test_rfid_uses_exact_statistics_of_every_view(tmp_path):
    """Reference statistics passed in equal recomputed ones, and the padded tail of a batch is not counted."""
    from dcae_jax.metrics import fid as fid_lib

    fid_lib.save_fid_weights(fid_lib.init_fid_variables(0), tmp_path / "fid.npz")
    rng = np.random.default_rng(1)
    ref = rng.uniform(-1, 1, (19, 32, 32, 3)).astype(np.float32)  # 16 + 3: one padded batch
    pred = np.clip(ref + rng.normal(0, 0.2, ref.shape), -1, 1).astype(np.float32)
    p = measure.Perceptual("", str(tmp_path / "fid.npz"))
    stats = p.features(ref).stats
    assert stats.count == 19
    direct = fid_lib.FeatureStats().update(
        np.concatenate([np.asarray(p._fid(ref[:16])), np.asarray(p._fid(ref[3:]))[13:]])
    )
    np.testing.assert_allclose(stats.mean, direct.mean, rtol=1e-6)
    # The cached reference (with its covariance root) gives what recomputing it gives.
    assert p.rfid(ref, pred, p.features(ref)) == p.rfid(ref, pred)


def test_a_folder_without_train_and_val_is_refused_before_anything_runs(photo_folder, tmp_path):
    """A flat photo folder would train and score on the same images: one line, exit 2, nothing written."""
    from dcae_jax import reproduce

    flat = tmp_path / "flat"
    shutil.copytree(photo_folder / "train", flat)
    out = tmp_path / "out"
    assert reproduce.main([f"--data={flat}", f"--out={out}", "--scale=smoke"]) == 2
    assert not out.exists()
    with pytest.raises(
        FileNotFoundError, match=r"flat: the study trains on train/ .* missing \['train/', 'val/ or validation/'\]"
    ):
        experiments.run(str(flat), out, "smoke")
    named = tmp_path / "named"  # validation/ is the other name of the held-out split (data.pipeline.SPLIT_DIRS)
    for split in ("train", "validation"):
        shutil.copytree(photo_folder / ("val" if split == "validation" else split), named / split)
    experiments.check_data_folder(named)
