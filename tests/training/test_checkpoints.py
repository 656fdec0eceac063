"""Checkpoints: a full disk is refused before the write starts, with one clear message and the last one intact."""

from __future__ import annotations

import collections
import errno
import shutil
import subprocess

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
