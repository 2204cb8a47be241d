"""PSNR and SSIM as super-resolution papers report them (MATLAB / BasicSR conventions).

Images are HxWx3 RGB (or HxW grayscale) arrays on 0..255, normally uint8 (round model outputs to
uint8 first). A border of ``shave`` pixels (usually the scale factor) is removed before measuring.
With ``y_channel=True`` (the default, the published protocol) both metrics use the float Y channel
of MATLAB's ``rgb2ycbcr``, not rounded to integers.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import correlate1d

_SSIM_SIZE = 11
_SSIM_SIGMA = 1.5
_SSIM_C1 = (0.01 * 255) ** 2
_SSIM_C2 = (0.03 * 255) ** 2


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """Y of MATLAB ``rgb2ycbcr`` (16..235) as float64, from HxWx3 RGB or HxW gray on 0..255.

    Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255; a grayscale image counts as R = G = B.
    """
    img = np.asarray(img, dtype=np.float64)
    if img.ndim == 2:
        return 16.0 + (65.481 + 128.553 + 24.966) * img / 255.0
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB or HxW grayscale image, got shape {img.shape}")
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    return 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0


def _prepare(
    img1: np.ndarray, img2: np.ndarray, shave: int, y_channel: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Check shapes, shave the border and return float64 HxWxC planes (C = 1 for Y or gray)."""
    a, b = np.asarray(img1), np.asarray(img2)
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    if a.ndim not in (2, 3):
        raise ValueError(f"expected HxW or HxWxC images, got shape {a.shape}")
    if int(shave) != shave or shave < 0:
        raise ValueError(f"shave must be a non-negative integer, got {shave!r}")
    shave = int(shave)
    h, w = a.shape[:2]
    if h <= 2 * shave or w <= 2 * shave:
        raise ValueError(f"shave={shave} leaves nothing of images of shape {a.shape}")
    if y_channel:
        a, b = rgb_to_y(a), rgb_to_y(b)
    a = np.asarray(a, dtype=np.float64)[shave : h - shave, shave : w - shave]
    b = np.asarray(b, dtype=np.float64)[shave : h - shave, shave : w - shave]
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    return a, b


def psnr(img1: np.ndarray, img2: np.ndarray, shave: int, y_channel: bool = True) -> float:
    """PSNR in dB (peak 255) of two HxWx3 / HxW images on 0..255, ``shave`` border pixels removed.

    ``y_channel=True`` measures the float Y channel; ``False`` uses the MSE over all channels.
    Identical images give ``inf``.
    """
    a, b = _prepare(img1, img2, shave, y_channel)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0:
        return math.inf
    return 10.0 * math.log10(255.0**2 / mse)


def _gaussian_1d() -> np.ndarray:
    """Normalised 1-D Gaussian whose outer product is MATLAB's fspecial('gaussian', 11, 1.5)."""
    x = np.arange(_SSIM_SIZE, dtype=np.float64) - (_SSIM_SIZE - 1) / 2
    g = np.exp(-(x**2) / (2 * _SSIM_SIGMA**2))
    return g / g.sum()


def _filter_valid(plane: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' Gaussian filtering of a 2-D plane (only windows fully inside)."""
    r = _SSIM_SIZE // 2
    out = correlate1d(plane, g, axis=0, mode="constant")[r:-r]
    return correlate1d(out, g, axis=1, mode="constant")[:, r:-r]


def _ssim_plane(a: np.ndarray, b: np.ndarray, g: np.ndarray) -> float:
    """Mean of the SSIM map of two 2-D planes on 0..255 (MATLAB ssim_index)."""
    mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
    var_a = _filter_valid(a * a, g) - mu_a**2
    var_b = _filter_valid(b * b, g) - mu_b**2
    cov = _filter_valid(a * b, g) - mu_a * mu_b
    num = (2 * mu_a * mu_b + _SSIM_C1) * (2 * cov + _SSIM_C2)
    den = (mu_a**2 + mu_b**2 + _SSIM_C1) * (var_a + var_b + _SSIM_C2)
    return float(np.mean(num / den))


def ssim(img1: np.ndarray, img2: np.ndarray, shave: int, y_channel: bool = True) -> float:
    """SSIM (at most 1) of two HxWx3 / HxW images on 0..255, ``shave`` border pixels removed.

    MATLAB ssim_index: 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, L = 255, 'valid'
    filtering, mean of the SSIM map. ``y_channel=True`` measures the float Y channel; ``False``
    averages the SSIM of each channel.
    """
    a, b = _prepare(img1, img2, shave, y_channel)
    if a.shape[0] < _SSIM_SIZE or a.shape[1] < _SSIM_SIZE:
        raise ValueError(
            f"SSIM needs at least {_SSIM_SIZE}x{_SSIM_SIZE} pixels after shaving, got {a.shape[:2]}"
        )
    g = _gaussian_1d()
    return float(np.mean([_ssim_plane(a[..., c], b[..., c], g) for c in range(a.shape[2])]))
