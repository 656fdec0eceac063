"""Documents how `dcae_jax.metrics.image.ssim` (skimage's convention) differs from torchmetrics' SSIM.

The DC-AE reference evaluator uses `torchmetrics.image.StructuralSimilarityIndexMeasure(data_range=(0, 255))` on
uint8 images. Same Gaussian window (11 taps, sigma 1.5), constants and variance estimate, but torchmetrics
reflect-pads the image by 5 pixels and averages the SSIM map over the FULL image, border included, while skimage
(and we) average only the valid region. Measured here on real photos (noise / blur / posterize distortions):
cropping torchmetrics' full map to the valid region reproduces our values to float32 rounding (< 5e-5), and the
full-image mean is lower on average: by 0.0025 (per image up to 0.010, either sign) at 256x256 and by 0.0071 (up
to 0.032) at 64x64. The gap shrinks with resolution (border share ~ 20 / R) and is not a constant offset: do not
compare our SSIM with published DC-AE SSIM numbers at the third decimal.
"""

import numpy as np
import pytest
from scipy import ndimage
from skimage import data
from skimage.transform import resize

from dcae_jax.metrics.image import ssim

CROP_TOL = 5e-5  # float32 rounding (torch's 2-D conv on raw [0, 255] values vs our centered separable filter)


def _pairs(hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    a, b = [], []
    for name in ("astronaut", "coffee", "chelsea"):
        p = resize(getattr(data, name)(), hw, anti_aliasing=True)
        for q in (p + rng.normal(0, 0.05, p.shape), ndimage.gaussian_filter(p, (1, 1, 0)), np.round(p * 16) / 16):
            a.append(p)
            b.append(np.clip(q, 0, 1))
    to_u8 = lambda x: (np.stack(x) * 255 + 0.5).astype(np.uint8)
    return to_u8(a), to_u8(b)


@pytest.mark.parametrize(("hw", "mean_gap", "max_gap"), [((64, 64), 0.0071, 0.0317), ((256, 256), 0.0025, 0.0104)])
def test_ssim_vs_torchmetrics(hw, mean_gap, max_gap):
    torch = pytest.importorskip("torch")
    tm = pytest.importorskip("torchmetrics")
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    ref, pred = _pairs(hw)
    ours = np.asarray(ssim(ref, pred), np.float64)
    t_ref, t_pred = (torch.from_numpy(x).permute(0, 3, 1, 2) for x in (ref, pred))
    # The reference evaluator's module on uint8 tensors (preds first), as it is called there.
    metric = tm.image.StructuralSimilarityIndexMeasure(data_range=(0.0, 255.0))
    metric.update(t_pred, t_ref)
    module_mean = float(metric.compute())
    theirs, full = tm_ssim(
        t_pred.float(), t_ref.float(), data_range=(0.0, 255.0), reduction="none", return_full_image=True
    )
    theirs = theirs.numpy().astype(np.float64)
    assert module_mean == pytest.approx(theirs.mean(), abs=1e-6)

    cropped = full[..., 5:-5, 5:-5].reshape(len(ref), -1).mean(-1).numpy()  # valid region only
    gap = ours - theirs
    print(
        f"SSIM {hw}: ours {ours.mean():.4f}, torchmetrics {theirs.mean():.4f}; gap mean {gap.mean():.4f} "
        f"max |gap| {np.abs(gap).max():.4f}; vs torchmetrics cropped to the valid region: {np.abs(ours - cropped).max():.1e}"
    )
    np.testing.assert_allclose(ours, cropped, atol=CROP_TOL, rtol=0)
    assert gap.mean() == pytest.approx(mean_gap, abs=5e-4)
    assert np.abs(gap).max() == pytest.approx(max_gap, abs=2e-3)
