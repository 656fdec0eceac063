"""The environment of a JAX job that a test starts in its own processes (fake CPU devices, maybe several processes)."""

from __future__ import annotations

import os
import pathlib
import socket

REPO = pathlib.Path(__file__).resolve().parents[1]
# The test run's persistent compilation cache (tests/conftest.py) travels with every job; nothing else of the
# parent's JAX/XLA/TPU settings does.
KEEP = ("JAX_COMPILATION_CACHE_", "JAX_PERSISTENT_CACHE_")
# CI time: XLA:CPU's cheaper LLVM pipeline, about a third off every compile, which is most of what a CPU test spends.
# Measured on the 2-core Xeon, no cache: a tiny_test job 61.4 s with XLA's defaults, 48.2 s at level 0, 44.4 s at
# level 1; FID Inception on 40 images runs 10.7 / 13.5 s compiled by default, 20.1 / 22.1 s at level 0 (unoptimized
# code), 10.4 / 8.9 s at level 1. tests/conftest.py sets it for every run but the bigmem one.
FAST_COMPILE = "--xla_backend_optimization_level=1 --xla_llvm_disable_expensive_passes=true"


def with_fast_compile(flags: str) -> str:
    """An XLA_FLAGS value plus FAST_COMPILE, unless it sets the backend optimization level itself (that choice wins)."""
    return flags if "--xla_backend_optimization_level" in flags else f"{flags} {FAST_COMPILE}".strip()


def xla_flags(devices: int) -> str:
    """The run's XLA_FLAGS (its compile flags) with `devices` fake CPU devices (XLA takes a repeated flag's last)."""
    return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(devices: int, processes: int = 1, *, strip: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """os.environ without the parent's JAX_/XLA_/TPU_ variables (and any `strip` prefixes) but its compile flags, for
    `processes` x `devices` CPU devices; several processes get a fresh coordinator address. `extra` goes on top."""
    drop = ("JAX_", "XLA_", "TPU_", *strip)
    env = {k: v for k, v in os.environ.items() if k.startswith(KEEP) or not k.startswith(drop)}
    env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices))
    if processes > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}", JAX_NUM_PROCESSES=str(processes))
    return env | extra
