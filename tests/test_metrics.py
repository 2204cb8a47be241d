"""Tests for a2n.metrics: Y conversion, PSNR of known errors, SSIM against independent versions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.signal import convolve2d

from a2n.metrics import psnr, rgb_to_y, ssim

C1 = (0.01 * 255) ** 2
C2 = (0.03 * 255) ** 2


def gaussian_window_2d() -> np.ndarray:
    """MATLAB fspecial('gaussian', 11, 1.5), built directly in 2-D."""
    y, x = np.mgrid[-5:6, -5:6].astype(np.float64)
    w = np.exp(-(x * x + y * y) / (2 * 1.5**2))
    return w / w.sum()


def ssim_convolve2d(a: np.ndarray, b: np.ndarray) -> float:
    """Reference SSIM of two 2-D planes: 2-D 'valid' convolution with scipy.signal.convolve2d."""
    w = gaussian_window_2d()  # symmetric, so convolution equals correlation

    def filt(x: np.ndarray) -> np.ndarray:
        return convolve2d(x, w, mode="valid")

    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a * mu_a
    var_b = filt(b * b) - mu_b * mu_b
    cov = filt(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + C1) * (2 * cov + C2)) / (
        (mu_a * mu_a + mu_b * mu_b + C1) * (var_a + var_b + C2)
    )
    return float(ssim_map.mean())


def ssim_window_loop(a: np.ndarray, b: np.ndarray) -> float:
    """Reference SSIM by an explicit loop over 11x11 windows with centred (two-pass) moments."""
    w = gaussian_window_2d()
    values = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            pa, pb = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
            mu_a, mu_b = (w * pa).sum(), (w * pb).sum()
            var_a = (w * (pa - mu_a) ** 2).sum()
            var_b = (w * (pb - mu_b) ** 2).sum()
            cov = (w * (pa - mu_a) * (pb - mu_b)).sum()
            num = (2 * mu_a * mu_b + C1) * (2 * cov + C2)
            den = (mu_a**2 + mu_b**2 + C1) * (var_a + var_b + C2)
            values.append(num / den)
    return float(np.mean(values))


def y_reference(img: np.ndarray) -> np.ndarray:
    """Float Y computed channel by channel from the MATLAB rgb2ycbcr coefficients."""
    img = img.astype(np.float64)
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    return 16 + 65.481 / 255 * r + 128.553 / 255 * g + 24.966 / 255 * b


def image_pair(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth-ish uint8 image and a noisy copy of it, so SSIM lands well inside (0, 1)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, shape).astype(np.float64)
    base = (base + np.roll(base, 1, axis=0) + np.roll(base, 1, axis=1)) / 3
    noisy = base + rng.normal(0, 12, shape)
    return base.round().astype(np.uint8), np.clip(noisy.round(), 0, 255).astype(np.uint8)


def test_y_of_pure_colours() -> None:
    """MATLAB rgb2ycbcr Y: red 16 + 65.481 (not 64.738), green 16 + 128.553, white 235, black 16."""
    colours = [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0]]
    pixels = np.array([colours], np.uint8)
    np.testing.assert_allclose(
        rgb_to_y(pixels)[0], [81.481, 144.553, 40.966, 235.0, 16.0], rtol=0, atol=1e-12
    )


def test_y_of_grayscale_is_y_of_equal_rgb() -> None:
    """A HxW image counts as R = G = B."""
    gray = np.random.default_rng(0).integers(0, 256, (6, 7), dtype=np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    np.testing.assert_allclose(rgb_to_y(gray), rgb_to_y(rgb), rtol=0, atol=1e-12)


def test_y_rejects_wrong_channel_count() -> None:
    """Only HxW or HxWx3 images have a Y channel."""
    with pytest.raises(ValueError):
        rgb_to_y(np.zeros((4, 4, 4)))


def test_psnr_of_constant_difference_of_one() -> None:
    """RGB off by 1 everywhere: RGB PSNR = 20 log10(255); Y error is 219/255, not rounded."""
    a = np.random.default_rng(1).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    b = a + 1
    assert psnr(a, b, shave=0, y_channel=False) == pytest.approx(48.1308036087, abs=1e-9)
    assert psnr(a, b, shave=0) == pytest.approx(20 * math.log10(255 * 255 / 219), abs=1e-9)
    assert psnr(a, b, shave=0) == pytest.approx(49.4527249206, abs=1e-9)


def test_psnr_matches_direct_formula() -> None:
    """PSNR equals 10 log10(255^2 / MSE) on the shaved float Y, and on all channels for RGB."""
    a, b = image_pair((40, 50, 3), seed=2)
    s = 3
    ya, yb = y_reference(a)[s:-s, s:-s], y_reference(b)[s:-s, s:-s]
    expected_y = 10 * math.log10(255**2 / np.mean((ya - yb) ** 2))
    ca, cb = a[s:-s, s:-s].astype(np.float64), b[s:-s, s:-s].astype(np.float64)
    mse_rgb = np.mean([np.mean((ca[..., c] - cb[..., c]) ** 2) for c in range(3)])
    expected_rgb = 10 * math.log10(255**2 / mse_rgb)
    assert psnr(a, b, shave=s) == pytest.approx(expected_y, abs=1e-9)
    assert psnr(a, b, shave=s, y_channel=False) == pytest.approx(expected_rgb, abs=1e-9)


def test_identical_images() -> None:
    """Identical images: PSNR is inf and SSIM is 1, with Y or RGB."""
    a, _ = image_pair((30, 30, 3), seed=3)
    for y_channel in (True, False):
        assert psnr(a, a.copy(), shave=2, y_channel=y_channel) == math.inf
        assert ssim(a, a.copy(), shave=2, y_channel=y_channel) == pytest.approx(1.0, abs=1e-12)


def test_shave_removes_the_border() -> None:
    """Differences only inside the shaved border do not count; shave equals cropping by hand."""
    a, b = image_pair((40, 44, 3), seed=4)
    c = a.copy()
    c[:3] = 0
    c[:, -3:] = 255
    assert psnr(a, c, shave=3) == math.inf
    assert ssim(a, c, shave=3) == pytest.approx(1.0, abs=1e-12)
    assert psnr(a, c, shave=2) < math.inf
    cropped_a, cropped_b = a[4:-4, 4:-4], b[4:-4, 4:-4]
    assert psnr(a, b, shave=4) == pytest.approx(psnr(cropped_a, cropped_b, shave=0), abs=1e-12)
    assert ssim(a, b, shave=4) == pytest.approx(ssim(cropped_a, cropped_b, shave=0), abs=1e-12)


@pytest.mark.parametrize("shave", [0, 2, 4])
def test_ssim_y_matches_convolve2d_reference(shave: int) -> None:
    """SSIM on Y equals an independent 2-D convolve2d implementation."""
    a, b = image_pair((48, 56, 3), seed=5)
    crop = (slice(shave, 48 - shave), slice(shave, 56 - shave))
    expected = ssim_convolve2d(y_reference(a)[crop], y_reference(b)[crop])
    assert 0.3 < expected < 0.99
    assert ssim(a, b, shave=shave) == pytest.approx(expected, abs=1e-6)


def test_ssim_matches_window_loop_reference() -> None:
    """SSIM on a small image equals an explicit loop over windows with two-pass moments."""
    a, b = image_pair((20, 23, 3), seed=6)
    expected = ssim_window_loop(y_reference(a)[1:-1, 1:-1], y_reference(b)[1:-1, 1:-1])
    assert ssim(a, b, shave=1) == pytest.approx(expected, abs=1e-6)


def test_ssim_rgb_is_mean_over_channels() -> None:
    """y_channel=False averages the per-channel SSIM; a grayscale pair works the same way."""
    a, b = image_pair((32, 36, 3), seed=7)
    fa, fb = a[2:-2, 2:-2].astype(np.float64), b[2:-2, 2:-2].astype(np.float64)
    per_channel = [ssim_convolve2d(fa[..., c], fb[..., c]) for c in range(3)]
    assert ssim(a, b, shave=2, y_channel=False) == pytest.approx(np.mean(per_channel), abs=1e-6)
    gray = ssim(a[..., 1], b[..., 1], shave=2, y_channel=False)
    assert gray == pytest.approx(per_channel[1], abs=1e-6)


def test_grayscale_y_uses_equal_rgb() -> None:
    """With y_channel=True a HxW pair is measured on Y of R = G = B."""
    a, b = image_pair((30, 30), seed=8)
    a3, b3 = np.repeat(a[..., None], 3, axis=2), np.repeat(b[..., None], 3, axis=2)
    assert psnr(a, b, shave=2) == pytest.approx(psnr(a3, b3, shave=2), abs=1e-12)
    assert ssim(a, b, shave=2) == pytest.approx(ssim(a3, b3, shave=2), abs=1e-12)


def test_shape_mismatch_names_both_shapes() -> None:
    """Different shapes raise ValueError quoting both."""
    a, b = np.zeros((20, 20, 3), np.uint8), np.zeros((20, 22, 3), np.uint8)
    for metric in (psnr, ssim):
        with pytest.raises(ValueError, match=r"\(20, 20, 3\).*\(20, 22, 3\)"):
            metric(a, b, shave=2)


@pytest.mark.parametrize("shave", [-1, 10, 1.5])
def test_bad_shave_raises(shave) -> None:
    """A negative, fractional, or too large shave is rejected."""
    a = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(ValueError):
        psnr(a, a, shave=shave)


def test_ssim_needs_a_full_window() -> None:
    """SSIM needs at least 11x11 pixels left after shaving."""
    a = np.zeros((14, 30, 3), np.uint8)
    with pytest.raises(ValueError):
        ssim(a, a, shave=2)
