"""Image listing, loading (mode conversion, broken files), saving and the ADM center crop."""

import numpy as np
import pytest
from PIL import Image

from dcae_jax.data.images import (
    ImageReadError,
    center_crop_adm,
    decode_image_bytes,
    list_images,
    load_image,
    open_image,
    save_image,
)


def _photo(h=48, w=64):
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((w, h), Image.BICUBIC))


def test_list_images_recursive_and_case_insensitive(tmp_path):
    for rel in [
        "a.JPG",
        "b.jpeg",
        "sub/c.png",
        "sub/deeper/d.WebP",
        "e.bmp",
        "notes.txt",
        "sub/f.tif",
        "g.svg",
        "h.GIF",
    ]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert found == sorted(["a.JPG", "b.jpeg", "e.bmp", "h.GIF", "sub/c.png", "sub/deeper/d.WebP", "sub/f.tif"])
    assert list_images(tmp_path / "sub" / "c.png") == [tmp_path / "sub" / "c.png"]
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "missing")


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA", "P", "1", "CMYK", "I;16"])
def test_load_converts_modes_to_rgb(tmp_path, mode):
    rgb = _photo()
    img = Image.fromarray(rgb)
    if mode == "I;16":
        gray = np.asarray(img.convert("L")).astype(np.uint16) * 257
        img = Image.fromarray(gray)
        assert img.mode.startswith("I")
    elif mode == "P":
        img = img.quantize(64)
        img.info["transparency"] = 0
    else:
        img = img.convert(mode)
    ext = "jpg" if mode == "CMYK" else "png"
    img.save(tmp_path / f"x.{ext}")
    x = load_image(tmp_path / f"x.{ext}")
    assert x.shape == (48, 64, 3) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    if mode == "RGB":
        np.testing.assert_array_equal(np.rint((x + 1) * 127.5).astype(np.uint8), rgb)
    if mode == "I;16":  # 16-bit gray is rescaled, not clipped to white
        ref = np.asarray(Image.fromarray(rgb).convert("L")).astype(np.float32) / 127.5 - 1
        np.testing.assert_allclose(x[..., 0], ref, atol=1.5 / 127.5)
        np.testing.assert_array_equal(x[..., 0], x[..., 2])


def test_broken_files_raise_image_read_error(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "garbage.jpg").write_bytes(b"this is not an image" * 10)
    buf = tmp_path / "full.png"
    Image.fromarray(_photo()).save(buf)
    raw = buf.read_bytes()
    (tmp_path / "truncated.png").write_bytes(raw[: len(raw) // 2])
    Image.fromarray(_photo()).save(tmp_path / "full.jpg", quality=90)
    raw = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(raw[: len(raw) // 3])
    for name in ["empty.png", "garbage.jpg", "truncated.png", "truncated.jpg", "missing.png"]:
        with pytest.raises(ImageReadError) as info:
            load_image(tmp_path / name)
        assert info.value.path.name == name and name in str(info.value)
    assert open_image(tmp_path / "full.png").size == (64, 48)
    # The same checks for encoded bytes (tfds records), named by the record.
    for name in ["empty.png", "garbage.jpg", "truncated.png", "truncated.jpg"]:
        with pytest.raises(ImageReadError, match=f"train/{name}: cannot read image"):
            decode_image_bytes((tmp_path / name).read_bytes(), f"train/{name}")
    decoded = decode_image_bytes((tmp_path / "full.jpg").read_bytes(), "train/full.jpg")
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(open_image(tmp_path / "full.jpg")))


@pytest.mark.parametrize("size_wh", [(64, 48), (300, 200), (97, 1000), (50, 50)])
def test_center_crop_adm_size(size_wh):
    img = Image.fromarray(_photo(size_wh[1], size_wh[0]))
    out = center_crop_adm(img, 32)
    assert out.size == (32, 32) and out.mode == "RGB"


def test_center_crop_adm_matches_reference_steps():
    img = Image.fromarray(_photo(200, 300))  # short side 200 >= 2*64 -> one BOX halving to 150x100
    half = img.resize((150, 100), Image.BOX)
    scaled = np.asarray(half.resize((96, 64), Image.BICUBIC))
    np.testing.assert_array_equal(np.asarray(center_crop_adm(img, 64)), scaled[:, 16:80])


def test_load_with_resolution_and_save_roundtrip(tmp_path):
    Image.fromarray(_photo(90, 70)).save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png", resolution=32)
    assert x.shape == (32, 32, 3)
    out = save_image(x, tmp_path / "out" / "b.png")
    np.testing.assert_allclose(load_image(out), x, atol=1e-6)
    save_image(np.full((1, 8, 8, 3), 2.0, np.float32), tmp_path / "clip.png")  # clipped, batch of one ok
    assert np.asarray(Image.open(tmp_path / "clip.png")).min() == 255
