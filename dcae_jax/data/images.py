"""Image files: listing, loading to float arrays in [-1, 1], saving, and the ADM center crop.

    paths = list_images("photos/")                  # recursive, sorted; gs://bucket/photos too
    x = load_image(paths[0], resolution=512)        # (512, 512, 3) float32 in [-1, 1]
    save_image(x, "out.png")

Unreadable, corrupt, truncated or empty files raise `ImageReadError` (with `.path`), so a caller can
report and skip them. Listing and reading take local paths and `gs://` URLs (`as_path`); saving is local.
"""

from __future__ import annotations

import io
import os
import pathlib
import warnings

import numpy as np
from etils import epath
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # gif/tiff: the first frame


def as_path(path: str | os.PathLike) -> pathlib.Path | epath.Path:
    """A user's path: `gs://...` as an `etils.epath.Path` (pathlib would read it as the local folder "gs:/..."),
    anything else as a `pathlib.Path` with ~ expanded (local listing and reading stay exactly pathlib's)."""
    from dcae_jax.runtime import paths

    return paths.path(path) if paths.is_remote(path) else pathlib.Path(path).expanduser()


class ImageReadError(Exception):
    """An image file that cannot be read (unreadable, corrupt, truncated, empty or not an image)."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = as_path(path)
        self.reason = reason
        super().__init__(f"{path}: cannot read image ({reason})")


def is_image_file(path: str | os.PathLike) -> bool:
    return pathlib.Path(path).suffix.lower() in IMAGE_EXTENSIONS


def list_images(path: str | os.PathLike) -> list[pathlib.Path] | list[epath.Path]:
    """A file -> [file]; a folder -> every image file under it (recursive, by extension, sorted); local or gs://."""
    p = as_path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if isinstance(p, pathlib.Path):
        return sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f))
    return sorted(_walk_images(p))


def _walk_images(root: epath.Path) -> list[epath.Path]:
    """The image files under a remote folder, from one listing per folder (`walk`) rather than a request per file
    (`rglob` + `is_file`), which matters at millions of objects."""
    out, top = [], None
    for folder, _, names in root.walk():
        # Backends spell the folders differently (gcsfs drops "gs://"): keep only the part below the first, the top.
        top = os.fspath(folder) if top is None else top
        rel = os.fspath(folder)[len(top) :].strip("/")
        base = root / rel if rel else root
        out += [base / name for name in names if is_image_file(name)]
    return out


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":  # 16/32-bit integer or float gray: rescale, don't clip
        a = np.asarray(img).astype(np.float64)
        if img.mode == "F":
            a = a * 255.0 if a.size and a.max() <= 1.0 else a
        else:
            a = a / 257.0 if a.size and a.max() > 255 else a
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Palette images with transparency ..." is expected here
        return img.convert("RGB")


def open_image(path: str | os.PathLike, exif_transpose: bool = True) -> Image.Image:
    """Decodes the whole file (local or gs://) into an RGB PIL image (any mode converted); raises `ImageReadError`."""
    p = as_path(path)
    if not isinstance(p, pathlib.Path):  # remote: one read of the whole object
        try:
            data = p.read_bytes()
        except Exception as err:  # any failed read (missing object, permissions, network) is an unreadable image
            raise ImageReadError(p, f"{type(err).__name__}: {err}") from err
        if not data:
            raise ImageReadError(p, "empty file")
        return _decode(io.BytesIO(data), p, exif_transpose)
    try:
        empty = p.stat().st_size == 0
    except OSError as err:  # missing file, permissions
        raise ImageReadError(p, f"{type(err).__name__}: {err}") from err
    if empty:
        raise ImageReadError(p, "empty file")
    return _decode(p, p, exif_transpose)


def decode_image_bytes(data: bytes, what: str, exif_transpose: bool = True) -> Image.Image:
    """`open_image` for encoded bytes (e.g. tfds records); `what` names the record in errors."""
    if not data:
        raise ImageReadError(what, "empty image bytes")
    return _decode(io.BytesIO(data), what, exif_transpose)


def _decode(fp, what, exif_transpose: bool) -> Image.Image:
    try:
        with Image.open(fp) as img:
            img.load()  # decode now: truncated or corrupt data fails here, not later
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
            if img.width == 0 or img.height == 0:
                raise ImageReadError(what, "zero-size image")
            return _to_rgb(img)
    except ImageReadError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        # OSError covers missing files, PIL.UnidentifiedImageError and "image file is truncated".
        message = str(err).replace(repr(fp), "(bytes)") if isinstance(fp, io.BytesIO) else str(err)  # no address
        raise ImageReadError(what, f"{type(err).__name__}: {message}") from err


def center_crop_adm(pil_img: Image.Image, size: int) -> Image.Image:
    """The ADM / guided-diffusion center crop (`center_crop_arr`, efficientvit `DMCrop`).

    Halves the image with BOX filtering while its short side is >= 2 * size, resizes it with BICUBIC so
    the short side is `size`, then takes the central size x size square.
    """
    while min(*pil_img.size) >= 2 * size:
        pil_img = pil_img.resize(tuple(x // 2 for x in pil_img.size), resample=Image.BOX)
    scale = size / min(*pil_img.size)
    pil_img = pil_img.resize(tuple(round(x * scale) for x in pil_img.size), resample=Image.BICUBIC)
    top = (pil_img.height - size) // 2
    left = (pil_img.width - size) // 2
    return pil_img.crop((left, top, left + size, top + size))  # == arr[top : top + size, left : left + size]


def pil_to_array(img: Image.Image) -> np.ndarray:
    """RGB PIL image -> (H, W, 3) float32 in [-1, 1] (uint8 u maps to u / 127.5 - 1)."""
    return np.asarray(_to_rgb(img), dtype=np.float32) / 127.5 - 1.0


def to_uint8(x) -> np.ndarray:
    """[-1, 1] floats -> uint8 with the same rounding as `dcae_jax.metrics.image.quantize_uint8`."""
    a = np.asarray(x, dtype=np.float32)
    return np.clip(np.floor(255.0 * ((a + 1.0) / 2.0) + 0.5), 0, 255).astype(np.uint8)


def array_to_pil(x) -> Image.Image:
    """(H, W, 3) or (1, H, W, 3) floats in [-1, 1] (clipped) -> RGB PIL image."""
    a = np.asarray(x)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {a.shape}")
    return Image.fromarray(a if a.dtype == np.uint8 else to_uint8(a))


def load_image(path: str | os.PathLike, resolution: int | None = None, exif_transpose: bool = True) -> np.ndarray:
    """An image file -> (H, W, 3) float32 RGB in [-1, 1]; ADM-center-cropped to `resolution` if given.

    Raises `ImageReadError` for unreadable, corrupt, truncated or empty files.
    """
    img = open_image(path, exif_transpose=exif_transpose)
    if resolution is not None:
        img = center_crop_adm(img, resolution)
    return pil_to_array(img)


def save_image(x, path: str | os.PathLike):
    """Writes an (H, W, 3) (or (1, H, W, 3)) image in [-1, 1] (or uint8) as PNG, atomically, locally or to gs://;
    creates parent folders. Returns the path (`etils.epath.Path`)."""
    from dcae_jax.runtime import paths

    p = paths.path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    array_to_pil(x).save(buf, format="PNG")
    return paths.write_bytes_atomic(p, buf.getvalue())


__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageReadError",
    "array_to_pil",
    "as_path",
    "center_crop_adm",
    "is_image_file",
    "list_images",
    "load_image",
    "open_image",
    "pil_to_array",
    "save_image",
    "to_uint8",
]
