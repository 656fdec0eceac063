"""Output folders given on the command line (local or mounted file systems only) and the one-trainer workdir lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import re
import socket
import time

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def local_dir(value: str, flag: str) -> pathlib.Path:
    """`value` as a path, refusing URLs such as gs://bucket/run.

    Our writers use local file APIs: pathlib would read "gs://bucket/run" as the relative folder
    "gs:/bucket/run" and keep a pod's checkpoints on each worker's own disk, lost with the VM. A bucket
    works when mounted (Cloud Storage FUSE, Filestore) at the same path on every host.
    """
    if _URL.match(value):
        raise ValueError(
            f"{flag}={value!r}: URLs are not supported (files are written with local file APIs); mount the "
            "bucket (e.g. Cloud Storage FUSE) at the same path on every host and pass that path"
        )
    return pathlib.Path(value)


class WorkdirBusy(OSError):
    """Another trainer holds the workdir."""


def write_text_atomic(path: str | os.PathLike, text: str) -> pathlib.Path:
    """Writes `text` to a temporary file beside `path`, then renames it over `path`: readers see the old file or the
    new one, never a partial one."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def workdir_lock(workdir: pathlib.Path, owner: bool = True):
    """One trainer per workdir: an exclusive `flock` on `<workdir>/.lock` for the life of the run.

    Two runs in one workdir would delete each other's in-progress checkpoints and overwrite each other's export
    and `eval.json`. The lock dies with its process (kill -9 included), so nothing stale is left. Only the
    `owner` (process 0 of a multi-process job) takes it. The file records who holds it, for the error message.
    """
    if not owner:
        yield
        return
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / ".lock"
    f = open(path, "a+")  # noqa: SIM115 (held for the whole run)
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise WorkdirBusy(
                f"{workdir} is in use by another trainer ({holder}); wait for it, stop it, or use another --workdir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        yield
    finally:
        f.close()  # releases the lock


def check_writable_dir(path: pathlib.Path, what: str) -> None:
    """Creates `path` if needed and proves it writable with a probe file, so a bad folder fails at once with its name
    (instead of inside a background checkpoint thread minutes later)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe_{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise PermissionError(
            f"{path}: the {what} folder is not writable ({type(err).__name__}: {err.strerror or err})"
        ) from None
