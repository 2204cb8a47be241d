"""Tests for a2n.resize: bit-exact MATLAB bicubic on the benchmark LR files, shapes, numerics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from a2n.resize import imresize, modcrop

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BENCHMARK = SHARED / "data" / "benchmark"
DATASET_SIZES = {"Set5": 5, "Set14": 14, "B100": 100}  # 119 images x 3 scales = 357 LR files


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("dataset", list(DATASET_SIZES))
def test_reproduces_matlab_lr_files(dataset: str, scale: int) -> None:
    """imresize(modcrop(HR, s), 1/s) equals MATLAB's LR file bit for bit, for every image."""
    if not SHARED.is_dir():
        pytest.skip(f"shared data folder {SHARED} is absent")
    hr_paths = sorted((BENCHMARK / dataset / "HR").glob("*.png"))
    assert len(hr_paths) == DATASET_SIZES[dataset]
    mismatches = []
    for hr_path in hr_paths:
        lr_path = BENCHMARK / dataset / "LR_bicubic" / f"X{scale}" / f"{hr_path.stem}x{scale}.png"
        hr = np.asarray(Image.open(hr_path))
        lr = np.asarray(Image.open(lr_path))
        out = imresize(modcrop(hr, scale), 1 / scale)
        if out.dtype != np.uint8 or out.shape != lr.shape or not np.array_equal(out, lr):
            mismatches.append(hr_path.stem)
    assert mismatches == []


@pytest.mark.parametrize(
    ("shape", "scale", "expected"),
    [
        ((8, 12), 0.5, (4, 6)),
        ((7, 9), 0.5, (4, 5)),
        ((7, 9, 3), 0.5, (4, 5, 3)),
        ((10, 11, 3), 1 / 3, (4, 4, 3)),
        ((33, 17), 1 / 8, (5, 3)),
        ((10, 15), 1 / 2.5, (4, 6)),
        ((5, 7, 3), 2, (10, 14, 3)),
        ((10, 10), 1.7, (17, 17)),
        ((3, 4), 3, (9, 12)),
    ],
)
def test_output_shape_is_ceil_of_in_times_scale(shape, scale, expected) -> None:
    """Output size is ceil(in * scale) for integer and arbitrary factors, odd sizes included."""
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    out = imresize(img, scale)
    assert out.shape == expected
    assert out.dtype == np.uint8


def test_output_shape_argument() -> None:
    """An explicit (H, W) output shape is honoured, channels kept."""
    img = np.random.default_rng(1).random((20, 30, 3))
    assert imresize(img, output_shape=(7, 45)).shape == (7, 45, 3)


def test_modcrop_shapes() -> None:
    """modcrop keeps the top-left part whose H and W are multiples of the scale."""
    img = np.arange(7 * 9 * 3).reshape(7, 9, 3)
    assert modcrop(img, 2).shape == (6, 8, 3)
    assert modcrop(img, 3).shape == (6, 9, 3)
    assert modcrop(img[..., 0], 4).shape == (4, 8)
    np.testing.assert_array_equal(modcrop(img, 2), img[:6, :8])


def test_float_dtypes_are_kept_and_unclipped() -> None:
    """float32 and float64 come back in their own dtype and may leave 0..255 (no clipping)."""
    img = np.zeros((16, 16))
    img[:, 8:] = 255.0  # a step edge: bicubic overshoots on both sides
    out64 = imresize(img, 2)
    out32 = imresize(img.astype(np.float32), 2)
    assert out64.dtype == np.float64 and out32.dtype == np.float32
    assert out64.min() < 0 and out64.max() > 255
    np.testing.assert_allclose(out32, out64, rtol=0, atol=1e-3)


def test_uint8_matches_rounded_float_for_a_single_pass() -> None:
    """With one axis kept (scale 1 is the identity), uint8 is the rounded, clipped float result."""
    img = np.random.default_rng(2).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    out_u8 = imresize(img, output_shape=(12, 10))
    out_f = imresize(img.astype(np.float64), output_shape=(12, 10))
    np.testing.assert_array_equal(out_u8, np.clip(np.floor(out_f + 0.5), 0, 255).astype(np.uint8))


def test_uint8_and_float_two_passes_agree_within_one() -> None:
    """Two passes in uint8 round the intermediate (as MATLAB), so they stay within 1 of float."""
    # Values in 50..200 keep overshoots inside 0..255, so only rounding separates the two.
    img = np.random.default_rng(3).integers(50, 201, (24, 18, 3), dtype=np.uint8)
    for scale in (1 / 2, 1 / 3, 1 / 2.5, 1.7):
        out_u8 = imresize(img, scale).astype(np.int64)
        out_f = np.floor(imresize(img.astype(np.float64), scale) + 0.5).astype(np.int64)
        assert np.abs(out_u8 - out_f).max() <= 1


def test_smaller_scale_dimension_is_resized_first() -> None:
    """MATLAB order: the dimension with the smaller scale goes first (uint8 rounding shows it)."""
    img = np.random.default_rng(4).integers(0, 256, (24, 24), dtype=np.uint8)
    both = imresize(img, output_shape=(12, 6))  # columns scale 1/4 < rows scale 1/2
    cols_first = imresize(imresize(img, output_shape=(24, 6)), output_shape=(12, 6))
    rows_first = imresize(imresize(img, output_shape=(12, 24)), output_shape=(12, 6))
    np.testing.assert_array_equal(both, cols_first)
    assert not np.array_equal(both, rows_first)


@pytest.mark.parametrize("scale", [1 / 2, 1 / 3, 1 / 4, 1 / 2.5, 2, 1.7])
def test_constant_image_stays_constant(scale: float) -> None:
    """Weights are normalised, so a constant image stays constant (exactly for uint8)."""
    np.testing.assert_allclose(imresize(np.full((15, 13), 77.25), scale), 77.25, rtol=0, atol=1e-12)
    assert np.all(imresize(np.full((15, 13, 3), 200, dtype=np.uint8), scale) == 200)


@pytest.mark.parametrize("scale", [1 / 2, 1 / 3, 1 / 4, 2, 1.7])
def test_linear_ramp_stays_linear_in_the_interior(scale: float) -> None:
    """A ramp along rows maps to the output pixel centres (in input coordinates) away from edges."""
    n = 48
    img = np.repeat(np.arange(n, dtype=np.float64)[:, None], 5, axis=1)  # constant along columns
    out = imresize(img, scale)[:, 0]
    centres = (np.arange(len(out)) + 0.5) / scale - 0.5  # 0-based input coordinate of each centre
    reach = 2 / scale if scale < 1 else 2  # kernel half-width in input pixels
    interior = (centres - reach >= 0) & (centres + reach <= n - 1)
    assert interior.sum() >= 4
    np.testing.assert_allclose(out[interior], centres[interior], rtol=0, atol=1e-9)


def test_impulse_gives_hand_computed_kernel_weights() -> None:
    """An interior impulse gives the Keys cubic (a = -0.5) weights, antialiased when shrinking."""
    row = np.zeros((1, 16))
    row[0, 8] = 1.0
    down = imresize(row, output_shape=(1, 8))[0]
    # Output j has centre 2j + 0.5; weight 0.5 * cubic(0.5 * d) at distance d = 2j + 0.5 - 8.
    expected_down = np.zeros(8)
    expected_down[2:6] = [-0.01171875, 0.11328125, 0.43359375, -0.03515625]
    np.testing.assert_allclose(down, expected_down, rtol=0, atol=1e-15)

    short = np.zeros((1, 10))
    short[0, 4] = 1.0
    up = imresize(short, output_shape=(1, 20))[0]
    # Output j has centre j / 2 - 0.25; weight cubic(d) at d = j / 2 - 0.25 - 4.
    expected_up = np.zeros(20)
    expected_up[5:13] = [-0.0234375, -0.0703125, 0.2265625, 0.8671875,
                         0.8671875, 0.2265625, -0.0703125, -0.0234375]
    np.testing.assert_allclose(up, expected_up, rtol=0, atol=1e-15)


def test_edges_are_replicated_like_matlab() -> None:
    """Out-of-range taps reuse the edge pixel (MATLAB clamps indices), not a mirrored one."""
    img = np.zeros((1, 8))
    img[0, 1] = 1.0
    out = imresize(img, output_shape=(1, 4))[0]
    # Output 0 has centre 0.5; pixel 1 sits at d = -0.5, weight 0.5 * cubic(0.25) = 0.43359375.
    # Taps left of pixel 0 all read pixel 0 (zero). Symmetric padding would also read pixel 1 at
    # the tap d = 2.5 (weight -0.03515625) and give 0.3984375.
    assert out[0] == pytest.approx(0.43359375, abs=1e-15)


@pytest.mark.parametrize(
    ("img", "kwargs", "error"),
    [
        (np.zeros((4, 4, 3, 1), np.uint8), {"scale": 0.5}, ValueError),
        (np.zeros(4, np.uint8), {"scale": 0.5}, ValueError),
        (np.zeros((4, 4), np.int16), {"scale": 0.5}, TypeError),
        (np.zeros((4, 4), bool), {"scale": 0.5}, TypeError),
        (np.zeros((4, 4), np.uint8), {}, ValueError),
        (np.zeros((4, 4), np.uint8), {"scale": 0.5, "output_shape": (2, 2)}, ValueError),
        (np.zeros((4, 4), np.uint8), {"scale": 0}, ValueError),
        (np.zeros((4, 4), np.uint8), {"scale": -2}, ValueError),
        (np.zeros((4, 4), np.uint8), {"scale": float("nan")}, ValueError),
        (np.zeros((4, 4), np.uint8), {"output_shape": (0, 2)}, ValueError),
        (np.zeros((4, 4), np.uint8), {"output_shape": (2, 2, 2)}, ValueError),
        (np.zeros((0, 4), np.uint8), {"scale": 0.5}, ValueError),
    ],
)
def test_bad_inputs_raise(img, kwargs, error) -> None:
    """Wrong layout, dtype, or scale arguments are rejected."""
    with pytest.raises(error):
        imresize(img, **kwargs)


@pytest.mark.parametrize("scale", [0, -1, 1.5])
def test_modcrop_rejects_bad_scale(scale) -> None:
    """modcrop needs a positive integer scale."""
    with pytest.raises(ValueError):
        modcrop(np.zeros((8, 8)), scale)
