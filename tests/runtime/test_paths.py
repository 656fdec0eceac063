"""User paths: local or gs:// through one type, other URL schemes refused by name, atomic writes on both."""

from __future__ import annotations

import os
import pathlib
import re
import stat
import subprocess
import sys

import numpy as np
import pytest

from dcae_jax.runtime import paths

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_path_accepts_local_and_gs_and_refuses_other_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.fspath(paths.path("/mnt/shared/run", "--workdir")) == "/mnt/shared/run"
    assert os.fspath(paths.path("runs/a:b", "--out")) == str(tmp_path / "runs/a:b")  # a colon alone is a file name
    gs = paths.path("gs://bucket/run", "--workdir")
    assert os.fspath(gs) == "gs://bucket/run" and os.fspath(gs / "x") == "gs://bucket/run/x"  # never made local
    assert paths.is_remote(gs) and not paths.is_remote(tmp_path)
    for url in ("s3://b/r", "file:///tmp/x", "gcs+grpc://b", "http://host/x"):
        with pytest.raises(ValueError, match=re.escape(f"--workdir={url!r}: unsupported URL scheme")):
            paths.path(url, "--workdir")
    with pytest.raises(ValueError, match="name a bucket"):
        paths.path("gs://", "--out")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "args, message",
    [
        (["-m", "dcae_jax.main", f"--config={REPO}/configs/tiny_test.py", "--workdir=s3://b/run"], "main: error: "),
        (["-m", "dcae_jax.sample", "--model=m", "--out=s3://bucket/samples"], "sample: error: --out="),
    ],
)
def test_entry_points_refuse_unsupported_urls(tmp_path, args, message):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "unsupported URL scheme 's3'" in result.stderr, result.stderr[-2000:]
    assert not any(tmp_path.iterdir())  # nothing written, in particular no local "s3:" folder


def test_write_text_atomic_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "r.json"
    paths.write_text_atomic(target, "old")
    paths.write_text_atomic(target, "new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    (tmp_path / "dir.json").mkdir()  # a failing rename keeps the old state and cleans its temporary up
    with pytest.raises(OSError):
        paths.write_text_atomic(tmp_path / "dir.json", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.json", "r.json"]


def test_writing_commits_only_a_finished_file(tmp_path):
    target = tmp_path / "w.bin"
    with pytest.raises(RuntimeError), paths.writing(target) as local:
        pathlib.Path(local).write_bytes(b"partial")
        raise RuntimeError("killed mid-write")
    assert not any(tmp_path.iterdir())
    with paths.writing(target) as local:
        pathlib.Path(local).write_bytes(b"whole")
    assert target.read_bytes() == b"whole" and sorted(p.name for p in tmp_path.iterdir()) == ["w.bin"]


def _exercise(root) -> None:
    """The path operations the commands use, on `root` (local or gs://)."""
    root = paths.path(root)
    paths.check_writable_dir(root / "a", "test")
    paths.write_text_atomic(root / "a" / "x.json", '{"v": 1}')
    paths.write_text_atomic(root / "a" / "x.json", '{"v": 2}')
    assert (root / "a" / "x.json").read_text() == '{"v": 2}'
    paths.append_line(root / "a" / "log.jsonl", "1")
    paths.append_line(root / "a" / "log.jsonl", "2")
    assert (root / "a" / "log.jsonl").read_text() == "1\n2\n"
    paths.save_npz(root / "a" / "sub" / "z.npz", compressed=True, w=np.arange(5.0))
    np.testing.assert_array_equal(paths.load_npz(root / "a" / "sub" / "z.npz")["w"], np.arange(5.0))
    with paths.writing(root / "a" / "sub" / "big.bin") as local:
        pathlib.Path(local).write_bytes(bytes(range(256)) * 4096)
    assert paths.size(root / "a" / "sub" / "big.bin") == 256 * 4096
    paths.copytree(root / "a", root / "b")
    assert [rel for rel, _ in paths.files(root / "b")] == ["log.jsonl", "sub/big.bin", "sub/z.npz", "x.json"]
    local = paths.local_copy(root / "b")
    assert (local / "sub" / "big.bin").read_bytes() == bytes(range(256)) * 4096
    paths.rmtree(root / "b")
    assert not (root / "b").exists()
    with paths.workdir_lock(root / "run"):  # local: flock; object storage has none (and no empty folders)
        paths.write_text_atomic(root / "run" / "f", "x")
    assert (root / "run" / "f").read_text() == "x"


def test_path_operations_local(tmp_path):
    _exercise(tmp_path)


@pytest.mark.gcs
@pytest.mark.parametrize("backend", ["tensorflow", "gcsfs"])
def test_path_operations_gcs(backend, gcs_dir, tmp_path, monkeypatch):
    """Both of etils.epath's Cloud Storage backends: TensorFlow's (the default with our requirements) and gcsfs."""
    monkeypatch.setenv("EPATH_USE_TF", "true" if backend == "tensorflow" else "false")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DCAE_JAX_CACHE", str(tmp_path / "cache"))
    _exercise(gcs_dir)
    assert paths.local_copy(f"{gcs_dir}/a/x.json").read_text() == '{"v": 2}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # nothing landed in a local "gs:" folder


def test_local_by_design_folders_refuse_urls(tmp_path, monkeypatch, capsys):
    """The per-host weights cache and the reproduction study's folders are local by design: a gs:// value is one
    clear line and exit 2, never a local folder named "gs:"."""
    from dcae_jax import fetch_weights, reproduce

    monkeypatch.chdir(tmp_path)
    assert fetch_weights.main(["--out_dir=gs://b/weights", "--nodownload"]) == 2
    assert "--out_dir='gs://b/weights': must be a local path (a per-host cache" in capsys.readouterr().err
    assert reproduce.main(["--data=/photos", "--out=gs://b/study"]) == 2
    assert "--out='gs://b/study': must be a local path (the study reads and writes a local folder)" in (
        capsys.readouterr().err
    )
    assert not any(tmp_path.iterdir())


def test_a_file_written_through_writing_gets_the_usual_mode(tmp_path):
    """Some writers (safetensors) create their file 0600; the result has the mode open() would give it."""
    with paths.writing(tmp_path / "w.safetensors") as tmp:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600))
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o666 & ~mask
