"""Reading and writing images with errors that name the file.

Pillow decodes and encodes everything except 16-bit color (RGB, RGBA, gray+alpha), which it can
only truncate to 8 bits; OpenCV handles those. Depth comes from the file's sample format, never
from pixel values. EXIF orientation is applied on reading; ICC profile and DPI are carried over.
"""

from __future__ import annotations

from a2n import A2NError

import io
import os
import struct
import uuid
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP"}
ORIENTATION_TAG = 0x0112
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
GRAY16_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageReadError(A2NError):
    """A file that is missing, empty, corrupt, too large or not an image."""


class ImageWriteError(A2NError):
    """An output that cannot be written: an unwritable folder, or a format that cannot hold the image."""


@dataclass
class Picture:
    """Decoded pixels plus what must survive the round trip: alpha, ICC profile, DPI.

    pixels is HxW (gray) or HxWx3 (RGB); uint8, uint16, or float32 in 0..1. alpha is HxW of
    the same dtype, or None.
    """

    pixels: np.ndarray
    alpha: np.ndarray | None = None
    icc_profile: bytes | None = None
    dpi: tuple[float, float] | None = None


def set_max_pixels(limit: int | None) -> None:
    """Set the decompression-bomb guard: files with more pixels are refused (None: no limit)."""
    Image.MAX_IMAGE_PIXELS = limit


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn every way decoding can fail into an ImageReadError that names the file."""
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(
            f"{path}: more pixels than the safety limit of {Image.MAX_IMAGE_PIXELS:,}; "
            "if you trust the file, raise the limit with --max-pixels N"
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageReadError(f"{path}: not an image file Pillow can read (PNG, JPEG, WebP, TIFF, BMP)") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageReadError(f"{path}: corrupt, truncated or unsupported image ({exc})") from exc


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image, turning every failure into ImageReadError."""
    path = Path(path)
    with _reading(path):
        img = Image.open(path)
        img.load()
    return img


def read_rgb8(path: str | os.PathLike) -> np.ndarray:
    """An image as HxWx3 uint8 RGB; grayscale is repeated over the three channels."""
    img = open_image(path)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 / 65535.0 if img.mode != "F" else 255.0
        return np.repeat(np.clip(np.round(arr * scale), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Image files inside a folder (and its subfolders when recursive), sorted by path."""
    found = Path(folder).rglob("*") if recursive else Path(folder).iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def read_image(path: str | os.PathLike) -> Picture:
    """Decode an image file for upscaling: orientation applied, 16-bit kept, alpha split off."""
    path = Path(path)
    with _reading(path):
        return decode(Image.open(path), path)


def decode(img: Image.Image, source: Path | bytes) -> Picture:
    """Decode an opened (not yet loaded) image into a Picture; source is its file or its bytes.

    Pillow truncates 16-bit color to 8 bits, so those files are decoded again from source by OpenCV.
    """
    rawmode = _rawmode(img)
    if img.mode in ("RGB", "RGBA") and ";16" in rawmode:
        picture = _read_deep(source, gray=rawmode.startswith("LA"))
        picture.icc_profile, picture.dpi = img.info.get("icc_profile"), img.info.get("dpi")
    else:
        img.load()
        picture = from_pil(img)
    orientation = img.getexif().get(ORIENTATION_TAG, 1)
    if orientation in range(2, 9):
        picture.pixels = orient(picture.pixels, orientation)
        picture.alpha = orient(picture.alpha, orientation) if picture.alpha is not None else None
        if orientation >= 5 and picture.dpi:
            picture.dpi = (picture.dpi[1], picture.dpi[0])
    return picture


def _rawmode(img: Image.Image) -> str:
    """How the file stores samples (e.g. "RGB;16B"), read from the decoder set-up before loading."""
    if not img.tile:
        return ""
    args = img.tile[0][3]
    return str(args if isinstance(args, str) else args[0])


def _read_deep(source: Path | bytes, gray: bool) -> Picture:
    """A 16-bit color or gray+alpha image through OpenCV, which gives BGR(A): reordered to RGB(A)."""
    import cv2

    data = np.frombuffer(source, np.uint8) if isinstance(source, bytes) else np.fromfile(source, np.uint8)
    arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if arr is None or arr.dtype != np.uint16 or arr.ndim != 3:
        name = "the image" if isinstance(source, bytes) else source
        raise ImageReadError(f"{name}: corrupt or truncated 16-bit image (OpenCV could not decode it)")
    alpha = arr[..., 3].copy() if arr.shape[2] == 4 else None
    pixels = arr[..., 0].copy() if gray else np.ascontiguousarray(arr[..., 2::-1])
    return Picture(pixels, alpha)


def orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1..8) to an HxW or HxWxC array, as a viewer shows it."""
    if orientation >= 5:
        a = a.swapaxes(0, 1)
        orientation -= 4
    if orientation in (2, 3):
        a = a[:, ::-1]
    if orientation in (3, 4):
        a = a[::-1]
    return np.ascontiguousarray(a)


def from_pil(img: Image.Image) -> Picture:
    """A PIL image as a Picture: gray stays gray, 16-bit stays 16-bit, palette and CMYK become RGB(A)."""
    icc, dpi = img.info.get("icc_profile"), img.info.get("dpi")
    if img.mode in GRAY16_MODES:
        return Picture(np.clip(np.asarray(img), 0, 65535).astype(np.uint16), None, icc, dpi)
    if img.mode == "F":
        return Picture(np.asarray(img, dtype=np.float32), None, icc, dpi)
    alpha = img.mode in ALPHA_MODES or "transparency" in img.info
    gray = img.mode in ("1", "L", "LA", "La")
    arr = np.asarray(img.convert(("LA" if alpha else "L") if gray else ("RGBA" if alpha else "RGB")))
    if not alpha:
        return Picture(arr, None, icc, dpi)
    pixels = arr[..., 0] if gray else arr[..., :3]
    return Picture(np.ascontiguousarray(pixels), arr[..., -1].copy(), icc, dpi)


def to_pil(picture: Picture) -> Image.Image:
    """A Picture as a PIL image (L, LA, RGB, RGBA, I;16 or F), with its ICC profile and DPI in info."""
    pixels, alpha = picture.pixels, picture.alpha
    if pixels.dtype == np.uint16 and (pixels.ndim == 3 or alpha is not None):
        raise ImageWriteError("Pillow cannot hold 16-bit color or 16-bit gray with alpha; use write_image for files")
    if np.issubdtype(pixels.dtype, np.floating):
        pixels = pixels.astype(np.float32)
        if pixels.ndim == 3 or alpha is not None:
            raise ImageWriteError("Pillow cannot hold float color images; use a numpy array instead")
    img = Image.fromarray(np.dstack([pixels, alpha]) if alpha is not None else pixels)
    if picture.icc_profile and _icc_fits(picture.icc_profile, pixels.ndim == 2):
        img.info["icc_profile"] = picture.icc_profile
    if picture.dpi:
        img.info["dpi"] = picture.dpi
    return img


def _icc_fits(icc: bytes, gray: bool) -> bool:
    """Whether an ICC profile describes gray or RGB data as needed (a CMYK profile never fits)."""
    return icc[16:20] == (b"GRAY" if gray else b"RGB ")


def output_format(path: str | os.PathLike) -> str:
    """The Pillow format name for a file name's extension (PNG, JPEG, WEBP, TIFF, BMP)."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ImageWriteError(f"{path}: unknown image extension; use .png, .jpg, .webp, .tif or .bmp")
    return fmt


def write_image(path: str | os.PathLike, picture: Picture, fmt: str | None = None, quality: int = 95) -> None:
    """Write a Picture atomically in fmt (default: from the extension), fitting it to what the format holds.

    PNG and TIFF keep 16 bits; JPEG, WebP and BMP get 8 bits. JPEG and BMP cannot store alpha
    (readers ignore BMP's): an image with alpha is refused rather than flattened. quality applies
    to JPEG and WebP.
    """
    path = Path(path)
    fmt = fmt or output_format(path)
    if fmt in ("JPEG", "BMP") and picture.alpha is not None:
        raise ImageWriteError(f"{path}: {fmt} cannot store transparency; write PNG, WebP or TIFF instead (--format png)")
    data = encode_image(picture, fmt, quality)
    _atomic_write(path, lambda f: f.write(data))


def encode_image(picture: Picture, fmt: str, quality: int = 95) -> bytes:
    """A Picture as the bytes of a PNG, TIFF, JPEG, WebP or BMP file (fmt as Pillow names it).

    PNG and TIFF keep 16 bits; the others get 8. ICC profile and DPI go wherever the format has room.
    """
    pixels, alpha = picture.pixels, picture.alpha
    depth = np.uint16 if fmt in ("PNG", "TIFF") and pixels.dtype != np.uint8 else np.uint8
    pixels, alpha = _to_depth(pixels, depth), _to_depth(alpha, depth) if alpha is not None else None
    if fmt == "WEBP" and pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    if depth == np.uint16 and (pixels.ndim == 3 or alpha is not None):
        return _encode_deep(pixels, alpha, fmt, picture.icc_profile, picture.dpi)
    img = to_pil(Picture(pixels, alpha, picture.icc_profile, picture.dpi))
    params: dict = {"format": fmt}
    if "icc_profile" in img.info and fmt != "BMP":
        params["icc_profile"] = img.info["icc_profile"]
    if picture.dpi and fmt != "WEBP":
        params["dpi"] = picture.dpi
    if fmt in ("JPEG", "WEBP"):
        params["quality"] = quality
    if fmt == "TIFF":
        params["compression"] = "tiff_deflate"
    out = io.BytesIO()
    img.save(out, **params)
    return out.getvalue()


def _to_depth(a: np.ndarray, dtype: type) -> np.ndarray:
    """Pixels as uint8 or uint16, rescaled from their own range (uint8, uint16, or float 0..1)."""
    if a.dtype == dtype:
        return a
    top = 255.0 if a.dtype == np.uint8 else 65535.0 if a.dtype == np.uint16 else 1.0
    new_top = np.iinfo(dtype).max
    return np.clip(np.round(a.astype(np.float32) * (new_top / top)), 0, new_top).astype(dtype)


def _encode_deep(pixels: np.ndarray, alpha: np.ndarray | None, fmt: str, icc: bytes | None, dpi: tuple[float, float] | None) -> bytes:
    """16-bit color (or gray with alpha) as PNG (OpenCV) or TIFF (tifffile) bytes, with ICC profile and DPI."""
    rgb = pixels if pixels.ndim == 3 else np.repeat(pixels[..., None], 3, axis=2)
    icc = icc if icc and _icc_fits(icc, gray=False) else None
    if fmt == "TIFF":
        import tifffile

        out = io.BytesIO()
        data = rgb if alpha is None else np.dstack([rgb, alpha])
        tifffile.imwrite(out, np.ascontiguousarray(data), photometric="rgb", compression="zlib",
                         extrasamples=None if alpha is None else ["unassalpha"], iccprofile=icc,
                         resolution=dpi, resolutionunit="INCH" if dpi else None)
        return out.getvalue()
    import cv2

    bgr = rgb[..., ::-1] if alpha is None else np.dstack([rgb[..., ::-1], alpha])
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(bgr))
    if not ok:
        raise ImageWriteError(f"OpenCV could not encode a 16-bit {fmt} image")
    return _png_with_metadata(buf.tobytes(), icc, dpi)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_with_metadata(png: bytes, icc: bytes | None, dpi: tuple[float, float] | None) -> bytes:
    """Insert iCCP (ICC profile) and pHYs (DPI) chunks after IHDR; OpenCV writes neither."""
    extra = _png_chunk(b"iCCP", b"icc\0\0" + zlib.compress(icc)) if icc and _icc_fits(icc, gray=False) else b""
    if dpi:
        extra += _png_chunk(b"pHYs", struct.pack(">IIB", round(dpi[0] / 0.0254), round(dpi[1] / 0.0254), 1))
    end_of_ihdr = 8 + 25  # signature, then IHDR: length, type, 13 bytes of data, CRC
    return png[:end_of_ihdr] + extra + png[end_of_ihdr:]


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through a temporary file in the target folder, then rename: never a half-written output."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        f = open(tmp, "xb")
    except OSError as exc:
        raise ImageWriteError(f"{path.parent}: cannot create or write to this folder ({exc.strerror or exc}); choose another output folder") from exc
    try:
        with f:
            write(f)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ImageWriteError(f"{path}: could not be written ({exc.strerror or exc}); check the free disk space") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 HxW or HxWx3 array as PNG atomically (temporary file, then rename)."""
    _atomic_write(Path(path), lambda f: Image.fromarray(array).save(f, format="PNG"))
