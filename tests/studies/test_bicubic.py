"""The equal-size bicubic baseline: the side never holds more values than the latent; real photos score sanely."""

from PIL import Image
from skimage import data

from dcae_jax import bicubic
from dcae_jax.studies import measure


def test_side_matches_the_latent_budget():
    assert measure.baseline_side(128, 16, 16) == 18  # 972 values <= 8 * 8 * 16 = 1024
    assert measure.baseline_side(512, 32, 32) == 52  # 8112 <= 16 * 16 * 32 = 8192
    for r, f, c in [(128, 16, 16), (256, 64, 128), (512, 32, 32), (1024, 128, 512)]:
        s = measure.baseline_side(r, f, c)
        assert 3 * s * s <= (r // f) ** 2 * c < 3 * (s + 1) ** 2


def test_roundtrip_on_real_photos():
    images = [Image.fromarray(data.astronaut()), Image.fromarray(data.coffee())]
    x, y = measure.bicubic_roundtrip(images, 64, 9)
    assert x.shape == y.shape == (2, 64, 64, 3) and x.min() >= -1 and y.max() <= 1.5
    err = abs(x - y).mean()
    assert 0.01 < err < 0.3  # a real loss of detail, not garbage
    x2, y2 = measure.bicubic_roundtrip(images, 64, 64)  # no downsampling: (almost) identity
    assert abs(x2 - y2).max() < 1e-6


def test_cli_without_lpips(capsys):
    assert bicubic.main(["--resolution", "64", "--factor", "16", "--channels", "16", "--no_lpips"]) == 0
    out = capsys.readouterr().out
    assert '"side": 9' in out and '"psnr"' in out and '"lpips"' not in out
