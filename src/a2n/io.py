"""Reading images from disk into numpy arrays, with errors that name the file."""

from __future__ import annotations

from a2n import A2NError

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")


class ImageReadError(A2NError):
    """A file that is missing, empty, corrupt or not an image."""


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image, turning every failure into ImageReadError."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: the file is empty (0 bytes)")
    try:
        img = Image.open(path)
        img.load()
    except Image.DecompressionBombError as exc:
        raise ImageReadError(
            f"{path}: the image is larger than Pillow's safety limit ({exc}); raise it with --max-pixels if you trust the file"
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageReadError(f"{path}: not an image file Pillow can read (PNG, JPEG, WebP, TIFF, BMP)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{path}: corrupt or truncated image ({exc})") from exc
    return img


def read_rgb8(path: str | os.PathLike) -> np.ndarray:
    """An image as HxWx3 uint8 RGB; grayscale is repeated over the three channels."""
    img = open_image(path)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 / 65535.0 if img.mode != "F" else 255.0
        return np.repeat(np.clip(np.round(arr * scale), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside a folder, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def write_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 HxW or HxWx3 array as PNG atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        Image.fromarray(array).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
