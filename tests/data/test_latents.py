"""The latents folder format: shard writer / checker, `LatentDataset` validation, and the training loader."""

import json
import pickle

import numpy as np
import pytest

from dcae_jax.data import latents as fmt

SHAPE = (2, 2, 3)
RUN_ID = "0123456789abcdef"
# Three shards of 4 source records; some records unreadable (left out): 3 + 4 + 3 = 10 examples.
SHARDS = [(0, 4, [0, 1, 3]), (4, 8, [4, 5, 6, 7]), (8, 11, [8, 9, 10])]


def _latent(i: int) -> np.ndarray:
    """Example `i`'s latent: its source index in every element (recoverable from a batch)."""
    return np.full(SHAPE, i, np.float32) + np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) / 100


def _ids(batch) -> list[int]:
    return [int(v) for v in np.rint(np.asarray(batch["latent"])[:, 0, 0, 0])]


def make_folder(root, shards=SHARDS, num_classes=3):
    root.mkdir(parents=True, exist_ok=True)
    infos = []
    for k, (start, stop, keep) in enumerate(shards):
        infos.append(
            fmt.write_shard(
                root,
                k,
                len(shards),
                latents=np.stack([_latent(i) for i in keep]),
                labels=np.array([i % num_classes for i in keep], np.int32),
                indices=np.array(keep, np.int64),
                start=start,
                stop=stop,
                run_id=RUN_ID,
            )
        )
    meta = {
        "format": fmt.FORMAT,
        "version": fmt.VERSION,
        "latent_shape": list(SHAPE),
        "layout": "NHWC",
        "dtype": "float32",
        "scaling_factor": 0.25,
        "num_classes": num_classes,
        "class_names": [f"c{i}" for i in range(num_classes)],
        "num_examples": sum(i["num_examples"] for i in infos),
        "shards": [{"file": i["file"], "num_examples": i["num_examples"]} for i in infos],
    }
    fmt.write_json_atomic(root / fmt.METADATA, meta)
    return meta


@pytest.fixture
def folder(tmp_path):
    make_folder(tmp_path / "lat")
    return tmp_path / "lat"


ALL = [i for _, _, keep in SHARDS for i in keep]


def test_dataset_random_access(folder):
    ds = fmt.LatentDataset(folder)
    assert len(ds) == 10 and ds.latent_shape == SHAPE and ds.scaling_factor == 0.25 and ds.num_classes == 3
    assert ds.class_names == ["c0", "c1", "c2"] and ds.metadata["num_examples"] == 10
    for k, i in enumerate(ALL):
        e = ds[k]
        assert e["latent"].dtype == np.float32 and e["latent"].shape == SHAPE and e["label"].dtype == np.int32
        np.testing.assert_array_equal(e["latent"], _latent(i))
        assert int(e["label"]) == i % 3
    with pytest.raises(IndexError):
        ds[10]
    clone = pickle.loads(pickle.dumps(ds))  # grain workers: the memory maps are not pickled, re-opened there
    np.testing.assert_array_equal(clone[9]["latent"], _latent(10))
    raw = np.load(folder / "shard-00001-of-00003.npy")  # the format is plain numpy
    assert raw["latent"].shape == (4, *SHAPE) and raw["index"].tolist() == [4, 5, 6, 7]


def test_shard_index_and_check(folder):
    info = json.loads((folder / "shard-00000-of-00003.json").read_text())
    assert (info["num_examples"], info["num_unreadable"], info["start"], info["stop"]) == (3, 1, 0, 4)
    z = np.stack([_latent(i) for i in (0, 1, 3)]).astype(np.float64)
    assert info["sum"] == pytest.approx(z.sum()) and info["sum_sq"] == pytest.approx((z**2).sum())
    np.testing.assert_allclose(info["channel_sum"], z.sum(axis=(0, 1, 2)))
    kw = {"run_id": RUN_ID, "start": 0, "stop": 4, "latent_shape": list(SHAPE)}
    assert fmt.check_shard(folder, 0, 3, **kw)[0] == info
    assert fmt.check_shard(folder, 0, 3, **{**kw, "run_id": "other"})[1].startswith("shard-00000-of-00003.json: run_id")
    assert "stop" in fmt.check_shard(folder, 0, 3, **{**kw, "stop": 5})[1]
    assert fmt.check_shard(folder, 0, 4, **kw)[1] == "missing"
    npy = folder / "shard-00000-of-00003.npy"
    npy.write_bytes(npy.read_bytes() + b"x")  # one byte too many
    assert fmt.check_shard(folder, 0, 3, **kw)[0] is None
    (folder / "shard-00000-of-00003.json").unlink()
    assert "unfinished write" in fmt.check_shard(folder, 0, 3, **kw)[1]
    assert not list(folder.glob(".*tmp*"))


def test_dataset_errors_name_file_and_field(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match=r"metadata\.json: not found"):
        fmt.LatentDataset(tmp_path / "nothing")
    meta_path = folder / fmt.METADATA
    meta = json.loads(meta_path.read_text())

    def broken(**change):
        fmt.write_json_atomic(meta_path, {**meta, **change})
        return fmt.LatentDataset(folder)

    with pytest.raises(
        fmt.LatentFormatError, match=r"shard-00000-of-00003.npy: records are .*latent_shape \[2, 2, 4\]"
    ):
        broken(latent_shape=[2, 2, 4])
    with pytest.raises(fmt.LatentFormatError, match=r"metadata.json: field 'latent_shape'"):
        broken(latent_shape=[2, 2])
    with pytest.raises(fmt.LatentFormatError, match=r"metadata.json: field 'scaling_factor'"):
        broken(scaling_factor=-1.0)
    with pytest.raises(fmt.LatentFormatError, match=r"shard-00001-of-00003.npy: 4 records, metadata.json says .*=5"):
        broken(shards=[meta["shards"][0], {**meta["shards"][1], "num_examples": 5}, meta["shards"][2]])
    with pytest.raises(fmt.LatentFormatError, match=r"shard-00009-of-00003.npy: shard listed in .* is missing"):
        broken(shards=[*meta["shards"], {"file": "shard-00009-of-00003.npy", "num_examples": 1}])
    with pytest.raises(fmt.LatentFormatError, match=r"metadata.json: missing field 'num_classes'"):
        fmt.write_json_atomic(meta_path, {k: v for k, v in meta.items() if k != "num_classes"})
        fmt.LatentDataset(folder)
    meta_path.write_text("{")
    with pytest.raises(fmt.LatentFormatError, match=r"metadata\.json: not valid JSON"):
        fmt.LatentDataset(folder)
    fmt.write_json_atomic(meta_path, meta)
    (folder / "shard-00002-of-00003.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(fmt.LatentFormatError, match=r"shard-00002-of-00003\.npy: not a readable \.npy file"):
        fmt.LatentDataset(folder)


def _loader(folder, **kw):
    return fmt.make_latent_train_loader(folder, **{"global_batch_size": 2, "seed": 0, "read_threads": 2, **kw})


def test_loader_epochs_determinism_and_shapes(folder):
    one = list(_loader(folder, num_epochs=1))
    assert len(one) == 5
    for b in one:
        assert b["latent"].shape == (2, *SHAPE) and b["latent"].dtype == np.float32
        assert b["label"].shape == (2,) and b["label"].dtype == np.int32
        assert [int(v) for v in b["label"]] == [i % 3 for i in _ids(b)]
    seen = [i for b in one for i in _ids(b)]
    assert sorted(seen) == ALL and seen != ALL  # every example once, shuffled
    assert [_ids(b) for b in _loader(folder, num_epochs=1)] == [_ids(b) for b in one]  # same seed, same order
    assert [i for b in _loader(folder, num_epochs=1, seed=1) for i in _ids(b)] != seen
    assert [i for b in _loader(folder, num_epochs=1, shuffle=False) for i in _ids(b)] == ALL
    it = _loader(folder)  # endless: a new permutation each epoch, each a permutation of all examples
    stream = [i for _ in range(10) for i in _ids(next(it))]
    assert sorted(stream[:10]) == sorted(stream[10:]) == ALL and stream[:10] != stream[10:]
    with pytest.raises(ValueError, match="divisible"):
        _loader(folder, global_batch_size=3, process_count=2, process_index=0)


def test_loader_processes_and_checkpoint(folder):
    ref = [_ids(b) for b in _loader(folder, global_batch_size=4, num_epochs=2)]
    parts = [[_ids(b) for b in _loader(folder, global_batch_size=4, num_epochs=2, process_index=p, process_count=2)]
             for p in range(2)]  # fmt: skip
    assert len(parts[0]) == len(parts[1]) == len(ref) == 5
    for g, a, b in zip(ref, *parts, strict=True):  # process p reads global positions p, p + 2, ...
        assert a == g[0::2] and b == g[1::2]
    it = _loader(folder, global_batch_size=4)
    head = [_ids(next(it)) for _ in range(2)]
    state = json.loads(json.dumps(it.get_state()))
    tail = [_ids(next(it)) for _ in range(3)]
    resumed = _loader(folder, global_batch_size=4)
    resumed.set_state(state)
    assert [_ids(next(resumed)) for _ in range(3)] == tail
    restarted = _loader(folder, global_batch_size=4)
    restarted.restart_at(2)  # another process count: global batch 2 next
    assert [_ids(next(restarted)) for _ in range(3)] == tail
    assert head == ref[:2]
