"""`python -m dcae_jax.aot`: the train step compiled for a TPU slice by libtpu, on a machine without TPUs.

Runs in subprocesses so that libtpu's compile-only client never loads into the test process.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from dcae_jax.training import aot

pytest.importorskip("libtpu", reason="the TPU compiler comes with jax[tpu] (requirements-test.txt)")

REPO = pathlib.Path(__file__).resolve().parents[1]


def _aot(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "dcae_jax.aot", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "name,expected,chips",
    [
        ("v5p-64", "v5p:2x4x4", 32),  # v4/v5p: the number counts TensorCores, 2 per chip
        ("v4-32", "v4:2x2x4", 16),
        ("v5litepod-16", "v5e:4x4", 16),  # v5e/v6e: the number counts chips
        ("v5e-4", "v5e:2x2", 4),
        ("v6e-8", "v6e:2x4", 8),
        ("v5p:2x2x4", "v5p:2x2x4", 16),
    ],
)
def test_topology_names(name, expected, chips):
    topo = aot.parse_topology(name)
    assert (topo.name, topo.chips) == (expected, chips)


@pytest.mark.parametrize(
    "name,message",
    [
        ("v5p-6", "known sizes"),
        ("v5p-63", "v5p-N counts TensorCores, 2 per chip, so N must be an even number"),
        ("v5e:2x2x2", "v5e needs 2 dimensions"),
        ("tpu-8", "--topology='tpu-8'"),
        ("v6e-3", "known sizes"),
    ],
)
def test_bad_topology_names_are_clear_errors(name, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        aot.parse_topology(name)


def test_phases_from_a_per_phase_config_and_from_a_chain():
    from configs import dcae, quickstart

    arg = "variant=f32c32,phase=3"
    got = aot.phase_configs(dcae.get_config(arg), f"configs/dcae.py:{arg}", {"global_batch_size": 32}, [1, 2])
    assert [(n, c.phase, c.resolution, c.global_batch_size) for n, c in got] == [
        ("phase1", 1, 256, 32),  # re-read with phase=N; the --config.x=y overrides are kept
        ("phase2", 2, 1024, 32),
    ]
    chain = quickstart.get_config()
    assert [n for n, _ in aot.phase_configs(chain, "configs/quickstart.py", {}, [])] == ["phase1", "phase2", "phase3"]
    assert [n for n, _ in aot.phase_configs(chain, "configs/quickstart.py", {}, [2])] == ["phase2"]
    with pytest.raises(ValueError, match="the chain has phases"):
        aot.phase_configs(chain, "configs/quickstart.py", {}, [4])


def test_a_bad_phase_is_refused_before_any_phase_compiles():
    proc = _aot("--config=configs/tiny_test.py", "--topology=v5e-4", "--phases=1,4")
    assert proc.returncode == 2 and "aot: error: --phases=1,4: the phases are 1, 2 and 3" in proc.stderr
    assert "compiling" not in proc.stderr.lower() and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "report.json"
    proc = _aot("--config=configs/tiny_test.py", "--topology=v5e-4", "--mfu=0.5", f"--json={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_tiny_phase1_report_on_v5e_4(tiny_report):
    proc, report = tiny_report
    assert "| phase1 | 32 | 8 / 2 |" in proc.stdout and "TPU v5e v5e:2x2 (4 chips" in proc.stdout
    assert report["chips"] == 4 and report["chip"]["hbm_gib"] == 16 and report["chip"]["peak_tflops"] == 197
    r = report["phases"]["phase1"]
    assert r["arguments"] > 0 and r["temporaries"] > 0 and r["outputs"] > 0 and r["fits"]
    parts = r["arguments"] + r["outputs"] - r["aliased"] + r["temporaries"] + r["code"]
    assert r["total"] == parts < r["hbm"] == 16 * 2**30
    assert r["flops_per_chip"] > 1e6 and r["flops_global"] == 4 * r["flops_per_chip"]
    assert r["step_s"] == pytest.approx(r["flops_per_chip"] / (197e12 * 0.5))
    assert r["images_per_s"] == pytest.approx(8 / r["step_s"])


def test_remat_as_config_lowers_the_tpu_step_memory(tiny_report, tmp_path):
    """config.model.remat=full: the TPU compiler (which schedules for memory, unlike XLA:CPU) keeps fewer
    activations for the backward pass and recomputes them: fewer temporaries, more FLOPs than the same step
    without remat."""
    out = tmp_path / "remat.json"
    proc = _aot("--config=configs/tiny_test.py", "--config.model.remat=full", "--topology=v5e-4", f"--json={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    base, remat = tiny_report[1]["phases"]["phase1"], json.loads(out.read_text())["phases"]["phase1"]
    assert remat["temporaries"] < 0.9 * base["temporaries"], (remat["temporaries"], base["temporaries"])
    assert remat["flops_per_chip"] > 1.1 * base["flops_per_chip"]
    assert remat["arguments"] == base["arguments"]  # the same state: remat changes no parameter
    # The launch hint is a command to paste: the config as given, and its overrides.
    hint = "launch/tpu_pod.sh --tpu NAME --zone ZONE configs/tiny_test.py WORKDIR --config.model.remat=full"
    assert hint in proc.stdout


def test_exceeding_hbm_exits_nonzero_with_a_clear_message():
    # 256 images of 256x256 per v5e chip: the TPU compiler itself runs out of the 16 GiB.
    proc = _aot("--config=configs/tiny_test.py:batch=1024,resolution=256", "--topology=v5e-4")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "phase1 does not fit in 16 GiB of HBM per chip on v5e:2x2" in proc.stderr
    assert "out of HBM" in proc.stdout


def test_uvit_train_step_compiles_for_a_tpu_slice(tmp_path):
    """The UViT step (bf16, remat, FSDP over 2 of 4 chips) on f64c128-shaped latents, for v5e 2x2."""
    out = tmp_path / "uvit.json"
    proc = _aot("--config=configs/uvit.py:model=uvit-s,batch=16,fsdp=2,depth=2", "--topology=v5e-4", f"--json={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ((name, row),) = json.loads(out.read_text())["phases"].items()
    assert name == "uvit-s-depth2 (epsilon)" and row["resolution"] == "8x8x128" and row["fits"]
    assert row["per_chip_batch"] == 4 and row["flops_per_chip"] > 0
    # Per chip: the 3-block UViT-S (~10M params) with AdamW + EMA, halved by FSDP, in float32.
    assert 30 * 2**20 < row["arguments"] < 200 * 2**20
