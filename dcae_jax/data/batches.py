"""The batch runner: a dataset's fixed-shape evaluation batches fed to a jitted step over a data mesh.

Shared by the evaluation (`dcae_jax.metrics.evaluation`), FID reference statistics and the latent precompute
(`dcae_jax.data.precompute`): sources (`open_source`, `HeadSource`), this process's loader of global batches
(`make_loader`), the 1-D "data" mesh over all devices, and `run_batches`, which keeps one batch in flight while the
host consumes the previous one's outputs (this process's rows only, `local_rows`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from tqdm import tqdm


def data_mesh() -> Mesh:
    """All devices of all processes on one "data" axis."""
    from dcae_jax.runtime import sharding

    return sharding.make_mesh([-1], ["data"])


class HeadSource:
    """The first `n` records of a random-access source (for --max_images)."""

    def __init__(self, source, n: int):
        self._source, self._n = source, min(n, len(source))

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int):
        if not 0 <= index < self._n:
            raise IndexError(index)
        return self._source[index]

    def __repr__(self) -> str:
        return f"HeadSource({self._source!r}, {self._n})"


def open_source(data: str, split: str, max_images: int | None):
    from dcae_jax.data.pipeline import make_source

    source = make_source(data, split)
    if max_images is not None:
        if max_images <= 0:
            raise ValueError(f"--max_images must be positive, got {max_images}")
        source = HeadSource(source, max_images)
    return source


def global_batch_size(requested: int) -> int:
    """`requested` rounded up to a multiple of the device count (every device gets the same share)."""
    if requested <= 0:
        raise ValueError(f"--batch_size must be positive, got {requested}")
    n = jax.device_count()
    size = -(-requested // n) * n
    if size != requested and jax.process_index() == 0:
        print(f"batch size {requested} -> {size} (a multiple of {n} devices)", file=sys.stderr)
    return size


def make_loader(source, resolution: int, batch_size: int):
    """This process's share of `batch_size`-image global batches (padded entries have mask 0)."""
    from dcae_jax.data.pipeline import make_eval_loader

    return make_eval_loader(
        source,
        resolution=resolution,
        batch_size=batch_size // jax.process_count(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def local_rows(x: jax.Array) -> np.ndarray:
    """The rows of a batch-sharded array that live on this process, in order (its part of the global batch)."""
    if jax.process_count() == 1:
        return np.asarray(x)
    shards = {s.index[0].start or 0: s for s in x.addressable_shards}  # replicas share a start
    return np.concatenate([np.asarray(shards[k].data) for k in sorted(shards)])


def run_batches(
    loader: Iterable[dict[str, np.ndarray]],
    step: Callable[[jax.Array], Any],
    consume: Callable[[Any, dict[str, np.ndarray]], None],
    sharding: NamedSharding,
    total: int,
    desc: str,
) -> None:
    """Feeds every batch to `step` and its outputs (local rows) to `consume`, one batch ahead of the host work."""
    pending = None
    with tqdm(total=total, desc=desc, unit="batch", file=sys.stderr, disable=jax.process_index() != 0) as bar:
        for batch in loader:
            images = jax.make_array_from_process_local_data(sharding, np.asarray(batch["image"], np.float32))
            out = step(images)  # dispatched; the host handles the previous batch meanwhile
            if pending is not None:
                consume(jax.tree_util.tree_map(local_rows, pending[0]), pending[1])
                bar.update()
            pending = (out, batch)
        if pending is not None:
            consume(jax.tree_util.tree_map(local_rows, pending[0]), pending[1])
            bar.update()


__all__ = [
    "HeadSource",
    "data_mesh",
    "global_batch_size",
    "local_rows",
    "make_loader",
    "open_source",
    "run_batches",
]
