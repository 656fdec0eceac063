"""Output folders given on the command line: local or mounted file systems only."""

from __future__ import annotations

import pathlib
import re

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
