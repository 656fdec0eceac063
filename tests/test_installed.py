"""The package works installed, outside the repository: `pip install` into a folder, then every command and the
study's config path run from another directory with no checkout on `sys.path`."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from tests.runtime.test_cli import COMMANDS

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("installed")
    src = root / "src"  # a copy: building in the checkout would leave build/ and *.egg-info there
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "requirements.txt"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "dcae_jax", src / "dcae_jax", ignore=shutil.ignore_patterns("__pycache__"))
    site = root / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site)]
    proc = subprocess.run([*cmd, str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return {"site": site, "cwd": elsewhere}


def _env(installed) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return env | {"PYTHONPATH": str(installed["site"]), "JAX_PLATFORMS": "cpu"}


def test_every_command_runs_from_the_installed_package(installed):
    env = _env(installed)
    where = subprocess.run(
        [sys.executable, "-c", "import dcae_jax; print(dcae_jax.__file__)"],
        cwd=installed["cwd"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.stdout.strip().startswith(str(installed["site"])), where.stdout + where.stderr
    procs = {
        m: subprocess.Popen(
            [sys.executable, "-m", m, "--help"],
            cwd=installed["cwd"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for m in COMMANDS
    }
    failed = {}
    for m, p in procs.items():
        out, err = p.communicate(timeout=600)
        if p.returncode != 0 or not ("usage" in (out + err).lower() or "flags" in (out + err).lower()):
            failed[m] = (p.returncode, err[-500:])
    assert not failed, failed


def test_the_study_builds_its_training_configs_outside_a_checkout(installed, tmp_path, genuine_weights):
    code = f"""
from dcae_jax.runtime import sharding
from dcae_jax.autoencoder import train
from dcae_jax.studies import experiments
s = experiments.SCALES["smoke"]
cfg = experiments.model_config(s, 4, 4)
for phase in (1, 2, 3):
    c = experiments.train_config(s, cfg, {str(tmp_path)!r}, phase=phase, steps=2, seed=0, init_from="")
    train.check_config(c, train.model_config(c), sharding.mesh_from_config(c))
    assert c.loss.lpips_weight == s.lpips_weight and c.loss.lpips_weights.endswith("lpips_alex.npz")
print("ok")
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=installed["cwd"], env=_env(installed), capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
