"""Multi-process start-up shared by the entry points (training, sampling)."""

from __future__ import annotations

import os

import jax


def initialize_from_env() -> None:
    """`jax.distributed.initialize` when launch/local.sh or launch/gpu_slurm.sh set JAX_NUM_PROCESSES > 1.

    The coordinator comes from JAX_COORDINATOR_ADDRESS. CPU processes need a cross-process collectives
    implementation chosen before the backend starts; gloo (over TCP) is set explicitly on CPU, where it is
    only jax 0.10's default, not a guarantee.
    """
    num_processes = int(os.environ.get("JAX_NUM_PROCESSES", "1"))
    if num_processes <= 1:
        return
    platforms = (jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")).lower().split(",")
    if "cpu" in platforms:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(num_processes=num_processes, process_id=int(os.environ["JAX_PROCESS_ID"]))
