"""Multi-process CPU training through the real entry point: 2 and 4 local processes equal one process.

Every job is `python -m dcae_jax.main --config=configs/tiny_test.py:...` with the environment that
launch/local.sh sets (JAX_COORDINATOR_ADDRESS on loopback, JAX_NUM_PROCESSES, JAX_PROCESS_ID, K virtual
CPU devices per process); each process reads only its own records. The reference is one uninterrupted
single-process run. A 2-process job's checkpoint then continues in a new 2-process job (data iterator
restored), a 1-process x 8-device job and a 4-process x 1-device job (resharded; the data order restarts
at the step). A failing or hanging process gets the whole job killed.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from cpu_jobs import job_env

from dcae_jax.autoencoder.pretrained import DCAE

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/tiny_test.py:fsdp=2,batch=8,checkpoint_every=2"
JOB_TIMEOUT_S = 420


def run_job(
    workdir, processes: int, devices: int, *flags: str, per_process=lambda i: [], logdir=None, config=CONFIG
) -> None:
    """Runs one job of `processes` x `devices` (`--config=config`); kills every process if one fails or the job
    times out.

    The jobs keep the test run's persistent compilation cache (tests/conftest.py; a job with an earlier job's layout
    compiles nothing): CI time only. `logdir`: where the processes' logs go (default: the workdir).
    """
    logdir = pathlib.Path(logdir or workdir)
    logdir.mkdir(parents=True, exist_ok=True)
    env = job_env(devices, processes)
    cmd = [sys.executable, "-m", "dcae_jax.main", f"--config={config}", f"--workdir={workdir}", *flags]
    procs, logs = [], []
    try:
        for i in range(processes):
            log = (logdir / f"log_{processes}x{devices}_{i}.txt").open("w")
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [*cmd, *per_process(i)],
                    cwd=REPO,
                    env={**env, "JAX_PROCESS_ID": str(i)},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: killed with everything it started
                )
            )
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        # Every process that failed, each with its own log: when one fails the others may fail too (a collective
        # loses its peer) before the next poll, so which one exited first is not known; the test reads all of them.
        failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
        if failed or any(p.poll() is None for p in procs):
            what = "; ".join(f"process {i} exited with {procs[i].returncode}" for i in failed) or "timed out"
            logs_text = (
                "\n".join(
                    f"process {i} exited with {procs[i].returncode}:\n{_tail(logdir, processes, devices, i)}"
                    for i in failed
                )
                or f"process 0, still running:\n{_tail(logdir, processes, devices, 0)}"
            )
            pytest.fail(f"{processes}-process job: {what}\n{logs_text}")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for log in logs:
            log.close()


def _tail(workdir: pathlib.Path, processes: int, devices: int, i: int) -> str:
    text = (workdir / f"log_{processes}x{devices}_{i}.txt").read_text()
    return "\n".join(line for line in text.splitlines() if not line.startswith(("W0000", "I0000")))[-4000:]


def _params(path: pathlib.Path) -> dict:
    return DCAE.from_pretrained(path).variables


def _checkpoint_params(workdir, step: int) -> dict:
    import orbax.checkpoint as ocp

    from dcae_jax.runtime import paths

    path = paths.path(workdir) / "checkpoints" / str(step) / "state"
    with ocp.StandardCheckpointer() as ckptr:
        meta = dict(ckptr.metadata(path).item_metadata)
        state = ckptr.restore(path, jax.tree_util.tree_map(lambda m: np.zeros(m.shape, m.dtype), meta))
    return {"params": state["params"], "batch_stats": state["batch_stats"]}


def assert_close(a: dict, b: dict) -> None:
    """Parameters within 1e-5 absolute, BatchNorm running statistics within 1e-5 relative (values up to ~10)."""
    for name, relative in (("params", False), ("batch_stats", True)):
        la, lb = jax.tree_util.tree_leaves(a[name]), jax.tree_util.tree_leaves(b[name])
        assert len(la) == len(lb) > 0
        err = max(
            float(np.max(np.abs(x - y) / (np.abs(x) + 1 if relative else 1))) for x, y in zip(la, lb, strict=True)
        )
        assert err <= 1e-5, (name, err)


def _copy_checkpoint(src: pathlib.Path, dst: pathlib.Path, step: int) -> pathlib.Path:
    shutil.copytree(src / "checkpoints" / str(step), dst / "checkpoints" / str(step))
    return dst


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> pathlib.Path:
    """The reference: one process (2 devices), 4 steps uninterrupted, checkpoints at steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("single")
    run_job(workdir, 1, 2, "--config.num_steps=4")
    return workdir


@pytest.fixture(scope="module")
def two_proc(tmp_path_factory) -> pathlib.Path:
    """2 processes x 2 devices (mesh data 2 x fsdp 2), 2 steps."""
    workdir = tmp_path_factory.mktemp("two_proc")
    run_job(workdir, 2, 2, "--config.num_steps=2")
    return workdir


def test_two_processes_train_like_one(single, two_proc):
    assert_close(_params(two_proc / "export"), _checkpoint_params(single, 2))
    assert sorted(p.name for p in (two_proc / "checkpoints" / "2" / "data_iter").glob("*.json")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    result = json.loads((two_proc / "eval.json").read_text())
    assert result["num_images"] == 3  # every process's held-out images, not only process 0's


def test_two_processes_train_a_diffusion_model_and_sample_it_together(tiny_latents, tmp_path):
    """configs/uvit.py with a tiny UViT over 2 processes x 2 devices (data 2 x fsdp 2): both processes sample the
    grids together from the sharded parameters (process 0 loads the autoencoder with the others, decodes and
    writes), and the last grid is what one process samples from the export. (The run itself is not one process's:
    a global batch's rows are ordered by process, and the objective's noise follows the row.)"""
    from dcae_jax.data import images
    from dcae_jax.diffusion.pipeline import DCAEDiffusion, sample_grid

    config = (
        f"configs/uvit.py:model=uvit-tiny,latents={tiny_latents / 'latents'},autoencoder={tiny_latents / 'ae'},"
        "batch=8,steps=4,fsdp=2"
    )
    flags = [
        *("--config.sample.every=2", "--config.sample.steps=3", "--config.checkpoint_every=2"),
        *("--config.model.dtype=float32", "--config.model.remat=none", "--config.sharding.min_size=1"),
    ]
    run_job(tmp_path / "two", 2, 2, *flags, config=config)
    assert sorted(p.name for p in (tmp_path / "two" / "samples").iterdir()) == ["step0000002.png", "step0000004.png"]
    sample_grid(DCAEDiffusion.from_pretrained(tmp_path / "two" / "export"), tmp_path / "here.png")
    a, b = (images.load_image(p) for p in (tmp_path / "two" / "samples" / "step0000004.png", tmp_path / "here.png"))
    assert a.shape == (64, 256, 3) and float(np.max(np.abs(a - b))) * 127.5 <= 2.5


def test_checkpoint_continues_in_a_new_two_process_job(single, two_proc, tmp_path):
    workdir = _copy_checkpoint(two_proc, tmp_path, 2)
    run_job(workdir, 2, 2, "--config.num_steps=4")
    assert_close(_params(workdir / "export"), _params(single / "export"))
    log = (workdir / "log_2x2_0.txt").read_text()
    assert "resumed from step 2" in log and "the data restarts" not in log  # grain's iterator state restored


@pytest.mark.parametrize("processes,devices", [(1, 8), (4, 1)], ids=["1proc_x8dev", "4proc_x1dev"])
def test_checkpoint_reshards_to_another_layout(single, two_proc, tmp_path, processes, devices):
    workdir = _copy_checkpoint(two_proc, tmp_path, 2)
    run_job(workdir, processes, devices, "--config.num_steps=4")
    assert_close(_params(workdir / "export"), _params(single / "export"))
    log = (workdir / f"log_{processes}x{devices}_0.txt").read_text()
    assert "the data restarts at global batch 2" in log
    assert json.loads((workdir / "eval.json").read_text())["num_images"] == 3


def test_a_failing_process_stops_the_whole_job(tmp_path):
    """Process 1 cannot create its workdir (a user-facing error: one line, exit 2); process 0 would wait for it in a
    collective forever."""
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"(?s)process 1 exited with 2:.*main: error: .*/proc/not_writable"):
        run_job(tmp_path, 2, 1, per_process=lambda i: ["--workdir=/proc/not_writable"] if i == 1 else [])
    assert time.monotonic() - start < 120  # not the coordination service's minutes-long timeouts


@pytest.mark.gcs
def test_two_processes_checkpoint_to_gcs_and_restore(gcs_dir, tmp_path):
    """A 2-process job with its workdir in the bucket: orbax writes the sharded checkpoint there (each process its
    shards), the export reads back equal to it, and a new 2-process job resumes from it, iterators included."""
    from dcae_jax.runtime import paths

    workdir = f"{gcs_dir}/two_proc"
    run_job(workdir, 2, 1, "--config.num_steps=2", logdir=tmp_path / "a")
    ckpt = paths.path(workdir) / "checkpoints" / "2"
    assert (ckpt / "commit_success.txt").exists()  # orbax's commit mark on object storage (no rename there)
    assert sorted(p.name for p in (ckpt / "data_iter").glob("*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]
    assert_close(_params(f"{workdir}/export"), _checkpoint_params(workdir, 2))
    run_job(workdir, 2, 1, "--config.num_steps=4", logdir=tmp_path / "b")
    log = (tmp_path / "b" / "log_2x1_0.txt").read_text()
    assert "resumed from step 2" in log and "the data restarts" not in log
    assert json.loads((paths.path(workdir) / "eval.json").read_text())["num_images"] == 3
    assert not (REPO / "gs:").exists()


def test_sigterm_on_one_process_stops_every_process_at_one_checkpointed_step(tmp_path):
    """A pod's preemption notice reaches one host: JAX's preemption sync point stops both processes after the same
    step, with one checkpoint of it, each saying where (exit 143), instead of one dying mid-collective."""
    import re

    cmd = [sys.executable, "-m", "dcae_jax.main", f"--config={CONFIG}", "--config.num_steps=100000"]
    cmd += ["--config.checkpoint_every=100000", f"--workdir={tmp_path / 'w'}"]
    env = job_env(1, 2)
    logs = [tmp_path / f"log{i}.txt" for i in range(2)]
    procs = [
        subprocess.Popen(
            cmd, cwd=REPO, env={**env, "JAX_PROCESS_ID": str(i)}, stdout=log.open("w"), stderr=subprocess.STDOUT
        )
        for i, log in enumerate(logs)
    ]
    try:
        history, deadline = tmp_path / "w" / "metrics.jsonl", time.monotonic() + JOB_TIMEOUT_S
        while not (history.exists() and len(history.read_text().splitlines()) >= 2):
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, logs[0].read_text()[-3000:]
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [143, 143], [log.read_text()[-2000:] for log in logs]
    said = [
        re.findall(r"main: stopped by SIGTERM after step (\d+): its checkpoint is", log.read_text()) for log in logs
    ]
    assert said[0] == said[1] and len(said[0]) == 1, said
    assert sorted(p.name for p in (tmp_path / "w" / "checkpoints").iterdir() if p.name.isdigit()) == said[0]
