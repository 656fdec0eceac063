"""The batch runner's pieces: this process's rows of a sharded batch, the head of a source."""

import jax
import numpy as np
import pytest

from dcae_jax.data import batches


def test_local_rows_and_head_source(monkeypatch):
    mesh = batches.data_mesh()
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    x = np.arange(4 * jax.device_count() * 3, dtype=np.float32).reshape(-1, 3)
    arr = jax.make_array_from_process_local_data(sharding, x)
    np.testing.assert_array_equal(batches.local_rows(arr), x)
    monkeypatch.setattr(jax, "process_count", lambda: 2)  # the multi-process path: this process's shards, in order
    np.testing.assert_array_equal(batches.local_rows(arr), x)
    monkeypatch.undo()

    head = batches.HeadSource(list("abcdef"), 4)
    assert len(head) == 4 and [head[i] for i in range(4)] == list("abcd")
    with pytest.raises(IndexError):
        head[4]
    assert len(batches.HeadSource(list("ab"), 10)) == 2
    with pytest.raises(ValueError, match="--max_images must be positive"):
        batches.open_source("bundled", "validation", 0)
