"""`python -m dcae_jax.convert_weights`: one mode at a time, FID between stats files, one-line errors."""

import os
import pathlib
import subprocess
import sys

import numpy as np

from dcae_jax.metrics.fid import frechet_distance, save_stats

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "dcae_jax.convert_weights", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)


def test_fid_distance_between_two_stats_files(tmp_path):
    rng = np.random.default_rng(1)
    stats = []
    for name in ("a", "b"):
        x = rng.normal(size=(50, 6))
        stats.append((x.mean(0), np.cov(x, rowvar=False)))
        save_stats(tmp_path / f"{name}.npz", *stats[-1])
    proc = _run(f"--fid_distance={tmp_path / 'a.npz'},{tmp_path / 'b.npz'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == f"FID: {frechet_distance(*stats[0], *stats[1]):.6f}\n"


def test_modes_and_missing_files_are_one_line_errors(tmp_path):
    proc = _run("--lpips=vgg", f"--fid_inception={tmp_path / 'x.pth'}", f"--out={tmp_path / 'o.npz'}")
    assert proc.returncode == 2 and "give exactly one of" in proc.stderr
    proc = _run(f"--fid_inception={tmp_path / 'missing.pth'}", f"--out={tmp_path / 'o.npz'}")
    assert proc.returncode == 2, proc.stderr
    assert "missing.pth: not found" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.npz").exists()
