"""Every file path a user gives, local or `gs://`: one path type (`etils.epath.Path`), atomic writes that keep their
guarantee on object storage, and the one-trainer workdir lock.

Local paths and Cloud Storage URLs go through the same calls: `etils.epath` speaks gs:// through TensorFlow's GCS
file system when TensorFlow is installed (as it is with our requirements) and through gcsfs otherwise
(`EPATH_USE_TF=false`). orbax, tensorstore and grain read and write gs:// natively. What object storage lacks is an
atomic rename, so writes are atomic differently there: a single object upload becomes visible whole or not at all,
so remote files are written in one request, while local files are written to a temporary file and renamed.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import pathlib
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator

from etils import epath

Path = epath.Path
PathLike = str | os.PathLike

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
SCHEMES = ("gs",)


def path(value: PathLike, flag: str = "path") -> epath.Path:
    """`value` (a local path or gs://bucket/...) as a path; other URL schemes are refused with the flag's name.

    pathlib would read "gs://bucket/run" as the relative folder "gs:/bucket/run" and keep a pod's checkpoints on each
    worker's own disk, lost with the VM: every user path goes through here instead.
    """
    s = os.fspath(value)
    m = _URL.match(s)
    if m and m.group(1).lower() not in SCHEMES:
        raise ValueError(f"{flag}={s!r}: unsupported URL scheme {m.group(1)!r}; use a local path or gs://bucket/...")
    if m and not s[m.end() :].strip("/"):
        raise ValueError(f"{flag}={s!r}: name a bucket, e.g. gs://my-bucket/run")
    return epath.Path(s) if m else epath.Path(s).expanduser().absolute()  # (absolute() would make gs:// local)


def local_only(value: PathLike, flag: str, why: str) -> pathlib.Path:
    """`value` as a local path, for the few folders that are local by design; a URL is refused, saying `why`."""
    s = os.fspath(value)
    if _URL.match(s):
        raise ValueError(f"{flag}={s!r}: must be a local path ({why})")
    return pathlib.Path(s).expanduser()


def is_remote(p: PathLike) -> bool:
    """True for object-storage paths (gs://), which have no rename, append or file lock."""
    return bool(_URL.match(os.fspath(p)))


def write_bytes_atomic(p: PathLike, data: bytes) -> epath.Path:
    """Writes `data` so that readers see the old file or the new one, never a partial one: one upload on object
    storage, a temporary file beside `p` renamed over it locally."""
    p = path(p)
    if is_remote(p):
        p.write_bytes(data)
        return p
    tmp = os.fspath(p.with_name(f".{p.name}.tmp{os.getpid()}"))
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before it replaces the old file (a power cut keeps one of the two)
        os.replace(tmp, os.fspath(p))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p


def write_text_atomic(p: PathLike, text: str) -> epath.Path:
    return write_bytes_atomic(p, text.encode())


def size(p: PathLike) -> int:
    """The size of the file `p` in bytes (local or gs://)."""
    p = path(p)
    return os.stat(os.fspath(p)).st_size if not is_remote(p) else int(p.stat().length)


def append_line(p: PathLike, line: str) -> None:
    """Appends one line. Object storage has no append: the (small) object is rewritten whole, in one upload."""
    p = path(p)
    if not is_remote(p):
        with open(os.fspath(p), "a") as f:
            f.write(line.rstrip("\n") + "\n")
        return
    old = p.read_text() if p.exists() else ""
    p.write_text(old + line.rstrip("\n") + "\n")


def save_figure(fig, p: PathLike, **kwargs) -> epath.Path:
    """A matplotlib figure as PNG, written atomically (local or gs://)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **kwargs)
    return write_bytes_atomic(p, buf.getvalue())


def copytree(src: PathLike, dst: PathLike) -> epath.Path:
    """Copies the folder `src` to `dst`; either side may be local or gs://. Subfolders first, JSON files last: a
    model folder's config is what makes it loadable, so an interrupted copy is refused rather than half-read."""
    src, dst = path(src), path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    children = sorted(src.iterdir(), key=lambda c: (not c.is_dir(), c.suffix == ".json", c.name))
    for child in children:
        if child.is_dir():
            copytree(child, dst / child.name)
        else:
            write_bytes_atomic(dst / child.name, child.read_bytes())
    return dst


def upload_file(local: PathLike, dst: PathLike) -> epath.Path:
    """Copies the local file `local` to `dst` (local or gs://) atomically, streaming (no whole-file copy in memory)."""
    dst = path(dst)
    if not is_remote(dst):
        tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
        try:
            shutil.copyfile(os.fspath(local), os.fspath(tmp))
            os.replace(os.fspath(tmp), os.fspath(dst))
        finally:
            if tmp.exists():
                tmp.unlink()
        return dst
    with open(os.fspath(local), "rb") as src, dst.open("wb") as out:  # one upload: visible whole or not at all
        shutil.copyfileobj(src, out, 16 << 20)
    return dst


@contextlib.contextmanager
def writing(dst: PathLike) -> Iterator[str]:
    """For writers that need a local file name (safetensors, numpy, PIL): yields a temporary local file; when the
    block ends without error it becomes `dst` atomically (renamed beside it locally, one upload to gs://)."""
    dst = path(dst)
    if is_remote(dst):
        with tempfile.TemporaryDirectory(prefix="dcae_jax_upload_") as d:
            local = os.path.join(d, dst.name)
            yield local
            upload_file(local, dst)
        return
    tmp = os.fspath(dst.with_name(f".{dst.name}.tmp{os.getpid()}"))
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # what open() gives: some writers (safetensors) create files 0600
        os.replace(tmp, os.fspath(dst))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    """The process's umask, read without setting it (/proc on Linux; os.umask, which sets it, elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def save_npz(p: PathLike, compressed: bool = False, **arrays) -> epath.Path:
    """`np.savez` (or `np.savez_compressed`) to `p` (local or gs://), atomically; creates the parent folder."""
    import numpy as np

    p = path(p)
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    p.parent.mkdir(parents=True, exist_ok=True)
    return write_bytes_atomic(p, buf.getvalue())


def load_npz(p: PathLike) -> dict:
    """Every array of the .npz file `p` (local or gs://), read whole. A file that is not one (numpy would call it
    pickled data), a truncated one, or one holding Python objects raises ValueError naming `p`."""
    import zipfile

    import numpy as np

    data = path(p).read_bytes()
    if not data.startswith(b"PK"):
        raise ValueError(f"{p}: not a .npz file ({len(data)} bytes, starting {data[:16]!r})")
    try:
        with np.load(io.BytesIO(data)) as f:
            return {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as err:
        raise ValueError(f"{p}: unreadable .npz file (truncated or damaged?): {err}") from err


def cache_dir() -> pathlib.Path:
    """Where remote files that a library can only read locally are copied (`$DCAE_JAX_CACHE` or ~/.cache/dcae_jax)."""
    env = os.environ.get("DCAE_JAX_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "dcae_jax"


def local_copy(p: PathLike) -> pathlib.Path:
    """`p` itself when local; for gs:// a local copy of the file or folder (kept in `cache_dir()/gs/...`, fetched
    again when a file's size changed), for readers that need a local file (safetensors, torch pickles)."""
    p = path(p)
    if not is_remote(p):
        return pathlib.Path(os.fspath(p))
    local = cache_dir() / "gs" / os.fspath(p).split("://", 1)[1]
    items = files(p) if p.is_dir() else [("", p)]
    for rel, src in items:
        dst = local / rel if rel else local
        size = src.stat().length
        if dst.is_file() and dst.stat().st_size == size:
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
        with src.open("rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, 16 << 20)
        os.replace(tmp, dst)
    return local


def rmtree(p: PathLike) -> None:
    p = path(p)
    if p.exists():
        p.rmtree()


def files(root: PathLike) -> Iterator[tuple[str, epath.Path]]:
    """(relative name, path) of every file under `root`, sorted; works on gs:// (where `glob("**")` does not)."""
    root = path(root)
    for child in sorted(root.iterdir(), key=lambda c: c.name):
        if child.is_dir():
            for rel, f in files(child):
                yield f"{child.name}/{rel}", f
        else:
            yield child.name, child


class WorkdirBusy(OSError):
    """Another trainer holds the workdir."""


@contextlib.contextmanager
def workdir_lock(workdir: PathLike, owner: bool = True):
    """One trainer per workdir: an exclusive `flock` on `<workdir>/.lock` for the life of the run.

    Two runs in one workdir would delete each other's in-progress checkpoints and overwrite each other's export
    and `eval.json`. The lock dies with its process (kill -9 included), so nothing stale is left. Only the
    `owner` (process 0 of a multi-process job) takes it. The file records who holds it, for the error message.
    Object storage has no lock: a gs:// workdir is the user's to keep to one run (the trainer says so once).
    """
    workdir = path(workdir)
    if not owner:
        yield
        return
    workdir.mkdir(parents=True, exist_ok=True)
    if is_remote(workdir):
        logging.info("%s is on object storage, which has no file lock: run one trainer at a time there", workdir)
        yield
        return
    lock = workdir / ".lock"
    f = open(os.fspath(lock), "a+")  # noqa: SIM115 (held for the whole run)
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


def check_writable_dir(p: PathLike, what: str) -> None:
    """Creates `p` if needed and proves it writable with a probe file, so a bad folder fails at once with its name
    (instead of inside a background checkpoint thread minutes later)."""
    p = path(p)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write_probe_{socket.gethostname()}_{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise PermissionError(
            f"{p}: the {what} folder is not writable ({type(err).__name__}: {getattr(err, 'strerror', None) or err})"
        ) from None
