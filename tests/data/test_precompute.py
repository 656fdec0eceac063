"""`python -m dcae_jax.precompute_latents` end to end, offline, on a tiny random DC-AE and a folder of real photos.

The folder has 2 class sub-folders ("objects" created first, "cats" sorts first) and one corrupt file; 7 records
in shards of 3. Stored latents are checked against `DCAE.encode` of the ADM-cropped photos times the scaling
factor, the statistics against numpy, resume against a spy on the shard writer and file mtimes, and the
1-process x 4-device CLI run and a 2-process x 2-device run against the in-process run.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest
from cpu_jobs import job_env
from PIL import Image

from dcae_jax.autoencoder.model import init_variables, tiny_config
from dcae_jax.autoencoder.pretrained import DCAE
from dcae_jax.data import latents as fmt
from dcae_jax.data import precompute as pl
from dcae_jax.data.images import list_images, load_image

REPO = pathlib.Path(__file__).resolve().parents[2]
RES = 32
SCALE = 0.5
# Source order (sorted paths): cats/broken.jpg, cats/chelsea.png, cats/chelsea_wide.png, objects/astronaut.png,
# objects/camera.png, objects/coffee.jpg, objects/rocket.jpg. Shards of 3: [0, 3) [3, 6) [6, 7).
READABLE = [1, 2, 3, 4, 5, 6]
LABELS = [0, 0, 1, 1, 1, 1]
KW = {"batch_size": 2, "shard_size": 3, "read_threads": 2, "verbose": True}
# Stored latents (batches of 2) against one `DCAE.encode` of all photos: another batch size and another row in the
# batch change XLA's CPU blocking, which moves a latent by float32 ulps on an AVX2 CPU (measured up to 2.9e-6 at
# |z| ~ 3.4 on an AMD EPYC Zen 3, ~7 ulps; bit-equal on the AVX-512 Xeons): 2e-6 of the largest value (~16 ulps).
ULPS = 2e-6


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from skimage import data

    root = tmp_path_factory.mktemp("precompute")
    config = tiny_config(scaling_factor=SCALE)
    DCAE(config, init_variables(config, jax.random.key(0))).save_pretrained(root / "tiny-model")
    photos = root / "photos"
    (photos / "objects").mkdir(parents=True)
    (photos / "cats").mkdir()
    Image.fromarray(data.astronaut()).resize((80, 64), Image.BOX).save(photos / "objects" / "astronaut.png")
    Image.fromarray(data.coffee()).resize((70, 90), Image.BOX).save(photos / "objects" / "coffee.jpg", quality=95)
    Image.fromarray(data.rocket()).resize((40, 60), Image.BOX).save(photos / "objects" / "rocket.jpg", quality=95)
    Image.fromarray(data.camera()).resize((48, 48), Image.BOX).save(photos / "objects" / "camera.png")  # gray
    Image.fromarray(data.chelsea()).resize((48, 48), Image.BOX).save(photos / "cats" / "chelsea.png")
    Image.fromarray(data.chelsea()).resize((96, 40), Image.BOX).save(photos / "cats" / "chelsea_wide.png")
    (photos / "cats" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return {"root": root, "model": root / "tiny-model", "photos": photos, "data": f"folder:{photos}"}


@pytest.fixture(scope="module")
def expected(files):
    """DCAE.encode of every readable photo (ADM center crop), unscaled, float32."""
    ae = DCAE.from_pretrained(files["model"])
    paths = [p for p in list_images(files["photos"]) if p.name != "broken.jpg"]
    x = np.stack([load_image(p, resolution=RES) for p in paths])
    return np.asarray(ae.encode(x), np.float32)


@pytest.fixture(scope="module")
def first(files, tmp_path_factory):
    """One in-process run: (output folder, result)."""
    out = tmp_path_factory.mktemp("latents") / "out"
    result = pl.precompute(str(files["model"]), files["data"], RES, out, **KW)
    return out, result


def _files(out: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*"))}


def _stored(out: pathlib.Path) -> np.ndarray:
    return np.concatenate([np.load(p) for p in sorted(out.glob("shard-*.npy"))])


def test_latents_labels_metadata_stats(files, expected, first):
    out, r = first
    want = expected * np.float32(SCALE)
    ds = fmt.LatentDataset(out)
    assert len(ds) == 6 and ds.latent_shape == (RES // 8, RES // 8, 8) and ds.scaling_factor == SCALE
    got = np.stack([ds[i]["latent"] for i in range(len(ds))])
    assert got.dtype == np.float32 and np.abs(got - want).max() <= ULPS * np.abs(want).max()
    assert [int(ds[i]["label"]) for i in range(len(ds))] == LABELS
    records = _stored(out)
    assert records["index"].tolist() == READABLE and records["label"].tolist() == LABELS
    assert [np.load(p).shape[0] for p in sorted(out.glob("shard-*.npy"))] == [2, 3, 1]  # broken.jpg left out

    meta = json.loads((out / "metadata.json").read_text())
    assert meta == {k: v for k, v in r.items() if k in meta}
    assert (meta["num_records"], meta["num_examples"], meta["num_unreadable"]) == (7, 6, 1)
    assert (meta["num_shards"], meta["shard_size"], meta["num_classes"]) == (3, 3, 2)
    assert meta["class_names"] == ["cats", "objects"] and meta["label_source"] == "folder"
    assert meta["latent_shape"] == [4, 4, 8] and meta["layout"] == "NHWC" and meta["dtype"] == "float32"
    assert meta["scaling_factor"] == SCALE and meta["scaling_factor_source"] == "model" and meta["latents_scaled"]
    assert meta["model"] == str(files["model"]) and meta["model_name"] == "tiny" and meta["resolution"] == RES
    assert [s["file"] for s in meta["shards"]] == [f"shard-0000{i}-of-00003.npy" for i in range(3)]
    assert [(s["start"], s["stop"], s["num_examples"]) for s in meta["shards"]] == [(0, 3, 2), (3, 6, 3), (6, 7, 1)]
    assert (r["shards_written"], r["shards_skipped"], r["shards_rewritten"]) == (3, 0, 0)

    z = want.astype(np.float64)
    s = meta["stats"]
    assert s["rms"] == pytest.approx(np.sqrt(np.mean(z**2)), rel=1e-6)
    assert s["mean"] == pytest.approx(z.mean(), rel=1e-6, abs=1e-9)
    assert s["std"] == pytest.approx(z.std(), rel=1e-6)
    np.testing.assert_allclose(s["channel_mean"], z.mean(axis=(0, 1, 2)), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(s["channel_std"], z.std(axis=(0, 1, 2)), rtol=1e-6)
    unscaled = np.sqrt(np.mean(expected.astype(np.float64) ** 2))
    assert s["unscaled_rms"] == pytest.approx(unscaled, rel=1e-6)
    assert s["implied_scaling_factor"] == pytest.approx(1 / unscaled, rel=1e-6)
    text = pl.report(r, out)
    assert f"implied scaling factor 1/rms = {1 / unscaled:.6g} (used 0.5)" in text
    assert "6 examples of 7 records (1 unreadable" in text


def test_resume_rewrites_only_missing_shard(files, first, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(first[0], out)
    before, meta_before = _files(out), (out / "metadata.json").read_text()
    (out / "shard-00001-of-00003.npy").unlink()
    (out / "shard-00001-of-00003.json").unlink()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    calls = []
    real = fmt.write_shard
    monkeypatch.setattr(fmt, "write_shard", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    r = pl.precompute(str(files["model"]), files["data"], RES, out, **KW)
    assert calls == [1]
    assert (r["shards_written"], r["shards_skipped"], r["shards_rewritten"]) == (1, 2, 0)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*") if p.name in mtimes} == mtimes
    assert _files(out) == before and (out / "metadata.json").read_text() == meta_before

    # Everything finished: a rerun writes nothing and gives the same metadata.
    calls.clear()
    r = pl.precompute(str(files["model"]), files["data"], RES, out, **KW)
    assert calls == [] and r["shards_skipped"] == 3 and (out / "metadata.json").read_text() == meta_before


def test_corrupt_shards_detected(files, first, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(first[0], out)
    before = _files(out)
    npy = out / "shard-00000-of-00003.npy"
    npy.write_bytes(npy.read_bytes()[:-7])  # truncated
    with pytest.raises(fmt.LatentFormatError, match=r"shard-00000-of-00003\.npy.*truncated"):
        fmt.LatentDataset(out)
    (out / "shard-00002-of-00003.json").write_text("{not json")  # a garbled index
    (out / "shard-00001-of-00003.npy").write_bytes(b"garbage")  # a foreign data file
    calls = []
    real = fmt.write_shard
    monkeypatch.setattr(fmt, "write_shard", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    r = pl.precompute(str(files["model"]), files["data"], RES, out, **KW)
    assert calls == [0, 1, 2] and r["shards_rewritten"] == 3
    assert _files(out) == before
    assert not list(out.glob(".*tmp*"))  # no temp files left


def test_non_finite_latents_are_not_written(files, tmp_path):
    """A diverged model's NaN latents are refused with the shard they would have gone to; nothing is stored."""
    config = tiny_config(scaling_factor=SCALE)
    variables = init_variables(config, jax.random.key(0))
    encoder = variables["params"]["encoder"]
    variables["params"]["encoder"] = jax.tree_util.tree_map(lambda x: np.full(x.shape, np.nan, np.float32), encoder)
    diverged = DCAE(config, variables)
    with pytest.raises(ValueError, match=r"shard 0 \(examples 0..2\): the autoencoder gave non-finite \(NaN/inf\)"):
        pl.precompute(diverged, files["data"], RES, tmp_path / "out", **KW)
    assert not list((tmp_path / "out").glob("shard-*"))


def test_a_resolution_the_model_does_not_divide_is_padded_with_a_warning(files, tmp_path):
    with pytest.warns(
        UserWarning, match=r"--resolution=28 is not a multiple of the compression factor 8 of .*tiny-model: "
    ):
        r = pl.precompute(str(files["model"]), files["data"], 28, tmp_path / "out", **{**KW, "max_images": 2})
    assert r["latent_shape"][:2] == [4, 4]


def test_other_settings_refused(files, first, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(first[0], out)
    with pytest.raises(ValueError, match=r"changed: \['latent_shape', 'resolution'\]"):
        pl.precompute(str(files["model"]), files["data"], 16, out, **KW)
    with pytest.raises(ValueError, match=r"uses scaling_factor 0\.5 \(model\), not 0\.25"):
        pl.precompute(str(files["model"]), files["data"], RES, out, scaling_factor=0.25, **KW)
    with pytest.raises(ValueError, match=r"uses scaling_factor 0\.5 \(model\), not auto"):
        pl.precompute(str(files["model"]), files["data"], RES, out, scaling_factor="auto", **KW)


def test_auto_scaling_factor(files, expected, tmp_path, capsys):
    """A model without a scaling factor: 1/RMS of its latents, so the stored latents have RMS ~ 1."""
    config = tiny_config(scaling_factor=None)
    ae = DCAE(config, DCAE.from_pretrained(files["model"]).variables)
    r = pl.precompute(ae, files["data"], RES, tmp_path / "out", max_images=4, **KW)
    z = expected[:3].astype(np.float64)  # records 1..3 of the first 4 (record 0 is broken.jpg)
    scale = r["scaling_factor"]
    assert scale == pytest.approx(1 / np.sqrt(np.mean(z**2)), rel=2e-6) and scale == float(f"{scale:.6g}")
    assert r["scaling_factor_source"] == "auto" and r["num_records"] == 4
    assert r["stats"]["rms"] == pytest.approx(1.0, rel=1e-5)
    want = expected[:3] * np.float32(scale)
    np.testing.assert_allclose(_stored(tmp_path / "out")["latent"], want, rtol=0, atol=ULPS * np.abs(want).max())
    assert "has no scaling_factor: measuring" in capsys.readouterr().err
    again = pl.precompute(ae, files["data"], RES, tmp_path / "out", max_images=4, **KW)  # reuses run.json's factor
    assert again["scaling_factor"] == scale and again["shards_skipped"] == 2


def test_labels(files, tmp_path, monkeypatch):
    # Flat folder: label 0 with a warning.
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("a.png", "b.png"):
        shutil.copy(files["photos"] / "cats" / "chelsea.png", flat / name)
    with pytest.warns(UserWarning, match="no class sub-folders"):
        source, label_fn, names, how = pl.open_labeled_source(f"folder:{flat}", "train", None)
    assert [label_fn(source[i]) for i in range(2)] == [0, 0] and names == ["flat"] and how.startswith("none")
    # Images next to class folders are ambiguous.
    shutil.copy(files["photos"] / "cats" / "chelsea.png", tmp_path / "mixed.png")
    (tmp_path / "sub").mkdir()
    shutil.copy(files["photos"] / "cats" / "chelsea.png", tmp_path / "sub" / "x.png")
    with pytest.raises(ValueError, match="next to class sub-folders"):
        pl.folder_labels([str(tmp_path / "mixed.png"), str(tmp_path / "sub" / "x.png")], str(tmp_path))
    # Bundled: the index of the package the photo ships in.
    source, label_fn, names, _ = pl.open_labeled_source("bundled", "train", None)
    assert names == ["skimage", "sklearn", "matplotlib"]
    by_name = {pathlib.Path(source[i]).name: label_fn(source[i]) for i in range(len(source))}
    assert by_name["astronaut.png"] == 0 and by_name.get("china.jpg", 1) == 1
    source, label_fn, _, _ = pl.open_labeled_source("bundled", "validation", None)
    assert {pathlib.Path(p).name: label_fn(p) for p in source.paths}.get("grace_hopper.jpg", 2) == 2

    # tfds: the `label` feature and its ClassLabel names.
    info = types.SimpleNamespace(features={"image": None, "label": types.SimpleNamespace(names=["cat", "dog"])})

    class FakeTfds(list):
        dataset_info = info

    from dcae_jax.data import pipeline as input_pipeline

    monkeypatch.setattr(input_pipeline, "make_source", lambda spec, split: FakeTfds([{"image": b"", "label": 1}]))
    source, label_fn, names, how = pl.open_labeled_source("tfds:fake", "train", None)
    assert label_fn(source[0]) == 1 and names == ["cat", "dog"] and how == "tfds label"
    info.features = {"image": None}
    with pytest.warns(UserWarning, match="no 'label' feature"):
        source, label_fn, names, _ = pl.open_labeled_source("tfds:fake", "train", None)
    assert label_fn(source[0]) == 0 and names == ["all"]


# ----------------------------------------------------------------------------------------------
# Subprocesses: the CLI on 4 fake devices, and 2 processes x 2 devices.


def _run_job(files, out: pathlib.Path, processes: int, devices: int, timeout: float = 240) -> list[str]:
    env = job_env(devices, processes)
    cmd = [sys.executable, "-m", "dcae_jax.precompute_latents", "--model", str(files["model"])]
    cmd += ["--data", files["data"], "--resolution", str(RES), "--out", str(out), "--batch_size", "2"]
    cmd += ["--shard_size", "3", "--read_threads", "2"]
    procs = [
        subprocess.Popen(
            cmd,
            cwd=REPO,
            env={**env, "JAX_PROCESS_ID": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for i in range(processes)
    ]
    try:
        deadline = time.monotonic() + timeout
        logs = []
        for p in procs:
            logs.append(p.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
        for p, log in zip(procs, logs, strict=True):
            assert p.returncode == 0, log[-3000:]
        return logs
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@pytest.mark.parametrize("processes,devices", [(1, 4), (2, 2)])
def test_devices_and_processes_agree(files, first, tmp_path, processes, devices):
    out = tmp_path / "out"
    logs = _run_job(files, out, processes, devices)
    assert "implied scaling factor 1/rms" in logs[0]
    ref, got = _stored(first[0]), _stored(out)
    assert got["index"].tolist() == READABLE and got["label"].tolist() == LABELS
    # Another per-device batch changes XLA's convolution blocking: a few float32 ulps of the largest values.
    assert np.abs(got["latent"] - ref["latent"]).max() <= 1e-6 * np.abs(ref["latent"]).max()
    meta, ref_meta = (json.loads((d / "metadata.json").read_text()) for d in (out, first[0]))
    assert meta["shards"] == ref_meta["shards"] and meta["num_examples"] == 6
    assert meta["stats"]["rms"] == pytest.approx(ref_meta["stats"]["rms"], rel=1e-6)
    assert "(3 written, 0 already finished" in logs[0]  # counted over all processes
    hint = (
        f"next: python -m dcae_jax.main --config=configs/uvit.py:model=uvit-h,batch=1024,latents={out},"
        f"autoencoder={files['model']} --workdir=RUNDIR"
    )
    assert [log.count(hint) for log in logs] == [1] + [0] * (processes - 1)  # the command's last word, process 0's


def test_a_channel_prefix_of_a_structured_latent(files, tmp_path):
    """A DC-AE 1.5-style model (no shortcut around its latent): `latent_channels=c` stores the first c channels,
    exactly `DCAE.encode(x, latent_channels=c)`; a model whose shortcuts mix the channels is refused."""
    config = tiny_config(scaling_factor=SCALE, encoder_out_shortcut=False, decoder_in_shortcut=False)
    ae = DCAE(config, DCAE.from_pretrained(files["model"]).variables)
    r = pl.precompute(ae, files["data"], RES, tmp_path / "out", latent_channels=3, **KW)
    assert r["latent_shape"] == [RES // 8, RES // 8, 3]
    paths = [p for p in list_images(files["photos"]) if p.name != "broken.jpg"]
    x = np.stack([load_image(p, resolution=RES) for p in paths])
    want = np.asarray(ae.encode(x, latent_channels=3)) * np.float32(SCALE)
    np.testing.assert_allclose(_stored(tmp_path / "out")["latent"], want, rtol=0, atol=ULPS * np.abs(want).max())
    with pytest.raises(ValueError, match="shortcuts around its latent"):
        pl.precompute(str(files["model"]), files["data"], RES, tmp_path / "other", latent_channels=3, **KW)


@pytest.mark.gcs
def test_precompute_to_gcs_resumes_and_trains_from_it(files, first, gcs_dir, tmp_path, monkeypatch):
    """Model read from gs://, latents written to gs:// (one upload per file), a lost shard rewritten alone, and the
    training loader reads the bucket in place, equal to the local run."""
    from dcae_jax.data.latents import make_latent_train_loader
    from dcae_jax.runtime import paths

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DCAE_JAX_CACHE", str(tmp_path / "cache"))
    model = f"{gcs_dir}/tiny-model"
    paths.copytree(files["model"], model)
    out = paths.path(f"{gcs_dir}/latents")
    r = pl.precompute(model, files["data"], RES, str(out), **KW)
    assert (r["shards_written"], r["num_examples"]) == (3, 6)
    npy = {n: b for n, b in _files(first[0]).items() if n.endswith(".npy")}
    assert {n: (out / n).read_bytes() for n in npy} == npy  # byte-identical shards (the indexes name the model)
    (out / "shard-00001-of-00003.json").unlink()
    calls = []
    real = fmt.write_shard
    monkeypatch.setattr(fmt, "write_shard", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    r = pl.precompute(model, files["data"], RES, str(out), **KW)
    assert calls == [1] and (r["shards_written"], r["shards_skipped"]) == (1, 2)

    remote, local = fmt.LatentDataset(str(out)), fmt.LatentDataset(first[0])
    assert len(remote) == len(local) == 6
    for i in range(6):
        np.testing.assert_array_equal(remote[i]["latent"], local[i]["latent"])
        assert remote[i]["label"] == local[i]["label"]
    batches = [
        next(iter(make_latent_train_loader(str(d), global_batch_size=4, seed=0, worker_count=0)))
        for d in (out, first[0])
    ]
    np.testing.assert_array_equal(batches[0]["latent"], batches[1]["latent"])
    assert not (tmp_path / "gs:").exists()  # nothing went to a local "gs:" folder


def test_packed_shards_give_the_same_latents_labels_and_class_names(files, first, tmp_path):
    """`arrayrecord:` (dcae_jax.pack of the same folder): the latents, labels and class names of `folder:`."""
    from dcae_jax.data import shards

    shards.pack_folder(str(files["photos"]), str(tmp_path / "packed"), images_per_shard=4)
    out = tmp_path / "out"
    r = pl.precompute(str(files["model"]), f"arrayrecord:{tmp_path / 'packed'}", RES, out, **{**KW, "verbose": False})
    assert r["class_names"] == ["cats", "objects"] and r["label_source"] == "folder"
    # The packer leaves the corrupt file out (listed in its manifest): 6 records, all readable.
    assert (r["num_records"], r["num_examples"]) == (6, 6)
    want, got = fmt.LatentDataset(first[0]), fmt.LatentDataset(out)
    for i in range(6):  # without the corrupt record each photo sits in another row of its batch: ulps apart
        z = want[i]["latent"]
        np.testing.assert_allclose(got[i]["latent"], z, rtol=0, atol=ULPS * np.abs(z).max())
        assert got[i]["label"] == want[i]["label"]

    # Images next to class sub-folders: `folder:` refuses them, the packer keeps them unlabelled (an autoencoder
    # needs no labels), and their latents get one class, label 0, as a flat folder's (not -1, which is no class).
    mixed = tmp_path / "mixed"
    shutil.copytree(files["photos"], mixed)
    shutil.copy(mixed / "objects" / "camera.png", mixed / "loose.png")
    with pytest.raises(ValueError, match="lie directly in the folder next to class sub-folders"):
        pl.precompute(str(files["model"]), f"folder:{mixed}", RES, tmp_path / "refused", **{**KW, "verbose": False})
    shards.pack_folder(str(mixed), str(tmp_path / "packed_mixed"), images_per_shard=4)
    with pytest.warns(UserWarning, match="packed without labels"):
        r = pl.precompute(
            str(files["model"]), f"arrayrecord:{tmp_path / 'packed_mixed'}", RES, tmp_path / "mixed_out", **KW
        )
    data = fmt.LatentDataset(tmp_path / "mixed_out")
    assert r["class_names"] == ["all"] and data.num_classes == 1 and data.trained_classes == [0]
    assert {int(data[i]["label"]) for i in range(len(data))} == {0}
