"""PSNR / SSIM parity with scikit-image on real photos (skimage.data) with synthetic distortions."""

import numpy as np
import pytest
from scipy import ndimage
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from dcae_jax.metrics.image import psnr, psnr_ssim, quantize_uint8, ssim

TOL = 1e-4


def _ref_ssim(a, b):
    return structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=-1
    )


def _distort(a: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    f = a.astype(np.float64)
    if kind == "noise":
        f = f + rng.normal(0, 12, a.shape)
    elif kind == "blur":
        f = ndimage.gaussian_filter(f, (1.2, 1.2, 0))
    elif kind == "shift":
        f = np.roll(f, (2, -3), axis=(0, 1))
    elif kind == "posterize":
        f = f // 24 * 24
    elif kind == "tiny":  # near-identical: PSNR ~ 50 dB, SSIM ~ 1
        f = f + rng.integers(-1, 2, a.shape)
    elif kind == "flat":
        f = np.full_like(f, 100.0)
    return np.clip(np.rint(f), 0, 255).astype(np.uint8)


def _to_float(u8: np.ndarray) -> np.ndarray:
    return (u8.astype(np.float32) / 127.5 - 1.0).astype(np.float32)


@pytest.fixture(scope="module")
def photos():
    # Downscaled a little to keep the test fast; odd sizes on purpose.
    return {
        "astronaut": data.astronaut()[::2, ::2][:251],
        "coffee": data.coffee()[::2, ::2][:, :293],
        "chelsea": data.chelsea()[::2, ::2],
    }


KINDS = ["noise", "blur", "shift", "posterize", "tiny", "flat"]


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_parity_with_skimage(photos, name):
    rng = np.random.default_rng(0)
    a = photos[name]
    batch = np.stack([_distort(a, k, rng) for k in KINDS])
    refs = np.broadcast_to(a, batch.shape)
    p_u8, s_u8 = (np.asarray(v) for v in psnr_ssim(refs, batch, ssim_style="skimage"))
    # Float inputs in [-1, 1] go through the reference quantization and must give the same numbers.
    p_f, s_f = (np.asarray(v) for v in psnr_ssim(_to_float(refs), _to_float(batch), ssim_style="skimage"))
    for i, k in enumerate(KINDS):
        rp = peak_signal_noise_ratio(a, batch[i], data_range=255)
        rs = _ref_ssim(a, batch[i])
        assert abs(p_u8[i] - rp) <= TOL, (name, k, p_u8[i], rp)
        assert abs(s_u8[i] - rs) <= TOL, (name, k, s_u8[i], rs)
        assert abs(p_f[i] - rp) <= TOL, (name, k)
        assert abs(s_f[i] - rs) <= TOL, (name, k)
    np.testing.assert_allclose(np.asarray(psnr(refs, batch)), p_u8, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ssim(refs, batch, style="skimage")), s_u8, rtol=0, atol=1e-6)


def test_quantize_uint8_rounds_half_up_and_clamps():
    x = np.array([-2.0, -1.0, 1.0, 3.0], np.float32)
    np.testing.assert_array_equal(np.asarray(quantize_uint8(x)), [0, 0, 255, 255])
    u = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(quantize_uint8(_to_float(u))), u)  # exact round trip
    half = (np.array([10.5, 11.5, 254.49], np.float64) / 127.5 - 1.0).astype(np.float32)
    ref = np.clip(np.floor(255 * (half + 1) / 2 + 0.5), 0, 255)
    np.testing.assert_array_equal(np.asarray(quantize_uint8(half)), ref)
    assert np.asarray(quantize_uint8(np.array([0.0], np.float32)))[0] == 128  # 127.5 rounds up


def test_identical_images_and_bad_shapes():
    a = data.chelsea()[:40, :60]
    p, s = psnr_ssim(a, a)  # HWC is a batch of one
    assert p.shape == (1,) and np.isinf(p[0]) and abs(float(s[0]) - 1.0) < 1e-6
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(a, a[:30])
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a[:10, :10], a[:10, :10])
