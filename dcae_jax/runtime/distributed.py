"""Multi-process start-up shared by the entry points (training, sampling, latent precompute)."""

from __future__ import annotations

import os

import jax

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
