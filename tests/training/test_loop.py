"""dcae_jax.training.loop: the compiled train step, and two processes where one is far behind the other.

The step's cross-process collectives must not start while a peer is still compiling: on CPU, gloo gives up on a
peer 30 s late ("Gloo context initialization failed: ... GetKeyValue() timed out"), which a cache miss on one host
or a loaded machine easily causes (it failed a CI run). The real 2-process test below makes process 1 arrive 40 s
late at a barrier and compile the step 40 s slower; both must finish with the right global sum.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
from cpu_jobs import job_env
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from dcae_jax.training import loop

REPO = pathlib.Path(__file__).resolve().parents[2]
LATE_S = 40  # more than gloo's 30 s


def _step(state, batch):
    total = jnp.sum(batch)
    return state + total, {"sum": total}


def test_the_step_runs_compiled_and_donates():
    mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,))
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    step = loop.jit_step(_step, replicated, split)
    state = jax.device_put(jnp.zeros(()), replicated)
    batch = jax.device_put(jnp.arange(4.0), split)
    new_state, metrics = step(state, batch)
    assert float(new_state) == float(metrics["sum"]) == 6.0
    assert state.is_deleted()  # the old state was donated
    new_state, _ = step(new_state, batch)  # the same executable again
    assert float(new_state) == 12.0
    assert "sum" in step.lower(new_state, batch).as_text()  # ahead-of-time lowering still works


WORKER = textwrap.dedent(
    """
    import json, os, time
    import numpy as np
    from dcae_jax.runtime import distributed
    distributed.initialize_from_env()
    import jax, jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from dcae_jax.training import loop

    late = float(os.environ["LATE_S"]) if jax.process_index() == 1 else 0.0
    time.sleep(late)  # a slow start (e.g. a checkpoint restore) before a barrier
    distributed.barrier("late start")
    distributed.barrier("late start")  # the same name again is a new barrier

    def step(state, batch):
        time.sleep(late)  # runs while tracing, i.e. compiling: process 1 compiles `late` seconds longer
        total = jnp.sum(batch)  # a cross-process all-reduce
        return state + total, {"sum": total}

    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    compiled_step = loop.jit_step(step, replicated, split)
    local = np.arange(jax.local_device_count(), dtype=np.float32) + 10 * jax.process_index()
    batch = jax.make_array_from_process_local_data(split, local)
    state = jax.device_put(jnp.zeros((), jnp.float32), replicated)
    for _ in range(2):
        state, metrics = compiled_step(state, batch)
    print(json.dumps({"index": jax.process_index(), "state": float(state), "sum": float(metrics["sum"])}))
    """
)


def test_the_loop_fields_are_checked_together():
    import ml_collections
    import pytest

    class FakeMesh:  # a 2-device mesh's size and shape, without 2 devices
        size, shape = 2, {"data": 2, "fsdp": 1}

    fields = {"num_steps": 4, "log_every": 2, "checkpoint_every": 2, "keep_checkpoints": 1, "global_batch_size": 4}
    config = ml_collections.ConfigDict({**fields, "model": {"dtype": "float32"}})
    assert loop.config_problems(config, FakeMesh()) == []
    config.global_batch_size, config.log_every, config.model.dtype = 3, 0, "fp8"
    problems = loop.config_problems(config, FakeMesh())
    assert problems == [
        "config.log_every=0 must be a positive integer",
        "config.model.dtype='fp8'; valid: ['bfloat16', 'float32']",
        "config.global_batch_size=3 is not divisible by the 2 devices of the mesh {'data': 2, 'fsdp': 1} (the batch "
        "is split over all of them)",
    ]
    with pytest.raises(loop.ConfigError, match=r"^invalid config:\n  config.phase=4 bad\n  config.log_every=0"):
        loop.raise_config_problems(["config.phase=4 bad", *problems])
    loop.raise_config_problems([])


def test_a_process_far_behind_does_not_break_the_collectives():
    env = job_env(2, 2, LATE_S=str(LATE_S))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER],
            env={**env, "JAX_PROCESS_ID": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=4 * LATE_S + 120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    total = float(np.sum(np.arange(2.0)) + np.sum(np.arange(2.0) + 10))  # devices 0, 1 and 10, 11
    assert [r["index"] for r in results] == [0, 1]
    assert all(r["sum"] == total and r["state"] == 2 * total for r in results)


def test_importing_a_trainer_does_not_import_tensorflow():
    """clu's metric writers import TensorFlow (~5 s): only a run that writes pays for it (loop.create_writer), not a
    benchmark, a tool or a test that imports a trainer for its step."""
    code = "import sys, dcae_jax.autoencoder.train, dcae_jax.diffusion.train; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=job_env(1), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_the_writer_writes_tensorboard_summaries(tmp_path):
    writer = loop.create_writer(tmp_path)
    writer.write_scalars(3, {"train/loss": 0.5})
    writer.flush()
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_sigterm_checkpoints_the_step_in_flight_and_the_same_command_resumes(tmp_path):
    """A preemptible VM's notice: the run writes a checkpoint of its last step, says where, exits 143; the rerun
    resumes from that step and nothing is trained twice."""
    import os
    import re
    import signal
    import time

    workdir = tmp_path / "w"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    def cmd(steps: int) -> list[str]:
        config = f"--config=configs/tiny_test.py:steps={steps},checkpoint_every=100000"
        return [sys.executable, "-m", "dcae_jax.main", config, f"--workdir={workdir}"]

    proc = subprocess.Popen(cmd(100000), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        history = workdir / "metrics.jsonl"
        while not (history.exists() and len(history.read_text().splitlines()) >= 2):  # log_every=1: trained 2 steps
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-3000:]
    m = re.search(r"main: stopped by SIGTERM after step (\d+): its checkpoint is (\S+); rerun the same command", err)
    assert m and "Traceback" not in err, err[-3000:]
    step = int(m[1])
    assert m[2] == str(workdir / "checkpoints" / str(step)) and (workdir / "checkpoints" / str(step)).is_dir()
    assert [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()] == [step]
    again = subprocess.run(cmd(step + 1), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from step {step}" in again.stderr
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, step + 2)), steps  # each step logged once: none lost, none repeated
