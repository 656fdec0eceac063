"""Multi-process machinery, the one home for it: start-up from the launchers' environment, and the host-side
collectives the library uses (exact float64 sums, row gathers, whole arrays on every host, barriers).

Every function is a no-op or a plain copy in a single process, so callers never branch on the process count.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

AUTO = "auto"


def initialize_from_env() -> None:
    """Starts JAX's distributed system as the environment says, before any computation.

    JAX_NUM_PROCESSES (set by our launchers; unset means one process):
      - an integer > 1 (launch/local.sh, launch/gpu_slurm.sh): explicit, with JAX_PROCESS_ID and the
        coordinator from JAX_COORDINATOR_ADDRESS;
      - "auto" (launch/tpu_pod.sh): `jax.distributed.initialize()` detects everything itself on Cloud TPU,
        Slurm, Open MPI or Kubernetes. A TPU slice's hosts find each other without it, but orbax's
        multi-host checkpoint barriers need the distributed client, so a pod must start it;
      - unset, "0" or "1": nothing to start.
    CPU processes need a cross-process collectives implementation chosen before the backend starts; gloo
    (over TCP) is set explicitly on CPU, where it is only jax 0.10's default, not a guarantee.
    """
    value = os.environ.get("JAX_NUM_PROCESSES", "").strip()
    if value.lower() == AUTO:
        _use_gloo_on_cpu()
        jax.distributed.initialize()
        return
    try:
        num_processes = int(value or "1")
    except ValueError:
        raise ValueError(f"JAX_NUM_PROCESSES={value!r}: expected a process count or {AUTO!r}") from None
    if num_processes <= 1:
        return
    if "JAX_PROCESS_ID" not in os.environ:
        raise ValueError(f"JAX_NUM_PROCESSES={num_processes} needs JAX_PROCESS_ID (this process's index)")
    _use_gloo_on_cpu()
    jax.distributed.initialize(num_processes=num_processes, process_id=int(os.environ["JAX_PROCESS_ID"]))


def _use_gloo_on_cpu() -> None:
    platforms = (jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")).lower().split(",")
    if "cpu" in platforms:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def process_sum(x: Any) -> np.ndarray:
    """Exact float64 sum of a host array over all JAX processes (the identical result on every process).

    `process_allgather` would demote float64 to float32 without `jax_enable_x64`, so the bits travel as uint32.
    """
    x = np.asarray(x, dtype=np.float64)
    if jax.process_count() == 1:
        return x.copy()
    from jax.experimental import multihost_utils

    bits = np.ascontiguousarray(x, dtype=np.float64).view(np.uint32)
    gathered = np.asarray(multihost_utils.process_allgather(bits, tiled=False))  # (P, ...) uint32
    parts = np.ascontiguousarray(gathered).view(np.float64).reshape((jax.process_count(), *x.shape))
    return np.sum(parts, axis=0)


def process_concat(x: Any, axis: int = 0) -> np.ndarray:
    """Every process's host array `x` (same shape on each), concatenated along `axis` in process order."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return np.concatenate(list(np.asarray(multihost_utils.process_allgather(x, tiled=False))), axis=axis)


def host_array(x: Any) -> np.ndarray:
    """A (possibly sharded, multi-host) jax.Array as one full numpy array on every process."""
    if jax.process_count() == 1 or not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# A barrier waits this long for the slowest process (e.g. one compiling a full-size model without a cache hit).
BARRIER_TIMEOUT_S = 3600
_barrier_calls: dict[str, int] = {}


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (e.g. nobody reads a file before it is written).

    It waits in JAX's coordination service (up to `BARRIER_TIMEOUT_S`; a process that dies fails it at once),
    not in a device collective: on CPU a gloo collective gives up when one process is 30 s behind the others.
    Every process calls the same barriers in the same order; the n-th call of `name` is its own barrier.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed  # the client jax.distributed.initialize started

    client = jax_distributed.global_state.client
    if client is None:  # processes that found each other without the distributed service (a bare TPU slice)
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
        return
    n = _barrier_calls[name] = _barrier_calls.get(name, 0) + 1
    client.wait_at_barrier(f"dcae_jax/{name}/{n}", BARRIER_TIMEOUT_S * 1000)


_connected: set[tuple] = set()


def connect_collectives(mesh: jax.sharding.Mesh) -> None:
    """Opens, in every process at once, the cross-process channels a job over `mesh` uses.

    XLA connects each group of devices that a collective spans (every subset of mesh axes; all devices in
    `jax.devices()` order, which orbax's cross-host agreement uses) the first time a computation needs it,
    and on CPU gloo gives up when a peer is 30 s late to that first meeting: a process still compiling or
    restoring without a cache hit easily is. Here every process first waits at a coordination-service
    barrier, then runs one tiny sum over each group, so later collectives find their groups connected and
    wait for a late peer up to XLA's 30-minute collective timeout. A no-op in one process and for a mesh already connected.
    """
    if jax.process_count() == 1:
        return
    key = (tuple(d.id for d in mesh.devices.flat), mesh.axis_names, mesh.devices.shape)
    if key in _connected:
        return
    import itertools

    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    barrier("connect collectives")
    multihost_utils.sync_global_devices("dcae_jax connect collectives")  # all devices, jax.devices() order
    names = tuple(mesh.axis_names)
    spec = P(*names)
    ones = jax.make_array_from_callback(
        mesh.devices.shape, NamedSharding(mesh, spec), lambda idx: np.ones((1,) * len(names), np.float32)
    )
    for r in range(1, len(names) + 1):
        for axes in itertools.combinations(names, r):
            if all(mesh.shape[a] == 1 for a in axes):
                continue
            total = jax.jit(
                jax.shard_map(lambda x, axes=axes: jax.lax.psum(x, axes), mesh=mesh, in_specs=spec, out_specs=spec)
            )
            compiled = total.lower(ones).compile()
            barrier("connect collectives")
            jax.block_until_ready(compiled(ones))
    _connected.add(key)
