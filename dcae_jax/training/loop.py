"""The train loop both trainers share: compiling the step, and the cadence of logging, checkpoints, periodic work
and the non-finite stop. The trainers give it what differs (their step, their batches, their periodic work).

Cadence, for steps `start + 1 .. config.num_steps`:
* every step: the next global batch, the compiled step under `jax.transfer_guard("disallow")` (an accidental
  host round trip in the step is an error, not a slowdown), metrics merged on the device (no host sync);
* every `config.log_every` steps, at checkpoints and at the last step: the metrics are fetched (the one host
  sync; a non-finite loss stops the run naming the last good checkpoint), with throughput, skipped inputs and
  the learning rate the step's update applied, to TensorBoard and `metrics.jsonl`;
* every `config.checkpoint_every` steps and at the last step: a checkpoint (refused if the state is not
  finite); then `every` / `periodic` (evaluation, sample grids), except at the last step, which the trainer
  handles itself after the loop.
* on SIGTERM (a preemptible VM's notice, a scheduler's cancel): the step in flight finishes, a checkpoint of it is
  written, and the run stops with `Preempted` (exit status 143) naming it; the same command resumes there. Every
  process of a multi-process job stops at the same step (JAX's preemption sync point).
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
from absl import logging

from dcae_jax.metrics import history
from dcae_jax.runtime import compute, distributed, paths
from dcae_jax.training import checkpoints


def jit_step(
    step: Callable, state_shardings: Any, data_sharding: Any, num_extra: int = 0, donate: bool = True
) -> CompiledStep:
    """`step(state, batch, *extra)` compiled the way every train step is: state and batch sharded as given (the
    extra inputs, e.g. frozen perceptual networks, as they come), metrics replicated, and with `donate`
    (`config.donate_state`, default on) the old state's buffers reused for the new state: one state in device
    memory instead of two. Off only to keep the old state readable after a step (debugging)."""
    return CompiledStep(
        jax.jit(
            step,
            in_shardings=(state_shardings, data_sharding, *([None] * num_extra)),
            out_shardings=(state_shardings, None),
            donate_argnums=(0,) if donate else (),
        )
    )


class CompiledStep:
    """A jitted step that is compiled on its first call, before anything runs: then every process waits for the
    others (`distributed.barrier`), so that no process starts the step's collectives while another is still
    compiling (on CPU, gloo gives up on a peer 30 s late; a cache miss on one host easily costs more).
    `lower(*args)` and `trace(*args)` are the jitted function's, for ahead-of-time compilation and analysis
    (`trace(...).lower(lowering_platforms=...)` lowers for another platform)."""

    def __init__(self, jitted: Callable):
        self._jitted = jitted
        self._compiled = None

    def lower(self, *args):
        return self._jitted.lower(*args)

    def trace(self, *args):
        return self._jitted.trace(*args)

    def __call__(self, *args):
        if self._compiled is None:
            self._compiled = self._jitted.lower(*args).compile()
            distributed.barrier("train step compiled")
        return self._compiled(*args)


def create_writer(workdir) -> Any:
    """The run's metric writer: TensorBoard summaries and log lines on the main process, log lines elsewhere.

    clu's writers import TensorFlow (seconds): imported here, so importing a trainer (a benchmark, a tool) does not."""
    from clu import metric_writers

    return metric_writers.create_default_writer(str(workdir), just_logging=jax.process_index() != 0)


def logged_learning_rate(schedule: Callable[[int], Any], step: int) -> float:
    """The learning rate the update of training step `step` (1-based) applied: optax counts updates from 0."""
    return float(schedule(step - 1))


@dataclasses.dataclass
class Loop:
    """What a trainer gives the shared loop.

    `step(state, batch, step_number) -> (state, metrics)`; `next_batch() -> (global batch, inputs skipped)`;
    `schedule`: the optimizer's learning-rate schedule; `unit`: what a batch holds ("images", "latents"), for
    the throughput line; `name`: what the start line calls the run; `periodic(step, state)` runs every `every` steps but the last; `unused`: metrics that
    are zero by construction in this run and are not logged.
    """

    step: Callable[[Any, Any, int], tuple[Any, Any]]
    next_batch: Callable[[], tuple[Any, int]]
    schedule: Callable[[int], Any]
    unit: str
    name: str = "training"
    every: int = 0
    periodic: Callable[[int, Any], None] | None = None
    unused: frozenset[str] = frozenset()


class Preempted(SystemExit):
    """The run stopped on SIGTERM after checkpointing its last step (exit status 143, 128 + SIGTERM)."""

    def __init__(self, message: str):
        super().__init__(143)
        self.message = message

    def __str__(self) -> str:
        return self.message


@contextlib.contextmanager
def _preemption_notice() -> Iterator[Callable[[int], bool]]:
    """`reached(step) -> bool`: whether to stop after `step`. Several processes: JAX's preemption sync point (its
    coordination service notices SIGTERM on any process; all agree on the step). One process: a SIGTERM handler
    for the life of the loop (only where Python can install one: the main thread, the default handler)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        yield multihost_utils.reached_preemption_sync_point
        return
    noticed = threading.Event()
    own = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) in (
        signal.SIG_DFL,
        None,
    )
    if own:
        signal.signal(signal.SIGTERM, lambda signum, frame: noticed.set())
    try:
        yield lambda step: noticed.is_set()
    finally:
        if own:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run(loop: Loop, state: Any, config, *, mngr, data_iter, workdir, writer) -> tuple[Any, dict[str, float]]:
    """Trains from the state's step to `config.num_steps` (see the module docstring); returns (state, the last
    logged summary). Waits for the last checkpoint to be on disk before returning."""
    from clu import periodic_actions  # imports clu's writers, so TensorFlow: see create_writer

    is_main = jax.process_index() == 0
    report = periodic_actions.ReportProgress(num_train_steps=config.num_steps, writer=writer)
    start = int(jax.device_get(state.step))
    logging.info("%s from step %d to %d", loop.name, start, config.num_steps)
    with _preemption_notice() as preempted:  # on SIGTERM: checkpoint the step in flight, then stop
        metrics, last_summary = None, {}
        t_log, n_seen, skipped = time.time(), 0, 0
        for step in range(start + 1, config.num_steps + 1):
            batch, n_skipped = loop.next_batch()
            skipped += n_skipped
            with jax.transfer_guard("disallow"):  # the step itself never moves data between host and device
                state, step_metrics = loop.step(state, batch, step)
            if step == start + 1:  # the one wait outside log steps: a step that cannot run fails here, not later
                jax.block_until_ready(state)
            metrics = step_metrics if metrics is None else metrics.merge(step_metrics)
            n_seen += config.global_batch_size
            if is_main:
                report(step)
            is_last = step == config.num_steps
            if step % config.log_every == 0 or is_last or step % config.checkpoint_every == 0:
                summary = checkpoints.fetch_summary(metrics, step, mngr, workdir)
                summary = {k: v for k, v in summary.items() if k not in loop.unused}
                summary[f"{loop.unit}_per_sec"] = n_seen / max(time.time() - t_log, 1e-9)
                summary[f"skipped_{loop.unit}"] = float(distributed.process_sum(skipped))  # since the last log
                summary["learning_rate"] = logged_learning_rate(loop.schedule, step)
                writer.write_scalars(step, summary)
                if is_main:
                    history.append(workdir, step, summary)
                last_summary = summary
                metrics, t_log, n_seen, skipped = None, time.time(), 0, 0
            stop = not is_last and preempted(step)
            if step % config.checkpoint_every == 0 or is_last or stop:
                checkpoints.save_checked(mngr, step, state, data_iter, workdir)
            if stop:
                mngr.wait_until_finished()
                where = paths.path(workdir) / "checkpoints" / str(step)
                raise Preempted(
                    f"stopped by SIGTERM after step {step}: its checkpoint is {where}; rerun the same command to resume"
                )
            if loop.periodic is not None and loop.every and step % loop.every == 0 and not is_last:
                loop.periodic(step, state)
        mngr.wait_until_finished()
        return state, last_summary


class ConfigError(ValueError):
    """A config value a trainer cannot run with (a user mistake: reported in one message, no traceback)."""


def config_problems(config, mesh) -> list[str]:
    """The loop fields both trainers share, one line for each bad one (checked before anything is written or
    compiled; `raise_config_problems` raises them together with the trainer's own)."""
    problems = []
    for key in ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints", "global_batch_size"):
        v = config.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            problems.append(f"config.{key}={v!r} must be a positive integer")
    model = config.get("model") or {}
    for key, names in (("dtype", compute.DTYPES), ("remat", compute.REMAT_POLICIES), ("attention", compute.ATTENTION)):
        v = model.get(key)
        if v is not None and not (key == "remat" and isinstance(v, bool)) and v not in names:
            problems.append(f"config.model.{key}={v!r}; valid: {sorted(names)}")
    every = config.get("eval_every", 0)
    if not isinstance(every, int) or every < 0:
        problems.append(f"config.eval_every={every!r} must be 0 (off) or a positive integer")
    batch = config.get("global_batch_size")
    if isinstance(batch, int) and batch >= 1:
        if batch % jax.process_count():
            problems.append(f"config.global_batch_size={batch} is not divisible by the {jax.process_count()} processes")
        elif batch % mesh.size:
            problems.append(
                f"config.global_batch_size={batch} is not divisible by the {mesh.size} devices of the mesh "
                f"{dict(mesh.shape)} (the batch is split over all of them)"
            )
    return problems


def raise_config_problems(problems: list[str]) -> None:
    """One `ConfigError` naming every bad field, if any."""
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(p.strip() for p in problems))
