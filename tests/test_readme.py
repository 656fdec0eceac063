"""README's short commands run exactly as written (paths under /tmp/ moved into the test's folder); the long ones
are checked by `tests/runtime/test_cli.py` (each is a real command and takes the flags README gives it)."""

from __future__ import annotations

import os
import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHORT = [
    "python -m dcae_jax.fetch_weights",
    "launch/local.sh -n 2 --cpu-devices 2 configs/tiny_test.py:steps=4,fsdp=2 /tmp/tiny_2proc",
]


@pytest.mark.parametrize("command", SHORT)
def test_readme_short_commands_run_as_written(command, tmp_path, genuine_weights):
    assert command in (REPO / "README.md").read_text(), "README no longer shows this command: update SHORT"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    line = command.replace("/tmp/", f"{tmp_path}/")
    proc = subprocess.run(line, shell=True, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    out = proc.stdout + proc.stderr
    if "fetch_weights" in command:
        assert all(pathlib.Path(p).is_file() for p in genuine_weights.values()) and "used by default" in out
    else:
        assert (tmp_path / "tiny_2proc" / "export" / "dcae_config.json").is_file(), out[-3000:]
