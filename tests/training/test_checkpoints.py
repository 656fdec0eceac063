"""Checkpoints: a full disk is refused before the write starts, with one clear message and the last one intact; a
damaged checkpoint is one message naming the one to resume from."""

from __future__ import annotations

import collections
import errno
import gc
import logging
import shutil
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import pytest
from flax import struct

from dcae_jax.training import checkpoints


@struct.dataclass
class _State:
    step: int
    params: dict


def _state(step: int) -> _State:
    return _State(step=step, params={"w": jnp.full((256, 256), float(step))})  # 256 KiB


def test_a_checkpoint_that_does_not_fit_is_refused_before_writing(tmp_path, monkeypatch):
    mngr = checkpoints.manager(tmp_path, keep=3)
    checkpoints.save(mngr, 1, _state(1), None)
    mngr.wait_until_finished()
    assert checkpoints.state_bytes(_state(1)) == 256 * 256 * 4 + 8  # the array, and `step` as an int64
    real = shutil.disk_usage
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 30, (1 << 30) - (1 << 20), 1 << 20))  # 1 MiB
    with pytest.raises(OSError, match=r"1\.0 MiB free, checkpoint 2 needs about 1\.3 MiB; checkpoint 1 is intact") as e:
        checkpoints.save(mngr, 2, _state(2), None)
    assert e.value.errno == errno.ENOSPC
    monkeypatch.setattr(shutil, "disk_usage", real)
    assert mngr.all_steps() == [1] and not list((tmp_path / "checkpoints").glob("2*"))


def test_a_real_full_disk_gives_one_message(tmp_path):
    """On a 1 MiB tmpfs (where this machine lets us mount one) the refusal happens for real."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root and mount permission)")
    try:
        mngr = checkpoints.manager(mnt, keep=3)
        with pytest.raises(OSError, match="no checkpoint has been written yet"):
            checkpoints.save(mngr, 1, _State(step=1, params={"w": jnp.zeros((1024, 1024))}), None)  # 4 MiB
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def _truncate_largest_chunk(folder) -> None:
    """Cuts the biggest data file of an orbax (OCDBT) checkpoint to 100 bytes: an interrupted copy."""
    f = max((p for p in folder.rglob("*") if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)
    f.write_bytes(f.read_bytes()[:100])


def test_a_damaged_checkpoint_is_one_message_naming_the_one_to_resume_from(tmp_path, monkeypatch):
    """Not orbax's wrapped Exception and dozens of "Event loop is closed" tracebacks from the abandoned reads."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
    mngr = checkpoints.manager(tmp_path, keep=3)
    for step in (1, 2):  # random values: a constant array compresses to a few bytes
        w = jax.random.normal(jax.random.key(step), (256, 256))
        checkpoints.save(mngr, step, _State(step=step, params={"w": w}), None)
    mngr.wait_until_finished()
    folder = tmp_path / "checkpoints" / "2"
    _truncate_largest_chunk(folder)
    want = rf"^checkpoint 2 \({folder}\) is damaged or incomplete .*OUT_OF_RANGE: .*Delete {folder} to resume from checkpoint 1$"
    with pytest.raises(ValueError, match=want):
        checkpoints.restore(mngr, 2, _state(0), None)
    time.sleep(1)  # the abandoned reads finish
    gc.collect()
    assert not [e for e in seen if "Event loop is closed" in str(e)]
    noise, other = RuntimeError("Event loop is closed"), RuntimeError("something else")
    for err in (noise, other):  # the filter in place drops the noise alone
        sys.unraisablehook(types.SimpleNamespace(exc_value=err))
    assert seen == [other]
    log = logging.getLogger("asyncio")  # the other reads' errors, logged again when their tasks are collected

    def record(msg):
        return log.makeRecord("asyncio", logging.ERROR, __file__, 1, msg, (), None)

    assert not log.filter(
        record("Task exception was never retrieved\nfuture: <Task ... ValueError('OUT_OF_RANGE: Error")
    )
    assert log.filter(record("Task exception was never retrieved\nfuture: <Task ... KeyError('mine')>"))


def test_other_restore_errors_pass_unchanged():
    with pytest.raises(KeyError, match="nothing to do with storage"), checkpoints.reading("x"):
        raise KeyError("nothing to do with storage")
