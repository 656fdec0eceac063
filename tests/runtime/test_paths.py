"""Output folders refuse URLs (which pathlib would turn into a local relative folder) with a clear error."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

from dcae_jax.runtime import paths

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_local_dir():
    assert paths.local_dir("/mnt/shared/run", "--workdir") == pathlib.Path("/mnt/shared/run")
    assert paths.local_dir("runs/a:b", "--out") == pathlib.Path("runs/a:b")  # a colon alone is a file name
    for url in ("gs://bucket/run", "s3://b/r", "file:///tmp/x", "gcs+grpc://b"):
        with pytest.raises(ValueError, match=re.escape(f"--workdir={url!r}: URLs are not supported")):
            paths.local_dir(url, "--workdir")


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["-m", "dcae_jax.main", f"--config={REPO}/configs/tiny_test.py", "--workdir=gs://b/run"],
            "main: error: --workdir=",
        ),
        (["-m", "dcae_jax.sample", "--model=m", "--out=gs://bucket/samples"], "sample: error: --out="),
        (
            ["-m", "dcae_jax.precompute_latents", "--model=m", "--data=bundled", "--resolution=64", "--out=gs://b/l"],
            "precompute_latents: error: --out=",
        ),
    ],
)
def test_entry_points_refuse_urls(tmp_path, args, message):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "URLs are not supported" in result.stderr
    assert not any(tmp_path.iterdir())  # nothing written, in particular no local "gs:" folder


def test_write_text_atomic_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    from dcae_jax.runtime import paths

    target = tmp_path / "r.json"
    paths.write_text_atomic(target, "old")
    paths.write_text_atomic(target, "new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    (tmp_path / "dir.json").mkdir()  # a failing rename keeps the old state and cleans its temporary up
    with pytest.raises(OSError):
        paths.write_text_atomic(tmp_path / "dir.json", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.json", "r.json"]
