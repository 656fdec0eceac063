"""`python -m dcae_jax.fetch_weights`: lists the files it made (or found), refuses unknown names."""

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "dcae_jax.fetch_weights", *args], cwd=REPO, env=env, capture_output=True, text=True
    )


def test_existing_files_are_kept_and_listed(genuine_weights):
    out_dir = pathlib.Path(genuine_weights["lpips_alex"]).parent
    before = {p: p.stat().st_mtime_ns for p in out_dir.glob("*.npz")}
    proc = _run(f"--out_dir={out_dir}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("lpips_alex", "lpips_vgg", "fid_inception"):
        assert str(out_dir / f"{name}.npz") in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in out_dir.glob("*.npz")} == before  # nothing rebuilt


def test_unknown_name_is_a_usage_error(tmp_path):
    proc = _run(f"--out_dir={tmp_path}", "--names=lpips_squeeze")
    assert proc.returncode != 0
    assert "unknown --names ['lpips_squeeze']" in proc.stderr
    assert not list(tmp_path.iterdir())
