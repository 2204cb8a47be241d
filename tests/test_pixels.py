"""Tests for a2n.pixels and a2n.memory, the torch-free pieces that the start-up path without torch relies on."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from a2n import memory, pixels


@pytest.mark.parametrize("dtype, top", [(np.uint8, 255), (np.uint16, 65535)])
def test_planes_round_trip_integer_images_exactly(dtype: type, top: int) -> None:
    rgb = np.random.default_rng(0).integers(0, top + 1, (7, 5, 3)).astype(dtype)
    x = pixels.to_planes(rgb)
    assert x.shape == (1, 3, 7, 5) and x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1
    assert np.array_equal(pixels.from_planes(x, dtype), rgb)


def test_from_planes_rounds_half_to_even_and_clips() -> None:
    x = np.array([-0.5, 0.5 / 255, 1.5 / 255, 2.5 / 255, 1.2], dtype=np.float32).reshape(1, 1, 1, 5).repeat(3, axis=1)
    assert pixels.from_planes(x, np.uint8)[0, :, 0].tolist() == [0, 0, 2, 2, 255]
    assert pixels.from_planes(x, np.float32)[0, :, 0].tolist() == pytest.approx([0, 0.5 / 255, 1.5 / 255, 2.5 / 255, 1])


def test_gray_and_alpha_go_through_rgb_and_back() -> None:
    calls = []

    def double(rgb: np.ndarray) -> np.ndarray:  # a stand-in super-resolver: nearest-neighbour x2
        calls.append(rgb.shape)
        return rgb.repeat(2, axis=0).repeat(2, axis=1)

    gray_alpha = np.dstack([np.full((3, 4), 10, np.uint8), np.full((3, 4), 200, np.uint8)])
    out = pixels.upscale_pixels(gray_alpha, 2, double)
    assert calls == [(3, 4, 3)] and out.shape == (6, 8, 2) and out.dtype == np.uint8
    assert (out[..., 0] == 10).all() and (out[..., 1] == 200).all()
    with pytest.raises(pixels.ImageInputError, match="C in 1..4"):
        pixels.upscale_pixels(np.zeros((3, 4, 5), np.uint8), 2, double)


def test_memory_costs_scale_with_pixels_and_backend() -> None:
    assert memory.forward_bytes(10, 20, 4) == (memory.FORWARD_BYTES_PER_OUT_PIXEL * 16 + memory.FORWARD_BYTES_PER_IN_PIXEL) * 200
    assert memory.forward_bytes(20, 20, 4) == 2 * memory.forward_bytes(10, 20, 4)
    assert memory.forward_bytes(10, 20, 4, "onnxruntime") > memory.forward_bytes(10, 20, 4, "openvino") > memory.forward_bytes(10, 20, 4)
    assert memory.budget_bytes(2.0) == 2 * 2**30
    assert memory.budget_bytes(None, available=1000) == memory.MEMORY_SHARE * 1000
    assert memory.available_memory() > 0


def test_pixels_memory_and_backends_import_without_torch() -> None:
    code = "import sys, a2n.pixels, a2n.memory, a2n.backends, a2n.batch, a2n.io; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
