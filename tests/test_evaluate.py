"""`python -m dcae_jax.evaluate` and `python -m dcae_jax.fid_stats` end to end, offline.

A tiny random DC-AE export, a folder of small real photos plus one corrupt file, random FID Inception and AlexNet
LPIPS weights files: every metric is computed, and checked against the same metrics computed image by image with
the public APIs. `frechet_distance` is spied on (its inputs are checked; its parity with pytorch-fid is tested in
tests/metrics/test_fid.py): a 2048-d `sqrtm` costs ~30 s on a small CPU.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dcae_jax import evaluate, fid_stats
from dcae_jax.autoencoder.model import init_variables, tiny_config
from dcae_jax.autoencoder.pretrained import DCAE
from dcae_jax.data.images import list_images, load_image, to_uint8
from dcae_jax.metrics import fid as fid_lib
from dcae_jax.metrics import lpips as lpips_lib
from dcae_jax.metrics.image import psnr_ssim

RES = 32


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Model export, photo folder (3 readable, 1 corrupt), FID and LPIPS weights."""
    from skimage import data

    root = tmp_path_factory.mktemp("evaluate")
    config = tiny_config()
    DCAE(config, init_variables(config, jax.random.key(0))).save_pretrained(root / "tiny-model")
    photos = root / "photos"
    photos.mkdir()
    Image.fromarray(data.astronaut()).resize((80, 64), Image.BOX).save(photos / "astronaut.png")
    Image.fromarray(data.coffee()).resize((70, 90), Image.BOX).save(photos / "coffee.jpg", quality=95)
    Image.fromarray(data.chelsea()).resize((48, 48), Image.BOX).save(photos / "chelsea.png")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    fid_lib.save_fid_weights(fid_lib.init_fid_variables(0), root / "fid_inception.npz")
    rng = np.random.default_rng(0)
    sds: dict[str, dict] = {"backbone": {}, "lin": {}}
    for source, table in lpips_lib.weight_entries("alex").items():
        for e in table:
            sds[source][e.torch[0]] = rng.standard_normal(e.torch_shape).astype(np.float32) * 0.1
    variables = lpips_lib.convert_lpips_weights(sds["backbone"], sds["lin"], "alex")
    lpips_lib.save_lpips_weights(variables, root / "lpips_alex.npz", "alex")
    return {
        "root": root,
        "model": root / "tiny-model",
        "photos": photos,
        "fid": root / "fid_inception.npz",
        "lpips": root / "lpips_alex.npz",
    }


@pytest.fixture(scope="module")
def expected(files):
    """Every metric computed image by image with the public APIs (no mesh, no loader, no masking)."""
    ae = DCAE.from_pretrained(files["model"])
    paths = [p for p in list_images(files["photos"]) if p.name != "broken.jpg"]
    x = np.stack([load_image(p, resolution=RES) for p in paths])  # ADM center crop, [-1, 1]
    z = np.asarray(ae.encode(x), np.float64)
    ref_u8, rec_u8 = to_uint8(x), to_uint8(np.asarray(ae.reconstruct(x)))
    p, s = (np.asarray(v, np.float64) for v in psnr_ssim(ref_u8, rec_u8))
    lp_net, lp_vars = lpips_lib.load_lpips(files["lpips"])
    signed = lambda u: jnp.asarray(u, jnp.float32) / 255 * 2 - 1
    lp = np.asarray(lp_net.apply(lp_vars, signed(ref_u8), signed(rec_u8)), np.float64)
    net, variables = fid_lib.load_fid_inception(files["fid"])
    feats = np.asarray(jax.jit(net.apply)(variables, jnp.asarray(np.concatenate([rec_u8, ref_u8]))))
    n = len(paths)
    return {
        "n": n,
        "psnr": p.mean(),
        "ssim": s.mean(),
        "lpips": lp.mean(),
        "z_mean": z.mean(),
        "z_rms": np.sqrt(np.mean(z**2)),
        "z_std": z.std(),
        "rec": fid_lib.FeatureStats().update(feats[:n]),
        "real": fid_lib.FeatureStats().update(feats[n:]),
    }


@pytest.fixture
def frechet_spy(monkeypatch):
    calls = []

    def spy(mu1, sigma1, mu2, sigma2, eps=1e-6):
        calls.append(tuple(np.asarray(a) for a in (mu1, sigma1, mu2, sigma2)))
        return 123.25

    monkeypatch.setattr(fid_lib, "frechet_distance", spy)
    return calls


# Reconstructions computed at another batch size / device split differ in float rounding, which can flip a uint8
# rounding here and there; with 3 images the covariance is sensitive to that.
REC_STATS_TOL = 1e-3


def _close_stats(mu, sigma, want: fid_lib.FeatureStats, tol: float = 1e-4):
    assert np.abs(mu - want.mean).max() <= tol * np.abs(want.mean).max()
    assert np.abs(sigma - want.cov).max() <= tol * np.abs(want.cov).max()


def test_evaluate_every_metric(files, expected, frechet_spy, tmp_path, capsys):
    out = tmp_path / "res" / "results.json"
    args = ["--model", str(files["model"]), "--data", f"folder:{files['photos']}", "--resolution", str(RES)]
    args += ["--output", str(out), "--batch_size", "2", "--fid_weights", str(files["fid"])]
    args += ["--lpips_weights", str(files["lpips"])]
    assert evaluate.main(args) == 0
    r = json.loads(out.read_text())

    assert (r["num_records"], r["num_images"], r["num_skipped"]) == (4, 3, 1)  # broken.jpg counted, not fatal
    assert any("1 record(s) could not be read" in n for n in r["notes"])
    assert any("rFID from 3 images (fewer than the 2048 feature dimensions" in n for n in r["notes"])
    assert r["config_name"] == "tiny" and r["model_label"] == "tiny-model" and r["resolution"] == RES
    assert r["batch_size"] == -(-2 // jax.device_count()) * jax.device_count()  # rounded up to the devices
    assert r["devices"] == jax.device_count() and r["processes"] == 1
    assert r["psnr"] == pytest.approx(expected["psnr"], rel=1e-5)
    assert r["ssim"] == pytest.approx(expected["ssim"], rel=1e-4, abs=1e-6)
    assert r["lpips"] == pytest.approx(expected["lpips"], rel=1e-4) and r["lpips_net"] == "alex"
    lat = r["latent"]
    assert lat["shape"] == [RES // 8, RES // 8, 8] and lat["scaling_factor"] == 1.0
    assert lat["mean"] == pytest.approx(expected["z_mean"], rel=1e-4, abs=1e-6)
    assert lat["rms"] == pytest.approx(expected["z_rms"], rel=1e-5)
    assert lat["std"] == pytest.approx(expected["z_std"], rel=1e-5)

    # rFID: reconstructions against the real images of the same pass.
    assert r["rfid"] == 123.25 and r["fid_reference"] == "real images (same pass)"
    (mu1, s1, mu2, s2), *more = frechet_spy
    assert not more
    _close_stats(mu1, s1, expected["rec"], REC_STATS_TOL)
    _close_stats(mu2, s2, expected["real"])

    md = out.with_suffix(".md").read_text()
    assert md.startswith("| model | res | rFID | PSNR | SSIM | LPIPS |")
    row = f"| tiny-model | {RES} | 123.25 | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['lpips']:.4f} |"
    assert row in md and row in r["markdown"] and row in capsys.readouterr().out


def test_evaluate_without_weights(files, tmp_path, capsys, monkeypatch):
    """Offline with no default weights file: PSNR/SSIM are scored, LPIPS/rFID are null with notes saying why."""
    from dcae_jax.metrics import weights

    monkeypatch.setenv(weights.WEIGHTS_DIR_ENV, str(tmp_path / "no_weights"))

    def offline(*a, **k):
        raise ConnectionError("could not obtain the package (offline)")

    monkeypatch.setattr(weights, "prepare", offline)
    out = tmp_path / "results.json"
    args = ["--model", str(files["model"]), "--data", f"folder:{files['photos']}", "--resolution", str(RES)]
    args += ["--output", str(out), "--batch_size", "3", "--max_images", "3", "--dtype", "bfloat16"]
    assert evaluate.main(args) == 0
    r = json.loads(out.read_text())
    assert (r["num_records"], r["num_images"], r["num_skipped"]) == (3, 2, 1)  # astronaut, broken, chelsea
    assert r["rfid"] is None and r["lpips"] is None and r["fid_reference"] is None and r["lpips_net"] is None
    assert r["psnr"] > 0 and 0 < r["ssim"] <= 1 and r["dtype"] == "bfloat16"
    notes = "\n".join(r["notes"])
    assert "rFID not computed: the default weights could not be made (could not obtain the package" in notes
    assert "LPIPS not computed: the default weights could not be made" in notes
    assert "python -m dcae_jax.fetch_weights" in notes and "--lpips_weights lpips_alex.npz" in notes
    assert f"| tiny-model | {RES} | n/a |" in r["markdown"] and r["markdown"].endswith("| n/a |")
    assert "--fid_weights fid_inception.npz" in capsys.readouterr().err


def test_fid_stats_cli_and_ref_stats(files, expected, frechet_spy, tmp_path, capsys):
    ref = tmp_path / "stats" / "ref.npz"
    args = ["--data", f"folder:{files['photos']}", "--resolution", str(RES), "--out", str(ref)]
    assert fid_stats.main([*args, "--fid_weights", str(files["fid"]), "--batch_size", "2"]) == 0
    assert "mu/sigma of 3 images (1 skipped)" in capsys.readouterr().out
    with np.load(ref) as z:  # pytorch-fid's --save-stats layout
        assert sorted(z.files) == ["mu", "sigma"] and z["sigma"].shape == (2048, 2048)
    mu, sigma = fid_lib.load_stats(ref)
    _close_stats(mu, sigma, expected["real"])

    out = tmp_path / "results.json"
    args = ["--model", str(files["model"]), "--data", f"folder:{files['photos']}", "--resolution", str(RES)]
    args += ["--output", str(out), "--batch_size", "2", "--fid_weights", str(files["fid"]), "--ref_stats", str(ref)]
    assert evaluate.main([*args, "--lpips_weights", str(files["lpips"])]) == 0
    r = json.loads(out.read_text())
    assert r["rfid"] == 123.25 and r["fid_reference"] == str(ref) and r["lpips"] is not None
    (mu1, s1, mu2, s2), *more = frechet_spy
    assert not more
    _close_stats(mu1, s1, expected["rec"], REC_STATS_TOL)
    np.testing.assert_array_equal(mu2, mu)  # the file, as given
    np.testing.assert_array_equal(s2, sigma)


def test_missing_files_fail_early(files, tmp_path, capsys):
    base = ["--model", str(files["model"]), "--data", f"folder:{files['photos']}", "--resolution", str(RES)]
    base += ["--output", str(tmp_path / "r.json")]
    assert (
        evaluate.main([*base, "--fid_weights", str(tmp_path / "fid_inception.npz")]) == 2
    )  # FileNotFoundError: one line, exit 2
    assert re.search(r"fid_inception\.npz: FID Inception weights not found", capsys.readouterr().err)
    assert (
        evaluate.main([*base, "--fid_weights", str(files["fid"]), "--ref_stats", str(tmp_path / "ref.npz")]) == 2
    )  # FileNotFoundError: one line, exit 2
    assert re.search(r"ref\.npz: FID reference statistics not found", capsys.readouterr().err)
    assert (
        fid_stats.main(["--data", "bundled", "--resolution", "32", "--out", "x.npz", "--fid_weights", "nope.npz"]) == 2
    )  # FileNotFoundError: one line, exit 2
    assert re.search("FID Inception weights not found", capsys.readouterr().err)
    assert not (tmp_path / "r.json").exists()


def test_a_model_with_non_finite_outputs_is_not_scored(files, tmp_path, capsys):
    """Finite but huge weights overflow to inf/NaN images: evaluate and reconstruct refuse to score them."""
    from dcae_jax import reconstruct

    config = tiny_config()
    variables = init_variables(config, jax.random.key(0))
    head = variables["params"]["decoder"]["head_conv"]["conv"]
    head["kernel"] = head["kernel"] * 3e38
    DCAE(config, variables).save_pretrained(tmp_path / "overflowing")
    args = ["--model", str(tmp_path / "overflowing"), "--data", str(files["photos"]), "--resolution", str(RES)]
    args += ["--output", str(tmp_path / "r.json"), "--lpips_weights", str(files["lpips"])]
    args += ["--fid_weights", str(files["fid"])]
    assert evaluate.main(args) == 2  # ValueError: one line, exit 2
    assert re.search(r"non-finite \(NaN/inf\) latents or reconstructions for 3 of 3 images", capsys.readouterr().err)
    assert not (tmp_path / "r.json").exists()
    assert (
        reconstruct.main(
            [
                "--model",
                str(tmp_path / "overflowing"),
                "--input",
                str(files["photos"]),
                "--output",
                str(tmp_path / "rec"),
            ]
        )
        == 2
    )  # ValueError: one line, exit 2
    assert re.search("non-finite", capsys.readouterr().err)


@pytest.mark.gcs
def test_everything_on_gcs(files, expected, frechet_spy, gcs_dir, tmp_path, monkeypatch):
    """Model, photos (folder:gs://), weight files and both outputs in the bucket: the same numbers as locally."""
    from dcae_jax.runtime import paths

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DCAE_JAX_CACHE", str(tmp_path / "cache"))
    for name in ("tiny-model", "photos"):
        paths.copytree(files["root"] / name, f"{gcs_dir}/{name}")
    for name in ("fid_inception.npz", "lpips_alex.npz"):
        paths.write_bytes_atomic(f"{gcs_dir}/{name}", (files["root"] / name).read_bytes())
    ref = f"{gcs_dir}/stats/ref.npz"
    data = ["--data", f"folder:{gcs_dir}/photos", "--resolution", str(RES), "--batch_size", "2"]
    assert fid_stats.main([*data, "--out", ref, "--fid_weights", f"{gcs_dir}/fid_inception.npz"]) == 0
    mu, sigma = fid_lib.load_stats(ref)
    _close_stats(mu, sigma, expected["real"])

    out = f"{gcs_dir}/res/results.json"
    args = [*data, "--model", f"{gcs_dir}/tiny-model", "--output", out, "--ref_stats", ref]
    args += ["--fid_weights", f"{gcs_dir}/fid_inception.npz", "--lpips_weights", f"{gcs_dir}/lpips_alex.npz"]
    assert evaluate.main(args) == 0
    r = json.loads(paths.path(out).read_text())
    assert (r["num_images"], r["num_skipped"]) == (3, 1)
    assert r["psnr"] == pytest.approx(expected["psnr"], rel=1e-5)
    assert r["lpips"] == pytest.approx(expected["lpips"], rel=1e-4) and r["rfid"] == 123.25
    assert paths.path(out).with_suffix(".md").read_text().startswith("| model | res | rFID |")
    assert not (tmp_path / "gs:").exists()
