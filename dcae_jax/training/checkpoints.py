"""Checkpoints of a training state (any flax struct with `step`, `params`, ...) and its data iterator.

Layout: `<workdir>/checkpoints/<step>/{state, data_iter}` (orbax; grain writes one iterator state per process,
`data_iter/process_<i>-of-<n>.json`). A job with the same process count restores the iterators exactly; a job with
another count restarts its iterator at the checkpoint's global batch instead (`input_pipeline.TrainIterator`:
the global data order does not depend on the process count). Nothing non-finite is ever saved: `save_checked`
stops the run instead, after the checkpoint being written is on disk, naming the last good one.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Iterator
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from dcae_jax.runtime import distributed, paths


def manager(workdir: paths.PathLike, keep: int):
    """The orbax CheckpointManager of `<workdir>/checkpoints` (local or gs://), keeping the newest `keep` steps."""
    import orbax.checkpoint as ocp

    directory = paths.path(workdir, "workdir") / "checkpoints"
    if jax.process_index() == 0:
        paths.check_writable_dir(directory, "checkpoint")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(directory, options=options)


def state_bytes(state: Any) -> int:
    """Bytes this process writes for `state` in a checkpoint (its addressable shards, each replica once)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(state):
        if isinstance(leaf, jax.Array):
            total += sum(s.data.nbytes for s in leaf.addressable_shards if s.replica_id == 0)
        else:
            total += np.asarray(leaf).nbytes
    return total


def check_free_space(mngr, step: int, state: Any) -> None:
    """Refuses to start checkpoint `step` when the disk lacks room for it (a full disk mid-write ends in a storm
    of tracebacks from the writer threads); waits for the previous checkpoint first, so it is intact on disk."""
    import errno
    import shutil

    directory = str(mngr.directory)
    if paths.is_remote(directory):  # object storage: no disk to fill
        return
    need = int(state_bytes(state) * 1.05) + (1 << 20)  # + metadata, the iterator state, filesystem blocks
    free = shutil.disk_usage(directory).free
    if free >= need:
        return
    mngr.wait_until_finished()
    latest = mngr.latest_step()
    kept = f"checkpoint {latest} is intact" if latest is not None else "no checkpoint has been written yet"
    raise OSError(
        errno.ENOSPC,
        f"{directory}: {free / 2**20:.1f} MiB free, checkpoint {step} needs about {need / 2**20:.1f} MiB; {kept}. "
        "Free some space (or move the workdir) and rerun the same command to resume",
    )


def save(mngr, step: int, state: Any, data_iter) -> None:
    """Writes `state` (and the data iterator's position) as checkpoint `step` (asynchronously), after checking
    that the disk has room for it."""
    import grain.python as grain
    import orbax.checkpoint as ocp

    check_free_space(mngr, step, state)
    items = {"state": ocp.args.StandardSave(flax.serialization.to_state_dict(state))}
    if data_iter is not None:
        items["data_iter"] = grain.PyGrainCheckpointSave(data_iter)
    mngr.save(step, args=ocp.args.Composite(**items))


def _restore_items(mngr, step: int, abstract_state: Any, data_iter) -> Any:
    import grain.python as grain
    import orbax.checkpoint as ocp

    target = flax.serialization.to_state_dict(abstract_state)
    items = {"state": ocp.args.StandardRestore(target)}
    if data_iter is not None:
        items["data_iter"] = grain.PyGrainCheckpointRestore(data_iter)
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
    return flax.serialization.from_state_dict(abstract_state, restored["state"])


# tensorstore's codes for a truncated file, corrupt bytes and a missing chunk (not transient or other errors)
_STORAGE_ERROR = re.compile(r"(OUT_OF_RANGE|DATA_LOSS|NOT_FOUND): ")


class _AbandonedReads(logging.Filter):
    """asyncio's "Task exception was never retrieved" for the other reads of a failed restore (the same storage
    error, logged again when their tasks are collected)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else getattr(record, "args", None)
        text = f"{record.getMessage()} {exc or ''}"
        return not ("exception was never retrieved" in text and _STORAGE_ERROR.search(text))


def _drop_closed_loop_noise() -> None:
    """After a failed orbax read, tensorstore finishes the other reads in flight and hands them to orbax's event
    loop, which the failure already closed: dozens of "Event loop is closed" RuntimeErrors reach
    `sys.unraisablehook` (and asyncio logs the other reads' errors once more), burying the one real error. These
    filters drop that noise alone (installed once)."""
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _AbandonedReads) for f in asyncio_log.filters):
        asyncio_log.addFilter(_AbandonedReads())
    previous = sys.unraisablehook
    if getattr(previous, "_dcae_jax_closed_loop_filter", False):
        return

    def hook(unraisable) -> None:
        err = unraisable.exc_value
        if isinstance(err, RuntimeError) and str(err) == "Event loop is closed":
            return
        previous(unraisable)

    hook._dcae_jax_closed_loop_filter = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


@contextlib.contextmanager
def reading(what: str, remedy: str = "") -> Iterator[None]:
    """Around an orbax restore: a storage error (tensorstore's `OUT_OF_RANGE: Error reading ...` of a truncated
    file, a missing chunk, ...; orbax may wrap it in a bare Exception) becomes one ValueError that starts with
    `what` (the checkpoint or export), says it is damaged and ends with `remedy`; other errors pass unchanged. The
    abandoned reads' noise is dropped (`_drop_closed_loop_noise`)."""
    _drop_closed_loop_noise()
    try:
        yield
    except Exception as err:
        cause: BaseException | None = err
        while cause is not None:
            first = (str(cause).strip().splitlines() or [""])[0]
            if _STORAGE_ERROR.search(first):
                msg = f"{what} is damaged or incomplete (a truncated or interrupted write or copy?): {first}"
                raise ValueError(msg + (f". {remedy}" if remedy else "")) from err
            cause = cause.__cause__ or cause.__context__
        raise


def saved_process_count(mngr, step: int) -> int | None:
    """How many processes wrote the step's iterator states (grain: `data_iter/process_<i>-of-<n>.json`)."""
    files = list((mngr.directory / str(step) / "data_iter").glob("process_*-of-*.json"))
    return int(files[0].name.removesuffix(".json").rsplit("-of-", 1)[1]) if files else None


def restore(mngr, step: int, abstract_state: Any, data_iter) -> Any:
    """Checkpoint `step` onto `abstract_state`'s shapes and shardings (any mesh); the data iterator continues
    exactly where it was when this job has the process count that wrote it, else at global batch `step`."""
    saved_by = saved_process_count(mngr, step)
    older = [s for s in mngr.all_steps() if s < step]
    folder = mngr.directory / str(step)
    remedy = f"Delete {folder} to resume from checkpoint {max(older)}" if older else f"Delete {folder} to start over"
    with reading(f"checkpoint {step} ({folder})", remedy):
        if saved_by == jax.process_count():
            return _restore_items(mngr, step, abstract_state, data_iter)
        state = _restore_items(mngr, step, abstract_state, None)
    data_iter.restart_at(step)
    logging.warning(
        "checkpoint %d has data-iterator states of %s processes, this job has %d: the data restarts at global "
        "batch %d of the same order (exact unless records were dropped)",
        step,
        saved_by,
        jax.process_count(),
        step,
    )
    return state


def abstract_with_shardings(state_shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying `shardings`: the restore / lowering target of a state."""
    return jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state_shapes, shardings
    )


def host_variables(tree: Any) -> Any:
    """Sharded arrays -> full numpy arrays on every process, one leaf at a time: at most one leaf is ever gathered
    whole on a device, never the whole model."""
    return jax.tree_util.tree_map(distributed.host_array, tree)


def stop_non_finite(what: str, step: int, mngr, workdir: paths.PathLike) -> None:
    """Waits for any checkpoint still being written (so it really is on disk), then stops naming the newest one."""
    mngr.wait_until_finished()
    latest = mngr.latest_step()
    kept = f"the last good checkpoint, step {latest}, is in" if latest is not None else "no checkpoint was written to"
    raise FloatingPointError(
        f"{what} at step {step}; stopped, nothing non-finite saved; {kept} {paths.path(workdir) / 'checkpoints'}"
    )


def fetch_summary(metrics, step: int, mngr, workdir: paths.PathLike) -> dict[str, float]:
    """The accumulated metrics on the host (a log step's one device fetch); stops on a non-finite loss.

    Stopping before the step's checkpoint keeps the last good one as the latest, so a rerun resumes there.
    """
    summary = {k: float(v) for k, v in metrics.compute().items()}
    if not np.isfinite(summary["loss"]):
        stop_non_finite(f"non-finite loss {summary['loss']}", step, mngr, workdir)
    return summary


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.array(True)


def save_checked(mngr, step: int, state: Any, data_iter, workdir: paths.PathLike) -> None:
    """Checkpoints `state` unless a parameter (or EMA / BatchNorm statistic) is non-finite; then stops instead.

    A loss can be finite while the update it produced is not: this check (one scalar fetch per checkpoint) keeps
    such a state out of checkpoints and exports.
    """
    watched = {k: getattr(state, k) for k in ("params", "ema_params", "batch_stats") if hasattr(state, k)}
    if not bool(_all_finite(watched)):
        stop_non_finite("non-finite parameters after the update", step, mngr, workdir)
    save(mngr, step, state, data_iter)
