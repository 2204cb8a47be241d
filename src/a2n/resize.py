"""MATLAB-compatible bicubic ``imresize`` and ``modcrop``, as used to make the benchmark LR images.

``imresize(modcrop(hr, s), 1 / s)`` on a uint8 image reproduces MATLAB's
``imresize(modcrop(HR, s), 1/s, 'bicubic')`` bit for bit: same cubic kernel (a = -0.5), kernel
widened by 1/scale when shrinking (antialiasing), edge pixels replicated at the borders
(MATLAB clamps out-of-range indices; symmetric padding would not match), output size
``ceil(in * scale)``, one dimension at a time (smaller scale first) with each pass computed in
float64 and, for integer images, rounded and clipped to 0..255 after each pass as MATLAB
does.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

_KERNEL_WIDTH = 4.0


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic kernel with a = -0.5, the kernel MATLAB's 'bicubic' uses."""
    ax = np.abs(x)
    ax2 = ax * ax
    ax3 = ax2 * ax
    near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return near + far


def _contributions(in_len: int, out_len: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-pixel input indices (0-based, clamped) and normalised weights, as MATLAB."""
    width = _KERNEL_WIDTH / scale if scale < 1 else _KERNEL_WIDTH
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)  # output pixel centre in input coordinates (1-based)
    left = np.floor(u - width / 2.0)
    taps = int(math.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]
    dist = u[:, None] - idx
    weights = scale * _cubic(scale * dist) if scale < 1 else _cubic(dist)
    weights = weights / weights.sum(axis=1, keepdims=True)
    # MATLAB clamps out-of-range indices (replicates the edge pixels); symmetric padding, as in
    # some ports, changes the outermost output pixels.
    idx = np.clip(idx.astype(np.int64) - 1, 0, in_len - 1)
    keep = np.any(weights != 0, axis=0)
    return idx[:, keep], weights[:, keep]


def _resize_axis(
    img: np.ndarray, axis: int, out_len: int, scale: float, integer: bool
) -> np.ndarray:
    """Resize float64 ``img`` along ``axis``; round and clip to uint8 range when ``integer``."""
    idx, weights = _contributions(img.shape[axis], out_len, scale)
    moved = np.moveaxis(img, axis, 0)
    extra = (1,) * (moved.ndim - 1)
    out = np.zeros((out_len,) + moved.shape[1:], dtype=np.float64)
    for k in range(idx.shape[1]):  # accumulate taps in order, like MATLAB's resize kernel
        out += weights[:, k].reshape((out_len,) + extra) * moved[idx[:, k]]
    if integer:
        # Round half up, then saturate: equals MATLAB's round-half-away-from-zero plus uint8
        # saturation, because every negative value ends at 0 either way.
        out = np.clip(np.floor(out + 0.5), 0, 255)
    return np.moveaxis(out, 0, axis)


def imresize(
    img: np.ndarray,
    scale: float | None = None,
    output_shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """Resize HxW or HxWxC ``img`` like MATLAB ``imresize(img, scale, 'bicubic')`` (antialiased).

    Give either ``scale`` (output size ``ceil(in * scale)``) or ``output_shape`` (H, W). uint8 in
    gives uint8 out (rounded, clipped to 0..255 after each pass); float32/float64 in gives the same
    dtype out, unclipped.
    """
    img = np.asarray(img)
    if img.ndim not in (2, 3):
        raise ValueError(f"expected an HxW or HxWxC image, got shape {img.shape}")
    if img.dtype == np.uint8:
        integer = True
    elif img.dtype in (np.float32, np.float64):
        integer = False
    else:
        raise TypeError(f"expected uint8, float32 or float64 image, got {img.dtype}")
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"image has an empty spatial dimension: shape {img.shape}")
    if (scale is None) == (output_shape is None):
        raise ValueError("give exactly one of scale and output_shape")

    in_hw = img.shape[:2]
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (
            math.isfinite(scale) and scale > 0
        ):
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        scales = (float(scale), float(scale))
        out_hw = (math.ceil(in_hw[0] * scale), math.ceil(in_hw[1] * scale))
    else:
        if len(output_shape) != 2 or any(int(n) != n or n < 1 for n in output_shape):
            raise ValueError(f"output_shape must be two positive integers, got {output_shape!r}")
        out_hw = (int(output_shape[0]), int(output_shape[1]))
        scales = (out_hw[0] / in_hw[0], out_hw[1] / in_hw[1])

    out = img.astype(np.float64)
    # MATLAB resizes the dimension with the smaller scale first; rows first on a tie.
    order = (0, 1) if scales[0] <= scales[1] else (1, 0)
    for axis in order:
        out = _resize_axis(out, axis, out_hw[axis], scales[axis], integer)
    if integer:
        return out.astype(np.uint8)
    return out.astype(img.dtype)


def modcrop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop H and W (top-left kept) down to multiples of ``scale``, so LR = HR / scale exactly."""
    img = np.asarray(img)
    if img.ndim not in (2, 3):
        raise ValueError(f"expected an HxW or HxWxC image, got shape {img.shape}")
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    scale = int(scale)
    h, w = img.shape[0] - img.shape[0] % scale, img.shape[1] - img.shape[1] % scale
    return img[:h, :w]
