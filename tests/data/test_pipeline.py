"""grain input pipelines: sources (folder, bundled, tfds), skip counting, determinism, sharding, orbax resume, eval."""

import itertools
import json
import os
import pathlib
import pickle
import subprocess
import sys
import textwrap

import grain
import grain.python
import numpy as np
import pytest
from PIL import Image

from dcae_jax.data import pipeline as ip
from dcae_jax.data.images import load_image

R = 16  # training resolution in these tests; images with a short side < 4 are too small


def _id_image(i: int, size=(24, 20)) -> Image.Image:
    """A flat image whose red channel encodes `i` (crops, flips and resizing keep it)."""
    return Image.new("RGB", size, (8 * i, 100, 50))


def _ids(batch) -> list[int]:
    red = (np.asarray(batch["image"])[..., 0].mean(axis=(1, 2)) + 1) * 127.5
    return [int(v) for v in np.rint(red / 8)]


@pytest.fixture
def id_folder(tmp_path_factory):
    """21 flat id images (0..20) in nested folders, all readable."""
    tmp_path = tmp_path_factory.mktemp("ids")
    for i in range(21):
        p = tmp_path / f"d{i % 3}" / ("deep" if i % 2 else "") / f"{i:02d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        _id_image(i).save(p)
    return tmp_path


def _loader(source, **kw):
    kw = {"resolution": R, "global_batch_size": 2, "seed": 0, "read_threads": 2, **kw}
    return ip.make_train_loader(source, **kw)


def test_count_skipped_semantics_and_state():
    ds = grain.MapDataset.source([1, None, None, 2, None, 3, 4]).map(lambda x: None if x is None else {"x": x})
    it = iter(ip.CountSkippedIterDataset(ds.to_iter_dataset(allow_nones=True), max_consecutive=10))
    out = [next(it)]
    state = it.get_state()
    out += list(it)
    assert [(e["x"], int(e["skipped"])) for e in out] == [(1, 0), (2, 2), (3, 1), (4, 0)]
    it2 = iter(ip.CountSkippedIterDataset(ds.to_iter_dataset(allow_nones=True), max_consecutive=10))
    it2.set_state(state)
    assert [(e["x"], int(e["skipped"])) for e in it2] == [(2, 2), (3, 1), (4, 0)]


def test_folder_source_skips_and_counts_bad_images(tmp_path, caplog):
    good = {"a.png": "RGB", "sub/b.jpg": "L", "sub/deeper/c.webp": "RGBA", "d.bmp": "P", "sub/e.PNG": "LA"}
    good["f.gif"] = "P"  # GIF (first frame) is read, not silently ignored
    photo = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    for rel, mode in good.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo).convert(mode).save(tmp_path / rel)
    (tmp_path / "sub" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10)
    (tmp_path / "empty.png").write_bytes(b"")
    Image.fromarray(photo[:3, :5]).save(tmp_path / "sub" / "deeper" / "tiny.png")  # short side 3 < R / 4
    (tmp_path / "notes.txt").write_text("not an image")
    source = ip.make_source(f"folder:{tmp_path}", "train")
    assert len(source) == 9 and ip.make_source(f"folder:{tmp_path}", "validation").paths == source.paths
    assert ip.make_source(str(tmp_path), "train").paths == source.paths  # a plain directory is folder:DIR

    ip._NAMED.clear()
    caplog.set_level("WARNING")
    it = _loader(source, global_batch_size=1, num_epochs=3)
    batches = list(it)
    assert len(batches) == 3 * 6  # every readable image once per epoch, the bad ones never
    for bad in ("corrupt.jpg", "empty.png", "tiny.png"):  # each skipped file named, once, over three epochs
        assert sum(bad in r.getMessage() for r in caplog.records) == 1, bad
    for b in batches:
        assert b["image"].shape == (1, R, R, 3) and b["image"].dtype == np.float32 and b["skipped"].dtype == np.int32
        assert b["image"].min() >= -1 and b["image"].max() <= 1
    skipped = sum(int(b["skipped"].sum()) for b in batches)
    assert 3 * 3 - 3 <= skipped <= 3 * 3  # drops after the last image of the run are not reported

    with pytest.raises(RuntimeError, match="no readable image"):
        bad = ip.ImageFileSource([tmp_path / "empty.png", tmp_path / "sub" / "corrupt.jpg"])
        next(_loader(bad))


def test_folder_split_subfolders(tmp_path):
    for split, n in [("train", 3), ("val", 2)]:
        for i in range(n):
            (tmp_path / split / "cls").mkdir(parents=True, exist_ok=True)
            _id_image(i).save(tmp_path / split / "cls" / f"{i}.png")
    assert len(ip.make_source(f"folder:{tmp_path}", "train")) == 3
    assert len(ip.make_source(f"folder:{tmp_path}", "validation")) == 2
    with pytest.raises(FileNotFoundError, match="test"):
        ip.make_source(f"folder:{tmp_path}", "test")
    with pytest.raises(ValueError, match="unknown data spec"):
        ip.make_source("imagenet", "train")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        ip.make_source(f"folder:{tmp_path / 'empty_dir'}", "train")
    with pytest.raises(FileNotFoundError):
        ip.make_source(f"folder:{tmp_path / 'missing'}", "train")


def test_bundled_photos_offline():
    train, val = ip.make_source("bundled", "train"), ip.make_source("bundled", "validation")
    assert len(train) + len(val) >= 8 and len(val) >= 2
    assert not set(train.paths) & set(val.paths)
    loader = ip.make_eval_loader(train, resolution=R, batch_size=4, read_threads=2)
    batches = list(loader)
    assert len(batches) == len(loader) == -(-len(train) // 4)
    images = np.concatenate([b["image"] for b in batches])[np.concatenate([b["mask"] for b in batches]) > 0]
    assert len(images) == len(train) and sum(int(b["skipped"].sum()) for b in batches) == 0
    assert all(x.std() > 0.05 and np.abs(x[..., 0] - x[..., 1]).mean() > 0.01 for x in images)  # real color photos
    batch = next(_loader(val, global_batch_size=4))
    assert batch["image"].shape == (4, R, R, 3) and not batch["skipped"].any()


def test_same_seed_same_batches_new_epoch_new_order(id_folder):
    source = ip.make_source(f"folder:{id_folder}", "train")
    a, b, c = (_loader(source, seed=s, global_batch_size=3) for s in (7, 7, 8))
    for _ in range(9):  # 27 images: past the first epoch (21)
        x, y = next(a), next(b)
        np.testing.assert_array_equal(x["image"], y["image"])
    small_batches = _loader(source, seed=7, global_batch_size=3)
    ids = [i for _ in range(7) for i in _ids(next(small_batches))]  # batching does not change the order
    epochs = ip.make_train_loader(source, resolution=R, global_batch_size=21, seed=7, num_epochs=2, read_threads=2)
    e1, e2 = (_ids(batch) for batch in epochs)
    assert sorted(e1) == sorted(e2) == list(range(21)) and e1 != e2 and e1 != sorted(e1)
    assert ids[:21] == e1
    assert _ids(next(c)) != e1[:3]  # another seed, another order (fails with probability ~1e-4)


def test_augmentation_crops_and_flips():
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (6, 9, 3), dtype=np.uint8))
    big = Image.fromarray(rng.integers(0, 256, (100, 150, 3), dtype=np.uint8))
    assert ip.random_crop_adm(small, 32, rng).size == (32, 32)  # upscaled
    assert ip.random_crop_adm(big, 32, rng).size == (32, 32)
    ramp = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (48, 1, 3))  # brightness grows to the right
    path_source = [{"image": ramp}]  # a tfds-style record holding a decoded array
    dirs = set()
    for seed in range(12):
        x = next(_loader(path_source, global_batch_size=1, seed=seed))["image"][0, :, :, 0]
        dirs.add(bool(x[:, -1].mean() > x[:, 0].mean()))
    assert dirs == {True, False}  # both flipped and unflipped


def test_global_batches_do_not_depend_on_the_process_count(id_folder):
    source = ip.make_source(f"folder:{id_folder}", "train")  # 21 records: the stream crosses epochs
    single = [_ids(b) for b in itertools.islice(_loader(source, global_batch_size=4), 8)]
    for n in (2, 4):
        loaders = [_loader(source, global_batch_size=4, process_index=p, process_count=n) for p in range(n)]
        local = [[_ids(next(it)) for it in loaders] for _ in range(8)]
        assert [sorted(i for part in parts for i in part) for parts in local] == [sorted(b) for b in single]
        assert all(parts[p] == single[b][p::n] for b, parts in enumerate(local) for p in range(n))  # strided reads
    with pytest.raises(ValueError, match="divisible"):
        _loader(source, global_batch_size=3, process_count=2)


def test_restart_at_a_batch_and_its_state(id_folder):
    """`restart_at(b)` continues with global batch b; the state records that start, so it restores anywhere."""
    source = ip.make_source(f"folder:{id_folder}", "train")
    straight = [b["image"] for b in itertools.islice(_loader(source, global_batch_size=4), 12)]
    restarted = _loader(source, global_batch_size=4)
    restarted.restart_at(3)
    np.testing.assert_array_equal(next(restarted)["image"], straight[3])
    state = restarted.get_state()
    assert state["start_batch"] == 3
    fresh = _loader(source, global_batch_size=4)
    fresh.set_state(json.loads(json.dumps(state)))
    for b in range(4, 12):  # past the first epoch
        np.testing.assert_array_equal(next(fresh)["image"], straight[b])


def test_checkpoint_iterator_with_orbax(id_folder, tmp_path):
    import orbax.checkpoint as ocp

    (id_folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # skipped counts must resume too
    (id_folder / "d1" / "empty.jpg").write_bytes(b"")
    source = ip.make_source(f"folder:{id_folder}", "train")
    assert grain.python.PyGrainCheckpointSave is grain.checkpoint.CheckpointSave  # the name the trainer uses

    it = _loader(source, global_batch_size=4, seed=3)
    for _ in range(4):  # mid-epoch
        next(it)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt", options=ocp.CheckpointManagerOptions(create=True))
    step = {"step": np.array(4, np.int32)}
    mngr.save(
        4, args=ocp.args.Composite(state=ocp.args.StandardSave(step), data_iter=grain.checkpoint.CheckpointSave(it))
    )
    mngr.wait_until_finished()
    expected = [next(it) for _ in range(6)]  # crosses the epoch boundary (23 records)
    mngr.close()

    mngr = ocp.CheckpointManager(tmp_path / "ckpt")
    fresh = _loader(source, global_batch_size=4, seed=3)
    restored = mngr.restore(
        mngr.latest_step(),
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore({"step": np.array(0, np.int32)}),
            data_iter=grain.checkpoint.CheckpointRestore(fresh),
        ),
    )
    assert int(restored["state"]["step"]) == 4 and restored["data_iter"] is fresh
    assert (tmp_path / "ckpt" / "4" / "data_iter" / "process_0-of-1.json").is_file()
    got = [next(fresh) for _ in range(6)]
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_array_equal(e["image"], g["image"])
        np.testing.assert_array_equal(e["skipped"], g["skipped"])
    assert sum(int(b["skipped"].sum()) for b in expected) > 0


def test_eval_loader_pads_and_masks(tmp_path):
    paths = []
    for i in range(7):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    paths[3].write_bytes(b"corrupt")
    source = ip.ImageFileSource(paths)
    seen, skipped = [], 0
    for p in range(2):  # process 0: records 0, 2, 4, 6; process 1: 1, 3, 5 -> 2 batches of 3 each
        loader = ip.make_eval_loader(source, resolution=R, batch_size=3, process_index=p, process_count=2)
        batches = list(loader)
        assert len(batches) == len(loader) == 2 and loader.num_examples == [4, 3][p]
        for b in batches:
            assert b["image"].shape == (3, R, R, 3) and b["mask"].dtype == np.float32 and b["skipped"].dtype == np.int32
        mask = np.concatenate([b["mask"] for b in batches])
        images = np.concatenate([b["image"] for b in batches])
        records = list(range(p, 7, 2)) + [None] * (6 - len(range(p, 7, 2)))
        for r, m, x in zip(records, mask, images):
            if r is None or r == 3:
                assert m == 0 and not x.any()
            else:
                assert m == 1
                np.testing.assert_array_equal(x, load_image(paths[r], resolution=R))  # ADM center crop
                seen.append(r)
        skipped += sum(int(b["skipped"].sum()) for b in batches)
        again = list(loader)  # another identical pass
        np.testing.assert_array_equal(np.concatenate([b["image"] for b in again]), images)
    assert sorted(seen) == [0, 1, 2, 4, 5, 6] and skipped == 1


def test_eval_loader_segments_start_new_batches(id_folder):
    """Segments 3 / 0 / 5 / 2 / 11 in batches of 2: each starts a batch; the gaps are padding (mask 0, not skipped)."""
    source = ip.make_source(f"folder:{id_folder}", "train")
    labels = [int(pathlib.Path(p).stem) for p in source.paths]  # the id drawn into each image
    loader = ip.make_eval_loader(source, resolution=R, batch_size=2, read_threads=2, segments=[3, 0, 5, 2, 11])
    batches = list(loader)
    assert len(batches) == len(loader) == 2 + 3 + 1 + 6 and loader.num_examples == 21
    mask = np.concatenate([b["mask"] for b in batches])
    ids = [i for b in batches for i in _ids(b)]
    slots = [0, 1, 2, None, 3, 4, 5, 6, 7, None, 8, 9, *range(10, 21), None]
    assert mask.tolist() == [0.0 if r is None else 1.0 for r in slots]
    assert [i for i, r in zip(ids, slots, strict=True) if r is not None] == labels
    assert sum(int(b["skipped"].sum()) for b in batches) == 0
    padding = np.concatenate([b["image"] for b in batches])[mask == 0]
    assert len(padding) == 3 and not padding.any()
    with pytest.raises(ValueError, match="sum to the 21 records"):
        ip.make_eval_loader(source, resolution=R, batch_size=2, segments=[3, 5])
    with pytest.raises(ValueError, match="for one process"):
        ip.make_eval_loader(source, resolution=R, batch_size=2, process_count=2, segments=[21])


def test_tfds_source(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    try:
        import importlib_resources  # noqa: F401  (tfds builders need it to write a dataset)
    except ImportError:
        pytest.skip("tfds dataset building needs importlib_resources")
    features = tfds.features.FeaturesDict(
        {"image": tfds.features.Image(shape=(None, None, 3)), "label": tfds.features.ClassLabel(num_classes=10)}
    )
    examples = [(i, {"image": np.asarray(_id_image(i, (20 + i, 24))), "label": i}) for i in range(7)]
    examples.append((7, {"image": np.full((2, 30, 3), 9, np.uint8), "label": 7}))  # too small: skipped
    tfds.dataset_builders.store_as_tfds_dataset(
        name="dcae_tiny_images",
        version="1.0.0",
        features=features,
        split_datasets={"train": examples[:5] + examples[7:], "validation": examples[5:7]},
        data_dir=tmp_path,
        file_format="array_record",
    )
    train = ip.make_source(f"tfds:dcae_tiny_images@{tmp_path}", "train")
    assert len(train) == 6
    record = train[0]
    assert isinstance(record["image"], bytes | np.ndarray) and "label" in record
    ids = [i for b in _loader(train, global_batch_size=1, num_epochs=1) for i in _ids(b)]
    assert sorted(ids) == list(range(5))
    # Decoded arrays (tfds without SkipDecoding) are handled too.
    decoded = tfds.data_source("dcae_tiny_images", split="validation", data_dir=tmp_path)
    assert isinstance(decoded[0]["image"], np.ndarray)
    batches = list(ip.make_eval_loader(decoded, resolution=R, batch_size=4))
    assert len(batches) == 1 and batches[0]["mask"].tolist() == [1, 1, 0, 0]
    assert sorted(_ids(batches[0])[:2]) == [5, 6]


_MP_SCRIPT = """
import sys
import numpy as np
from absl import flags
from dcae_jax.data import pipeline as ip

if __name__ == "__main__":
    flags.FLAGS(sys.argv[:1])  # grain workers read absl flags
    source = ip.make_source("folder:" + sys.argv[1], "train")
    kw = dict(resolution=16, global_batch_size=3, seed=5, read_threads=2)
    ref = ip.make_train_loader(source, **kw)
    expected = [next(ref)["image"] for _ in range(4)]
    it = ip.make_train_loader(source, num_workers=1, **kw)
    got = [np.array(next(it)["image"]) for _ in range(2)]
    state = it.get_state()
    got += [np.array(next(it)["image"]) for _ in range(2)]
    it.close()
    resumed = ip.make_train_loader(source, num_workers=1, **kw)
    resumed.set_state(state)
    tail = [np.array(next(resumed)["image"]) for _ in range(2)]
    resumed.close()
    ok = all(np.array_equal(a, b) for a, b in zip(expected, got)) and all(
        np.array_equal(a, b) for a, b in zip(expected[2:], tail))
    print("MP_OK" if ok else "MP_MISMATCH", flush=True)
"""


def test_multiprocess_worker_matches_in_process(id_folder, tmp_path):
    script = tmp_path / "mp_check.py"
    script.write_text(textwrap.dedent(_MP_SCRIPT))
    root = pathlib.Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, str(script), str(id_folder)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert "MP_OK" in out.stdout, out.stdout + out.stderr[-3000:]


def test_crop_scale_and_channel_shuffle():
    src = ip.make_source("bundled", "train")
    kw = dict(resolution=32, global_batch_size=4, seed=3)
    plain = next(ip.make_train_loader(src, crop_scale=(2.0, 3.0), **kw))["image"]
    shuffled = next(ip.make_train_loader(src, crop_scale=(2.0, 3.0), channel_shuffle=True, **kw))["image"]
    assert plain.shape == shuffled.shape == (4, 32, 32, 3)
    for a, b in zip(plain, shuffled):  # same crops, channels permuted
        assert any(np.array_equal(a[..., list(p)], b) for p in itertools.permutations(range(3)))
    assert any(not np.array_equal(a, b) for a, b in zip(plain, shuffled))
    default = next(ip.make_train_loader(src, **kw))["image"]
    assert not np.array_equal(default, plain)
    with pytest.raises(ValueError, match="crop scale"):
        next(ip.make_train_loader(src, crop_scale=(0.5, 1.0), **kw))


def test_arrayrecord_source_trains_like_the_folder(id_folder, tmp_path):
    """Packed shards (python -m dcae_jax.pack) hold the folder's files in the folder's order: same batches."""
    from dcae_jax.data import shards

    shards.pack_folder(str(id_folder), str(tmp_path / "ar"), images_per_shard=8, read_threads=2)
    packed = ip.make_source(f"arrayrecord:{tmp_path / 'ar'}", "train")
    folder = ip.make_source(f"folder:{id_folder}", "train")
    assert len(packed) == len(folder) == 21 and "arrayrecord:DIR" in ip.make_source.__doc__
    a, b = _loader(packed, global_batch_size=3), _loader(folder, global_batch_size=3)
    for _ in range(8):  # more than one epoch
        x, y = next(a), next(b)
        np.testing.assert_array_equal(x["image"], y["image"])
        assert x["image"].shape == (3, R, R, 3) and not x["skipped"].any()


def test_tfds_is_read_never_downloaded_or_built(tmp_path):
    """An unprepared or unknown dataset is one clear error naming where it looked; nothing is written anywhere."""
    tfds = pytest.importorskip("tensorflow_datasets")
    default = pathlib.Path(tfds.core.constants.DATA_DIR).expanduser()  # fixed when tfds was imported
    before = sorted(default.rglob("*")) if default.exists() else None
    with pytest.raises(FileNotFoundError, match=rf"tfds:mnist is not prepared in {tmp_path}/tfds; tfds build mnist"):
        ip.make_source(f"tfds:mnist@{tmp_path}/tfds", "test")
    with pytest.raises(ValueError, match=r"tfds:no_such_dataset_xyz: no TFDS dataset of that name .* ~/tensorflow_"):
        ip.make_source("tfds:no_such_dataset_xyz", "train")
    assert not list(tmp_path.rglob("*"))  # nothing in the data_dir given
    assert (sorted(default.rglob("*")) if default.exists() else None) == before  # nor in tfds' default one


@pytest.mark.gcs
def test_tfds_source_on_gcs(gcs_dir, tmp_path):
    """tfds:NAME@gs://DATA_DIR: a prepared dataset copied to Cloud Storage is read in place."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from dcae_jax.runtime import paths

    features = tfds.features.FeaturesDict(
        {"image": tfds.features.Image(shape=(None, None, 3)), "label": tfds.features.ClassLabel(num_classes=10)}
    )
    examples = [(i, {"image": np.asarray(_id_image(i, (20 + i, 24))), "label": i}) for i in range(5)]
    tfds.dataset_builders.store_as_tfds_dataset(
        name="dcae_tiny_gcs",
        version="1.0.0",
        features=features,
        split_datasets={"train": examples},
        data_dir=tmp_path / "tfds",
        file_format="array_record",
    )
    paths.copytree(tmp_path / "tfds", f"{gcs_dir}/tfds")
    train = ip.make_source(f"tfds:dcae_tiny_gcs@{gcs_dir}/tfds", "train")
    assert len(train) == 5
    ids = [i for b in _loader(train, global_batch_size=1, num_epochs=1) for i in _ids(b)]
    assert sorted(ids) == list(range(5))


def test_decoded_cache_decodes_each_file_once_and_changes_no_batch(id_folder, monkeypatch):
    """Decoded files stay in memory while the training set fits (DecodedCache): three epochs of 21 files decode 21
    times instead of 63, and the batches are exactly those of the uncached pipeline."""
    opened = []
    read = ip.open_record
    monkeypatch.setattr(ip, "open_record", lambda record: opened.append(str(record)) or read(record))
    src = ip.make_source(f"folder:{id_folder}", "train")

    def three_epochs(cache_mb):
        opened.clear()
        it = _loader(src, read_threads=1, decoded_cache_mb=cache_mb)
        images = [np.asarray(next(it)["image"]) for _ in range(32)]  # 64 records: 3 epochs and a bit
        it.close()
        return images, list(opened)

    cached, cached_reads = three_epochs(1)
    plain, plain_reads = three_epochs(0)
    assert len(plain_reads) >= 63 and len(set(plain_reads)) == 21
    assert sorted(cached_reads) == sorted(set(plain_reads))  # each file once
    assert all(np.array_equal(a, b) for a, b in zip(cached, plain, strict=True))


def test_decoded_cache_switches_off_when_the_set_does_not_fit(id_folder):
    paths = sorted(str(p) for p in id_folder.rglob("*.png"))
    size = 24 * 20 * 3  # one decoded id image
    cache = ip.DecodedCache(5 * size)
    for p in paths[:5]:
        cache.open(p)
    assert len(cache) == 5 and cache.num_bytes == 5 * size and cache.open(paths[0]) is cache.open(paths[0])
    sixth = cache.open(paths[5])  # over the budget: everything is dropped and nothing more is kept
    assert np.array_equal(np.asarray(sixth), np.asarray(_id_image(int(pathlib.Path(paths[5]).stem))))
    assert (len(cache), cache.num_bytes, cache.enabled) == (0, 0, False)
    cache.open(paths[0])
    assert len(cache) == 0
    # dict records (tfds, arrayrecord) are decoded each time; a pickled cache (grain workers) starts empty
    record = {"image": np.asarray(_id_image(3)), "file_name": "3.png"}
    fresh = ip.DecodedCache(1 << 20)
    assert fresh.open(record) is not fresh.open(record) and len(fresh) == 0
    fresh.open(paths[0])
    clone = pickle.loads(pickle.dumps(fresh))
    assert (len(clone), clone.max_bytes, clone.enabled) == (0, 1 << 20, True)
