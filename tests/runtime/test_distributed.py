"""dcae_jax.runtime.distributed: what JAX_NUM_PROCESSES starts, and a real 2-process start-up detected by JAX itself."""

from __future__ import annotations

import errno
import json
import pathlib
import random
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from cpu_jobs import job_env

from dcae_jax.runtime import distributed

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def calls(monkeypatch):
    """Records jax.distributed.initialize / gloo selection instead of starting anything."""
    seen: list = []
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: seen.append(("initialize", kw)))
    monkeypatch.setattr(distributed, "_use_gloo_on_cpu", lambda: seen.append(("gloo", {})))
    for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    return seen


@pytest.mark.parametrize("value", [None, "", "1", "0"])
def test_single_process_starts_nothing(calls, monkeypatch, value):
    if value is not None:
        monkeypatch.setenv("JAX_NUM_PROCESSES", value)
    distributed.initialize_from_env()
    assert calls == []


def test_explicit_and_auto(calls, monkeypatch):
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    distributed.initialize_from_env()
    assert calls == [("gloo", {}), ("initialize", {"num_processes": 4, "process_id": 3})]
    calls.clear()
    monkeypatch.setenv("JAX_NUM_PROCESSES", " Auto ")
    distributed.initialize_from_env()
    assert calls == [("gloo", {}), ("initialize", {})]  # JAX detects the cluster (TPU metadata, Slurm, MPI)


def test_bad_values_name_the_variable(calls, monkeypatch):
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two': expected a process count or 'auto'"):
        distributed.initialize_from_env()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="needs JAX_PROCESS_ID"):
        distributed.initialize_from_env()
    assert calls == []


def _port_is_free(port: int) -> bool:
    """Free for IPv4 and, where the machine has it, IPv6 (JAX's coordinator listens on [::])."""
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::")):
        try:
            s = socket.socket(family)
        except OSError:  # no IPv6
            continue
        with s:
            try:
                s.bind((host, port))
            except OSError as err:
                if family == socket.AF_INET6 and err.errno == errno.EADDRNOTAVAIL:
                    continue
                return False
    return True


def _free_slurm_job_id() -> int:
    """A job id whose coordinator port (JAX's Slurm rule: 61440 + id % 4096, above Linux's ephemeral
    range) is free."""
    for _ in range(100):
        job_id = random.randrange(4096)
        if _port_is_free(61440 + job_id):
            return job_id
    pytest.skip("no free port in 61440-65535")


def _run_processes(worker: str, envs: list[dict], timeout: float) -> list[dict]:
    """Runs `python -c worker` once per environment, side by side; each must exit 0. Their last stdout lines (JSON)."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", worker], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for env in envs
    ]
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


WORKER = textwrap.dedent(
    """
    import json
    import numpy as np
    from dcae_jax.runtime import distributed
    distributed.initialize_from_env()
    import jax, jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
    local = np.arange(jax.local_device_count(), dtype=np.float32) + 10 * jax.process_index()
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
    print(json.dumps({"index": jax.process_index(), "count": jax.process_count(),
                      "devices": jax.device_count(), "sum": float(total)}))
    """
)


def test_auto_detects_a_cluster_for_real():
    """JAX_NUM_PROCESSES=auto with nothing but a (loopback) Slurm allocation's variables: JAX's own detection
    finds 2 processes and the coordinator, and a collective over the 4 devices of both gives the global sum."""
    job_id = _free_slurm_job_id()
    base = job_env(
        2,
        strip=("SLURM_", "OMPI_", "PMI_"),
        JAX_NUM_PROCESSES="auto",
        SLURM_JOB_ID=str(job_id),
        SLURM_STEP_NODELIST="127.0.0.1",
        SLURM_NTASKS="2",
    )
    results = _run_processes(WORKER, [{**base, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)} for i in range(2)], 180)
    results = sorted(results, key=lambda r: r["index"])
    # Device values: process 0 holds 0, 1; process 1 holds 10, 11.
    assert results == [{"index": i, "count": 2, "devices": 4, "sum": 22.0} for i in range(2)]


def test_process_sum_multi_process_path(monkeypatch):
    """The float64 bit-cast through process_allgather (simulated with 3 processes holding different values)."""
    from jax.experimental import multihost_utils

    x = np.array([[1e-300, np.pi], [2.0**60 + 1, -1 / 3]], np.float64)
    calls = []

    def fake_allgather(tree, tiled=False):
        calls.append(tree.dtype)
        bits = [np.asarray(tree), (x * 2).view(np.uint32), (x * 3).view(np.uint32)]
        return np.stack(bits)

    monkeypatch.setattr(jax, "process_count", lambda: 3)
    monkeypatch.setattr(multihost_utils, "process_allgather", fake_allgather)
    got = distributed.process_sum(x)
    assert calls == [np.uint32]
    np.testing.assert_array_equal(got, x + x * 2 + x * 3)  # exact float64 (no float32 demotion)


def test_single_process_collectives_are_plain_copies():
    """One process: sums are float64 copies, concatenation is the array itself, a barrier returns at once."""
    import jax.numpy as jnp

    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    got = distributed.process_sum(x)
    assert got.dtype == np.float64 and np.array_equal(got, x) and got is not x
    assert np.array_equal(distributed.process_concat(x, axis=1), x)
    np.testing.assert_array_equal(distributed.host_array(jnp.asarray(x)), x)
    distributed.barrier("nothing to wait for")


def test_process_concat_multi_process_path(monkeypatch):
    """Rows of 2 simulated processes end up side by side along the requested axis, in process order."""
    from jax.experimental import multihost_utils

    a = np.arange(4.0).reshape(2, 2)
    monkeypatch.setattr(distributed.jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x, tiled=False: np.stack([x, x + 10]))
    np.testing.assert_array_equal(distributed.process_concat(a, axis=1), np.concatenate([a, a + 10], axis=1))


LATE_WORKER = textwrap.dedent(
    """
    import json, os, time
    import numpy as np
    from dcae_jax.runtime import distributed, sharding
    distributed.initialize_from_env()
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh = sharding.make_mesh((2, 2), ("data", "fsdp"))  # data pairs span the processes, fsdp pairs do not
    if os.environ["CONNECT"] == "1":
        distributed.connect_collectives(mesh)
        distributed.connect_collectives(mesh)  # the same mesh again: a no-op
    if jax.process_index() == 1:
        time.sleep(float(os.environ["LATE_S"]))  # e.g. compiling or restoring without a cache hit
    g = np.arange(8, dtype=np.float32).reshape(2, 4)
    x = jax.make_array_from_callback(g.shape, NamedSharding(mesh, P("data", "fsdp")), lambda idx: g[idx])
    rep = NamedSharding(mesh, P())
    cols, total = jax.jit(lambda a: (a.sum(0), a.sum()), out_shardings=(rep, rep))(x)
    print(json.dumps({"cols": np.asarray(cols).tolist(), "total": float(total)}))
    """
)


def test_connected_collectives_wait_for_a_late_process():
    """A process reaching its first cross-process collective 32 s after the other: CPU collectives (gloo) give up
    on a peer 30 s late to a device group's first meeting ("Gloo context initialization failed", the CI failure
    of a resumed 2-process job; the same script without `connect_collectives` fails so, checked by hand), so
    the trainers connect every group of their mesh at start-up, after which a collective waits for a late peer
    up to XLA's 30-minute collective timeout. Both processes get the global sums."""
    base = job_env(
        2,
        2,
        CONNECT="1",
        LATE_S="32",
    )
    for result in _run_processes(LATE_WORKER, [{**base, "JAX_PROCESS_ID": str(i)} for i in range(2)], 240):
        assert result == {"cols": [4.0, 6.0, 8.0, 10.0], "total": 28.0}


def test_connect_collectives_is_a_no_op_in_one_process():
    from dcae_jax.runtime import sharding

    distributed.connect_collectives(sharding.make_mesh((-1,), ("data",)))
    assert distributed._connected == set()
