"""ArrayRecord image shards: the record format, pack -> read pixel-exact with labels, skipped files with reasons, resume
after an interruption equal to an uninterrupted pack, clear errors for damaged packs, the command, gs:// (emulator)."""

import json
import pathlib
import pickle

import numpy as np
import pytest
from PIL import Image

from dcae_jax import pack
from dcae_jax.data import pipeline as ip
from dcae_jax.data import shards
from dcae_jax.data.images import open_image
from dcae_jax.data.precompute import folder_labels

R = 16


def _photo(seed: int, size=(20, 26)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def _make_folder(root: pathlib.Path) -> pathlib.Path:
    """train/ (classes cat, dog; 9 good images in three formats, 3 bad ones) and val/ (3 images, class cat)."""
    for i in range(9):
        p = root / "train" / ("cat" if i % 3 else "dog") / f"{i:02d}.{('png', 'jpg', 'webp')[i % 3]}"
        p.parent.mkdir(parents=True, exist_ok=True)
        _photo(i).convert("L" if i == 4 else "RGB").save(p)
    (root / "train" / "cat" / "corrupt.jpg").write_bytes(b"this is text, not a jpeg" * 5)
    (root / "train" / "dog" / "empty.png").write_bytes(b"")
    _photo(99, (3, 40)).save(root / "train" / "dog" / "tiny.png")  # short side 3 < min_side 4
    (root / "train" / "dog" / "notes.txt").write_text("not an image: not listed by folder: either")
    for i in range(3):
        (root / "val" / "cat").mkdir(parents=True, exist_ok=True)
        _photo(50 + i).save(root / "val" / "cat" / f"v{i}.png")
    return root


@pytest.fixture
def photos(tmp_path_factory):
    return _make_folder(tmp_path_factory.mktemp("photos"))


def _files(root: pathlib.Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_record_format_round_trip_and_refusal():
    rec = shards.encode_record(b"\x89PNG bytes", "cls/ä.png", 3)
    assert rec.startswith(b"DCAEIMG1") and rec.endswith(b"\x89PNG bytes")
    assert shards.decode_record(rec) == {"image": b"\x89PNG bytes", "file_name": "cls/ä.png", "label": 3}
    with pytest.raises(ValueError, match="shard 7: not a dcae_jax image record"):
        shards.decode_record(b"\x89PNG" * 4, "shard 7")
    with pytest.raises(ValueError, match="bad image record header"):
        shards.decode_record(b"DCAEIMG1" + (5).to_bytes(4, "little") + b"{oops", "x")


def test_pack_reads_back_exactly_like_the_folder(photos, tmp_path):
    r = shards.pack_folder(str(photos), str(tmp_path / "ar"), images_per_shard=4, min_side=4, read_threads=2)
    m = json.loads((tmp_path / "ar" / "manifest.json").read_text())
    assert m == r.manifest and m["complete"] and m["format"] == shards.FORMAT and m["version"] == shards.VERSION
    train, val = m["splits"]["train"], m["splits"]["val"]
    assert (train["num_files"], train["num_shards"], train["num_images"], train["num_skipped"]) == (12, 3, 9, 3)
    assert (val["num_images"], val["num_shards"], m["num_images"], m["num_skipped"]) == (3, 1, 12, 3)
    assert train["class_names"] == ["cat", "dog"] and train["label_source"] == "folder"
    for s in train["shards"] + val["shards"]:  # per-shard counts and byte sizes are the files'
        assert (tmp_path / "ar" / s["file"]).stat().st_size == s["num_bytes"]
    reasons = {s["file"]: s["reason"] for s in train["skipped"]}
    assert set(reasons) == {"cat/corrupt.jpg", "dog/empty.png", "dog/tiny.png"}
    assert "UnidentifiedImageError" in reasons["cat/corrupt.jpg"] and "(bytes)" in reasons["cat/corrupt.jpg"]
    assert "empty" in reasons["dog/empty.png"] and "short side < 4" in reasons["dog/tiny.png"]
    assert (r.written, r.kept) == (4, 0)

    folder = ip.make_source(f"folder:{photos}", "train")
    source = ip.make_source(f"arrayrecord:{tmp_path / 'ar'}", "train")
    assert len(source) == 9 and source.class_names == ["cat", "dog"]
    labels, _ = folder_labels(folder.paths, folder.name)  # what precompute gives folder: sources
    good = [p for p in folder.paths if not p.endswith(tuple(reasons))]
    for i, path in enumerate(good):  # same order, the file's own bytes, its pixels, its ImageFolder label
        rec = source[i]
        assert rec["file_name"] == pathlib.Path(path).relative_to(folder.name).as_posix()
        assert rec["image"] == pathlib.Path(path).read_bytes() and rec["label"] == labels(path)
        np.testing.assert_array_equal(np.asarray(ip.open_record(rec)), np.asarray(open_image(path)))
    # The evaluation pipeline gives the folder's images (the folder's bad files are masked there, absent here).
    ev = lambda s: np.concatenate(
        [b["image"][b["mask"] > 0] for b in ip.make_eval_loader(s, resolution=R, batch_size=4)]
    )
    np.testing.assert_array_equal(ev(source), ev(folder))
    # Split names resolve as for folder:, the source pickles (grain workers) and reads the same afterwards.
    assert len(ip.make_source(f"arrayrecord:{tmp_path / 'ar'}", "validation")) == 3
    with pytest.raises(FileNotFoundError, match="has no split 'test'"):
        ip.make_source(f"arrayrecord:{tmp_path / 'ar'}", "test")
    again = pickle.loads(pickle.dumps(source))
    assert [again[i]["image"] for i in range(9)] == [source[i]["image"] for i in range(9)]


def test_flat_folder_is_one_split_for_any_split_name(tmp_path):
    for i in range(3):
        _photo(i).save(tmp_path / f"{i}.png")
    r = shards.pack_folder(str(tmp_path), str(tmp_path / "out"), read_threads=1)
    assert list(r.manifest["splits"]) == ["all"] and not r.manifest["split_subfolders"]
    train = ip.make_source(f"arrayrecord:{tmp_path / 'out'}", "train")
    val = ip.make_source(f"arrayrecord:{tmp_path / 'out'}", "validation")
    assert len(train) == len(val) == 3 and [train[i]["label"] for i in range(3)] == [0, 0, 0]
    assert r.manifest["splits"]["all"]["label_source"] == "none (flat folder)"


class _Stop(Exception):
    pass


def test_resume_after_an_interruption_equals_an_uninterrupted_pack(photos, tmp_path, monkeypatch):
    kw = dict(images_per_shard=3, min_side=4, read_threads=2)
    whole = shards.pack_folder(str(photos), str(tmp_path / "whole"), **kw)

    seen = []

    def stop_after_two(split, entry):  # the progress hook: a kill once two shards are at DEST
        seen.append(entry["file"])
        if len(seen) == 2:
            raise _Stop

    with pytest.raises(_Stop):
        shards.pack_folder(str(photos), str(tmp_path / "cut"), progress=stop_after_two, **kw)
    cut = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert not cut["complete"] and len(cut["splits"]["train"]["shards"]) == 2
    with pytest.raises(ValueError, match="2 of 4 shards: packing did not finish; rerun"):
        ip.make_source(f"arrayrecord:{tmp_path / 'cut'}", "train")
    first = {f: (tmp_path / "cut" / f).stat().st_mtime_ns for f in seen}

    built = []
    real = shards._write_shard
    monkeypatch.setattr(
        shards, "_write_shard", lambda local, plan, lo, *a: built.append(lo) or real(local, plan, lo, *a)
    )
    resumed = shards.pack_folder(str(photos), str(tmp_path / "cut"), **kw)
    assert (resumed.written, resumed.kept) == (3, 2) and built == [6, 9, 0]  # train shards 2, 3, then val's shard
    assert resumed.manifest == whole.manifest
    assert _files(tmp_path / "cut") == _files(tmp_path / "whole")  # byte-identical shards and manifest
    assert {f: (tmp_path / "cut" / f).stat().st_mtime_ns for f in seen} == first  # not written again

    built.clear()
    (tmp_path / "cut" / "val" / "images-00000-of-00001.array_record").unlink()  # lost at DEST: packed again
    again = shards.pack_folder(str(photos), str(tmp_path / "cut"), **kw)
    assert (again.written, again.kept, built) == (1, 4, [0]) and _files(tmp_path / "cut") == _files(tmp_path / "whole")


def test_other_settings_or_files_are_refused_on_resume(photos, tmp_path):
    shards.pack_folder(str(photos), str(tmp_path / "ar"), images_per_shard=4, read_threads=1)
    with pytest.raises(ValueError, match="images_per_shard=4, this run has 5"):
        shards.pack_folder(str(photos), str(tmp_path / "ar"), images_per_shard=5, read_threads=1)
    _photo(7).save(photos / "train" / "cat" / "new.png")
    with pytest.raises(ValueError, match="split 'train' was packed from another file list"):
        shards.pack_folder(str(photos), str(tmp_path / "ar"), images_per_shard=4, read_threads=1)
    with pytest.raises(ValueError, match=r"no image files \(extensions: \.jpg \.jpeg \.png"):
        shards.pack_folder(str(tmp_path / "ar" / "train"), str(tmp_path / "x"))


def test_damaged_packs_give_clear_errors(photos, tmp_path):
    dest = tmp_path / "ar"
    shards.pack_folder(str(photos), str(dest), images_per_shard=4, read_threads=1)
    manifest = dest / "manifest.json"
    good = manifest.read_text()
    spec = f"arrayrecord:{dest}"

    def error(text: str | None = None) -> str:
        if text is not None:
            manifest.write_text(text)
        with pytest.raises((ValueError, FileNotFoundError)) as err:
            ip.make_source(spec, "train")
        return str(err.value)

    assert "manifest.json: not a pack manifest (JSONDecodeError" in error(good[:40])
    m = json.loads(good)
    m["version"] = 99
    assert "format version 99" in error(json.dumps(m))
    m = json.loads(good)
    del m["splits"]["train"]["shards"][1]["num_records"]
    assert "splits.train.shards[1]: field 'num_records' missing or not int" in error(json.dumps(m))
    m = json.loads(good)
    m["splits"]["train"]["shards"][0]["num_records"] += 1
    m["splits"]["train"]["num_images"] += 1
    assert "train/images-00000-of-00003.array_record: 4 records, the manifest says 5" in error(json.dumps(m))
    manifest.write_text(good)
    (dest / "train" / "images-00001-of-00003.array_record").unlink()
    assert "images-00001-of-00003.array_record: shard missing" in error()
    manifest.unlink()
    assert "manifest.json: no such file; pack a folder there with python -m dcae_jax.pack" in error()


def test_pack_command(photos, tmp_path, capsys):
    dest = tmp_path / "out"
    assert pack.main([f"--src=folder:{photos}", f"--dest={dest}", "--images_per_shard=5", "--read_threads=2"]) == 0
    out, err = capsys.readouterr()
    assert f"and {dest / 'manifest.json'}: 13 images, 2 skipped" in out and f"--data=arrayrecord:{dest}" in out
    assert "train: 3 shards, 10 images, 2 skipped; labels: 2 classes" in out
    assert "note: skipped train/cat/corrupt.jpg" in err and "pack: train/images-00000-of-00003.array_record" in err
    assert pack.main([f"--src={photos}", f"--dest={dest}", "--images_per_shard=5"]) == 0
    assert "wrote 0 shards (4 already there)" in capsys.readouterr()[0]
    assert pack.main([f"--src={photos}", f"--dest={dest}", "--images_per_shard=0"]) == 2  # bad flag
    assert pack.main([f"--src={tmp_path / 'missing'}", f"--dest={dest}"]) == 2
    assert f"pack: error: {tmp_path / 'missing'}: not a directory" in capsys.readouterr()[1]


@pytest.mark.gcs
def test_gcs_pack_resume_and_read_back(gcs_dir, photos, tmp_path):
    """Pack to gs://, interrupted then resumed: the local pack's bytes, read back pixel-exact; folder:gs:// and a
    gs:// SRC."""
    from dcae_jax.runtime import paths

    dest = f"{gcs_dir}/ar"
    kw = dict(images_per_shard=8, min_side=4, read_threads=4)
    whole = shards.pack_folder(str(photos), str(tmp_path / "local"), **kw)

    def stop(split, entry):
        raise _Stop

    with pytest.raises(_Stop):
        shards.pack_folder(str(photos), dest, progress=stop, **kw)
    resumed = shards.pack_folder(str(photos), dest, **kw)
    assert (resumed.written, resumed.kept) == (2, 1) and resumed.manifest == whole.manifest
    for name in ("manifest.json", "train/images-00001-of-00002.array_record"):
        assert paths.path(f"{dest}/{name}").read_bytes() == (tmp_path / "local" / name).read_bytes()

    remote = ip.make_source(f"arrayrecord:{dest}", "train")
    local = ip.make_source(f"arrayrecord:{tmp_path / 'local'}", "train")
    assert len(remote) == len(local) == 9 and all(remote[i] == local[i] for i in range(9))
    kw_loader = dict(resolution=R, global_batch_size=3, seed=0, read_threads=2)
    np.testing.assert_array_equal(
        next(ip.make_train_loader(remote, **kw_loader))["image"],
        next(ip.make_train_loader(local, **kw_loader))["image"],
    )
    with pytest.raises(FileNotFoundError, match=f"{gcs_dir}/nothing/manifest.json: no such file"):
        ip.make_source(f"arrayrecord:{gcs_dir}/nothing", "train")

    # An image folder on gs:// (listed and read through etils.epath): folder:gs://, and packed from there.
    src = f"{gcs_dir}/photos"
    paths.copytree(photos / "val", src)
    folder = ip.make_source(f"folder:{src}", "validation")
    assert folder.paths == [f"{src}/cat/v{i}.png" for i in range(3)]
    np.testing.assert_array_equal(
        np.asarray(ip.open_record(folder[1])), np.asarray(open_image(photos / "val/cat/v1.png"))
    )
    from_gcs = shards.pack_folder(src, str(tmp_path / "from_gcs"), **kw)
    packed = ip.make_source(f"arrayrecord:{tmp_path / 'from_gcs'}", "train")
    assert from_gcs.manifest["source"] == src and [packed[i] for i in range(3)] == [
        {"image": (photos / "val/cat" / f"v{i}.png").read_bytes(), "file_name": f"cat/v{i}.png", "label": 0}
        for i in range(3)
    ]
