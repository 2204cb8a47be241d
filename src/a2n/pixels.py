"""Pixel layouts: gray, alpha, 16-bit and float images to the model's RGB planes and back.

Only numpy and Pillow, no torch, so that the start-up path of `a2n upscale` that runs an
exported model (a2n.backends.express) can use the same conversions as the torch path, and the
two give the same bits.
"""

from __future__ import annotations

from a2n import A2NError

from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    from a2n.io import Picture


class ImageInputError(A2NError):
    """An image object (array, tensor, PIL image) whose shape or type cannot be upscaled."""


def to_planes(rgb: np.ndarray) -> np.ndarray:
    """HxWx3 uint8, uint16 or float (0..1) array -> 1x3xHxW float32 array in 0..1."""
    x = np.ascontiguousarray(rgb.transpose(2, 0, 1)).astype(np.float32, copy=False)
    if rgb.dtype == np.uint8:
        x = x / np.float32(255.0)
    elif rgb.dtype == np.uint16:
        x = x / np.float32(65535.0)
    return x[None]


def from_planes(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """1x3xHxW float32 array in 0..1 -> HxWx3 array of dtype: uint8 and uint16 rounded, floats clipped to 0..1."""
    out = np.empty((*x.shape[2:], 3), dtype)
    write_planes(x, out)
    return out


def write_planes(x: np.ndarray, target: np.ndarray) -> None:
    """from_planes into an existing HxWx3 array (a view of a bigger one is fine), converting to its dtype."""
    hwc = x[0].transpose(1, 2, 0)
    if target.dtype in (np.uint8, np.uint16):
        top = np.float32(np.iinfo(target.dtype).max)
        scaled = np.multiply(hwc, top, dtype=np.float32)
        np.rint(scaled, out=scaled)  # half to even, as np.round
        target[...] = np.clip(scaled, 0, top, out=scaled)
    else:
        target[...] = np.clip(hwc, 0, 1)


def upscale_channel(channel: np.ndarray, scale: int) -> np.ndarray:
    """Bicubic upscale of one HxW channel (an alpha mask), same dtype, clipped to its range."""
    from PIL import Image

    big = np.asarray(Image.fromarray(channel.astype(np.float32)).resize(
        (channel.shape[1] * scale, channel.shape[0] * scale), Image.Resampling.BICUBIC))
    if np.issubdtype(channel.dtype, np.integer):
        top = np.iinfo(channel.dtype).max
        return np.clip(np.round(big), 0, top).astype(channel.dtype)
    return np.clip(big, 0, 1).astype(channel.dtype)


def upscale_pixels(pixels: np.ndarray, scale: int, upscale_rgb: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Super-resolve HxW (gray), HxWx1, HxWx2 (gray+alpha), HxWx3 (RGB) or HxWx4 (RGBA) pixels with upscale_rgb.

    Gray runs as RGB and comes back as the mean of the three outputs; alpha is upscaled
    separately with bicubic and re-attached. Keeps the dtype (uint8, uint16, or float in 0..1).
    """
    if pixels.dtype not in (np.uint8, np.uint16) and not np.issubdtype(pixels.dtype, np.floating):
        raise ImageInputError(f"pixels must be uint8, uint16 or float (0..1), got {pixels.dtype}")
    work = pixels if pixels.dtype in (np.uint8, np.uint16) else pixels.astype(np.float32)
    planes = work[..., None] if work.ndim == 2 else work
    if planes.ndim != 3 or planes.shape[2] not in (1, 2, 3, 4):
        raise ImageInputError(f"expected HxW or HxWxC pixels with C in 1..4, got shape {pixels.shape}")
    color = planes[..., :3] if planes.shape[2] >= 3 else np.repeat(planes[..., :1], 3, axis=2)
    big = upscale_rgb(color)
    if planes.shape[2] < 3:
        big = _mean_channel(big)
    if planes.shape[2] in (2, 4):
        big = np.dstack([big, upscale_channel(planes[..., -1], scale)])
    if pixels.ndim == 2:
        big = big[..., 0]
    return big.astype(pixels.dtype, copy=False)


def upscale_picture(picture: Picture, scale: int, upscale_rgb: Callable[[np.ndarray], np.ndarray]) -> Picture:
    """Super-resolve a decoded picture: pixels, alpha, and its DPI (scaled so the print size stays)."""
    from a2n import io

    big = upscale_pixels(picture.pixels, scale, upscale_rgb)
    alpha = upscale_channel(picture.alpha, scale) if picture.alpha is not None else None
    dpi = tuple(d * scale for d in picture.dpi) if picture.dpi else None
    return io.Picture(big, alpha, picture.icc_profile, dpi)  # type: ignore[arg-type]


def _mean_channel(rgb: np.ndarray) -> np.ndarray:
    """HxWx3 -> HxWx1: the mean of the channels, rounded for integer types."""
    mean = rgb.mean(axis=2, dtype=np.float32, keepdims=True)
    return np.round(mean).astype(rgb.dtype) if np.issubdtype(rgb.dtype, np.integer) else mean.astype(rgb.dtype)
