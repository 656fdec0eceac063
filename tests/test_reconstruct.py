"""`python -m dcae_jax.reconstruct` end to end on a tiny random model and a few real photos."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from dcae_jax import reconstruct
from dcae_jax.autoencoder import inference
from dcae_jax.autoencoder.model import init_variables, tiny_config
from dcae_jax.autoencoder.pretrained import DCAE


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    config = tiny_config()
    out = tmp_path_factory.mktemp("tiny_model")
    variables = init_variables(config, jax.random.key(0))
    DCAE(config, variables).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    from skimage import data

    d = tmp_path_factory.mktemp("photos")
    (d / "sub").mkdir()
    # 48x40 is a multiple of 8; 45x37 is not and pads to the same 48x40 (one compile for both).
    Image.fromarray(data.astronaut()).resize((40, 48), Image.BOX).save(d / "astronaut.png")
    Image.fromarray(data.coffee()).resize((37, 45), Image.BOX).save(d / "sub" / "coffee.JPG", quality=95)
    Image.fromarray(data.chelsea()).resize((40, 48), Image.BOX).convert("L").save(d / "sub" / "chelsea.webp")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (d / "readme.txt").write_text("not an image")
    return d


def test_reconstruct_folder(tiny_model_dir, photo_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = reconstruct.main(["--model", str(tiny_model_dir), "--input", str(photo_dir), "--output", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    names = sorted(r["name"] for r in res["images"])
    assert names == ["astronaut.png", "sub/chelsea.webp", "sub/coffee.JPG"]
    assert [f["name"] for f in res["failed"]] == ["broken.jpg"]
    for r in res["images"]:
        assert np.isfinite(r["psnr"]) and 0 < r["psnr"] < 100
        assert -1 <= r["ssim"] <= 1
        rec = Image.open(out / r["reconstruction"])
        cmp = Image.open(out / r["comparison"])
        assert rec.size == (r["width"], r["height"]) and rec.mode == "RGB"
        assert cmp.size == (2 * r["width"], r["height"])
    assert {(r["width"], r["height"]) for r in res["images"]} == {(40, 48), (37, 45)}
    assert (out / "reconstructions" / "sub" / "coffee.png").exists()
    assert res["mean"]["psnr"] == pytest.approx(np.mean([r["psnr"] for r in res["images"]]))
    md = (out / "results.md").read_text()
    assert "| **mean** |" in md and "sub/coffee.JPG" in md and "broken.jpg" in md
    captured = capsys.readouterr()
    assert "| **mean** |" in captured.out
    assert "broken.jpg" in captured.err


def test_reconstruct_single_file_with_resolution(tiny_model_dir, photo_dir, tmp_path):
    out = tmp_path / "out"
    args = ["--model", str(tiny_model_dir), "--input", str(photo_dir / "astronaut.png"), "--output", str(out)]
    assert reconstruct.main([*args, "--resolution", "32", "--dtype", "bfloat16"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["dtype"] == "bfloat16" and res["resolution"] == 32 and res["failed"] == []
    [r] = res["images"]
    assert (r["width"], r["height"]) == (32, 32) and r["reconstruction"] == "reconstructions/astronaut.png"


def test_reconstruct_errors(tiny_model_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert reconstruct.main(["--model", str(tiny_model_dir), "--input", str(empty), "--output", str(tmp_path)]) == 2
    (empty / "bad.png").write_bytes(b"")
    out = tmp_path / "out"
    capsys.readouterr()
    # Nothing readable: one error line naming the report of why, exit 2, and no "wrote ..." summary.
    assert reconstruct.main(["--model", str(tiny_model_dir), "--input", str(empty), "--output", str(out)]) == 2
    assert json.loads((out / "results.json").read_text())["failed"][0]["name"] == "bad.png"
    captured = capsys.readouterr()
    assert f"reconstruct: error: none of the 1 images under {empty} could be read: see {out}/results.md" in captured.err
    assert "wrote" not in captured.out


def test_output_names_never_collide(tmp_path):
    paths = [tmp_path / "a.jpg", tmp_path / "a.png", tmp_path / "s" / "b.png"]
    names = [n.as_posix() for n in inference.output_names(paths, tmp_path)]
    assert names == ["a_jpg.png", "a_png.png", "s/b.png"]


@pytest.mark.gcs
def test_reconstruct_from_and_to_gcs(tiny_model_dir, photo_dir, gcs_dir, tmp_path, monkeypatch):
    """Model, photos and outputs in the bucket: the same results and PNG bytes as a local run."""
    from dcae_jax.runtime import paths

    monkeypatch.chdir(tmp_path)
    paths.copytree(tiny_model_dir, f"{gcs_dir}/model")
    paths.copytree(photo_dir, f"{gcs_dir}/photos")
    local = tmp_path / "local"
    assert reconstruct.main(["--model", str(tiny_model_dir), "--input", str(photo_dir), "--output", str(local)]) == 0
    out = paths.path(f"{gcs_dir}/out")
    args = ["--model", f"{gcs_dir}/model", "--input", f"{gcs_dir}/photos", "--output", str(out)]
    assert reconstruct.main(args) == 0
    want = json.loads((local / "results.json").read_text())
    got = json.loads((out / "results.json").read_text())
    assert got["images"] == want["images"] and got["failed"] == want["failed"]
    for r in got["images"]:
        assert (out / r["reconstruction"]).read_bytes() == (local / r["reconstruction"]).read_bytes()
        assert (out / r["comparison"]).read_bytes() == (local / r["comparison"]).read_bytes()
    assert not (tmp_path / "gs:").exists()
