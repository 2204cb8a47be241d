"""Tests for a2n.inference: tiled output equals the whole-image forward, tile planning, the Python API."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import a2n
from a2n import io
from a2n.inference import (
    ImageInputError,
    forward,
    forward_tiled,
    load_model,
    plan_tile,
    to_tensor,
    upscale_array,
)
from a2n.model import A2N
from a2n.pixels import upscale_channel
from a2n import tiling
from a2n.tiling import BLOCK_HALO, MAX_TILE, MIN_TILE, MemoryBudgetError
from a2n.weights import save_weights
from conftest import BENCHMARK, OFFICIAL, need

H, W = 20, 24


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every test here runs on one torch thread (see conftest.one_thread)."""


def random_model(scale: int, variant: str = "a2n", pixel_range: float = 1.0, seed: int = 0) -> A2N:
    """A seeded model whose branch weights depend strongly on the pooled mean (at init they barely do)."""
    torch.manual_seed(seed)
    model = A2N(scale=scale, variant=variant).eval()  # type: ignore[arg-type]
    model.pixel_range = pixel_range
    with torch.no_grad():
        for block in model.AAB_trunk:
            block.ADM[0].weight.mul_(30.0)
            block.ADM[2].weight.mul_(30.0)
    return model


def image(h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    """A float32 RGB test image in 0..1: a gradient plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    return np.clip(np.dstack([x / w, y / h, (x + y) / (h + w)]) * 0.7 + rng.random((h, w, 3)) * 0.3, 0, 1).astype(np.float32)


def whole(model: A2N, img: np.ndarray) -> np.ndarray:
    return forward(model, to_tensor(img))[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize(
    "scale,variant,pixel_range",
    [(2, "a2n", 255.0), (3, "a2n", 1.0), (4, "a2n", 1.0), (2, "a2n-m", 1.0), (4, "additive", 255.0)],
)
def test_tiled_equals_whole_image_forward(scale: int, variant: str, pixel_range: float) -> None:
    """Tiles that divide the image, that do not, and one larger than the image: all within 1e-4 of the forward."""
    model = random_model(scale, variant, pixel_range)
    img = image()
    reference = whole(model, img)
    for tile in (7, 10, 12, 64):
        out = np.full((H * scale, W * scale, 3), np.nan, np.float32)
        forward_tiled(model, to_tensor(img), out, tile)
        assert not np.isnan(out).any(), f"tile {tile} left pixels unwritten"
        assert np.abs(out - np.clip(reference, 0, 1)).max() <= 1e-4, f"tile {tile}"


def test_naive_tiles_would_differ() -> None:
    """The global mean matters: a tile run as an independent image misses the 1e-4 tolerance, even far from its edge."""
    model = random_model(2)
    img = image()
    reference = whole(model, img)
    left = whole(model, img[:, : W // 2])
    assert np.abs(left[:, : W // 2] - reference[:, : W // 2]).max() > 1e-4
    assert np.abs(left[:8, :8] - reference[:8, :8]).max() > 1e-4


def test_tiled_equals_forward_with_official_weights() -> None:
    """The official x2 weights (0..255 range) on a Set5 crop: tiled within 1e-4 of the whole-image forward."""
    model = load_model(2, weights=need(OFFICIAL / "aan_x2.pt"))
    lr = io.read_rgb8(need(BENCHMARK / "Set5" / "LR_bicubic" / "X2" / "babyx2.png"))[100:140, 60:108]
    img = lr.astype(np.float32) / 255.0
    out = np.empty((80, 96, 3), np.float32)
    forward_tiled(model, to_tensor(img), out, 14)
    assert np.abs(out - np.clip(whole(model, img), 0, 1)).max() <= 1e-4


def test_block_reaches_exactly_its_halo() -> None:
    """Changing one input pixel of an AAB block changes its output exactly BLOCK_HALO pixels around, no farther."""
    for variant in ("a2n", "a2n-m", "additive"):
        block = random_model(2, variant).AAB_trunk[0]
        x = torch.randn(1, 40, 15, 15)
        pooled = block.entry(x).mean(dim=(2, 3))
        with torch.inference_mode():
            base = block.mix(x, block.entry(x), pooled)
            x2 = x.clone()
            x2[0, :, 7, 7] += 1.0
            changed = (block.mix(x2, block.entry(x2), pooled) - base).abs().sum(dim=1)[0] > 0
        rows, cols = changed.nonzero(as_tuple=True)
        assert (rows - 7).abs().max().item() == BLOCK_HALO, variant
        assert (cols - 7).abs().max().item() == BLOCK_HALO, variant


def test_windows_hold_the_receptive_field_and_have_one_size() -> None:
    """Every window of a stage has one size (a backend compiles one shape) and holds its box plus halo."""
    for length in (1, 5, 37, 100, 257):
        for tile in (4, 9, 32, 256):
            parts = tiling.cuts(length, tile)
            assert parts[0].start == 0 and parts[-1].stop == length
            assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))
            sizes = [p.stop - p.start for p in parts]
            assert max(sizes) <= tile and max(sizes) - min(sizes) <= 1
            for halo in (1, 2, 3):
                boxes = [(p, slice(0, 1)) for p in parts]
                grown = [tiling.grow(b, halo, length, 1, (max(sizes), 1)) for b in boxes]
                assert len({g[0].stop - g[0].start for g, _ in grown}) == 1
                for (ys, _), ((gy, _), (iy, _)) in zip(boxes, grown):
                    assert gy.start <= max(ys.start - halo, 0) and gy.stop >= min(ys.stop + halo, length)
                    assert (iy.start + gy.start, iy.stop + gy.start) == (ys.start, ys.stop)


def test_a_stage_sees_one_input_shape_per_image() -> None:
    """The tiled forward calls each stage with one shape on a grid whose tiles do not divide the image."""
    from a2n import backends

    model = random_model(2)
    stages = backends.TorchStages(model)
    shapes: dict[str, set] = {"head": set(), "block": set(), "tail": set()}

    class Recording:
        def __getattr__(self, name: str):
            return getattr(stages, name)

        def head(self, x, inner, into):
            shapes["head"].add(tuple(x.shape))
            return stages.head(x, inner, into)

        def block(self, k, part, pooled, inner, into):
            shapes["block"].add(tuple(part.shape))
            return stages.block(k, part, pooled, inner, into)

        def tail(self, x, fea, done):
            shapes["tail"].add(tuple(fea.shape))
            return stages.tail(x, fea, done)

    img = image()
    out = np.empty((2 * H, 2 * W, 3), np.float32)
    with torch.inference_mode():
        tiling.run_tiled(Recording(), to_tensor(img).numpy(), out, 9)  # 20 x 24 in 3 x 3 tiles of 6-7 x 8
    assert shapes == {"head": {(1, 3, 11, 12)}, "block": {(1, 40, 11, 12)}, "tail": {(1, 40, 13, 14)}}
    assert np.abs(out - np.clip(whole(model, img), 0, 1)).max() <= 1e-4


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_upscale_array_same_for_any_tile(dtype: type) -> None:
    """Integer images: tiled and whole results differ by at most one step (a rounding tie), and keep the dtype."""
    model = random_model(2)
    top = np.iinfo(dtype).max
    img = np.round(image() * top).astype(dtype)
    plain = upscale_array(model, img, backend="torch", precision="fp32")
    assert plain.dtype == dtype and plain.shape == (2 * H, 2 * W, 3)
    for tile in (9, 16):
        tiled = upscale_array(model, img, tile=tile, backend="torch", precision="fp32")
        assert np.abs(tiled.astype(np.int64) - plain.astype(np.int64)).max() <= 1
    expected = np.clip(np.round(np.clip(whole(model, img.astype(np.float32) / top), 0, 1) * top), 0, top)
    assert np.abs(plain.astype(np.int64) - expected).max() <= 1


def test_plan_tile() -> None:
    """Small images run whole; big ones get tiles within bounds; an impossible budget is a clear error."""
    model = random_model(4)
    assert plan_tile(180, 320, model, max_memory=4.0) is None
    assert plan_tile(2000, 2000, model, max_memory=2.5) == MAX_TILE
    tile = plan_tile(2000, 2000, model, max_memory=1.7)
    assert tile is not None and MIN_TILE <= tile < MAX_TILE
    smaller = plan_tile(2000, 2000, model, max_memory=1.65)
    assert smaller is not None and MIN_TILE <= smaller < tile
    with pytest.raises(MemoryBudgetError, match="raise --max-memory"):
        plan_tile(2000, 2000, model, max_memory=1.0)


def test_upscale_channel_is_bicubic() -> None:
    """Alpha is upscaled with Pillow's bicubic, clipped to its range, in its own dtype."""
    alpha = np.zeros((H, W), np.uint8)
    alpha[:, W // 2:] = 255
    big = upscale_channel(alpha, 3)
    expected = np.asarray(Image.fromarray(alpha.astype(np.float32)).resize((3 * W, 3 * H), Image.Resampling.BICUBIC))
    assert big.dtype == np.uint8 and big.shape == (3 * H, 3 * W)
    assert np.array_equal(big, np.clip(np.round(expected), 0, 255).astype(np.uint8))
    assert big[:, :20].max() == 0 and big[:, -20:].min() == 255


def test_api_keeps_the_kind_of_image() -> None:
    """a2n.upscale returns what it is given: array shapes and dtypes, tensor layouts and dtypes, PIL modes."""
    model = random_model(2)
    rgb = image()
    rgb8 = np.round(rgb * 255).astype(np.uint8)
    color = upscale_array(model, rgb8, backend="torch", precision="fp32")
    cases = [
        (rgb8, (2 * H, 2 * W, 3), np.uint8),
        (rgb.astype(np.float64), (2 * H, 2 * W, 3), np.float64),
        (rgb8[..., 0], (2 * H, 2 * W), np.uint8),
        (rgb8[..., :1], (2 * H, 2 * W, 1), np.uint8),
        ((rgb[..., :2] * 65535).astype(np.uint16), (2 * H, 2 * W, 2), np.uint16),
        (np.dstack([rgb8, rgb8[..., 0]]), (2 * H, 2 * W, 4), np.uint8),
    ]
    for arr, shape, dtype in cases:
        out = a2n.upscale(arr, model, backend="torch", precision="fp32")
        assert isinstance(out, np.ndarray) and out.shape == shape and out.dtype == dtype
    rgba = a2n.upscale(np.dstack([rgb8, rgb8[..., 0]]), model, backend="torch", precision="fp32")
    assert np.array_equal(rgba[..., :3], color)
    assert np.array_equal(rgba[..., 3], upscale_channel(rgb8[..., 0], 2))
    gray = a2n.upscale(rgb8[..., 0], model, backend="torch", precision="fp32")
    gray_as_rgb = upscale_array(model, np.repeat(rgb8[..., :1], 3, axis=2), backend="torch", precision="fp32")
    assert np.array_equal(gray, np.round(gray_as_rgb.mean(axis=2, dtype=np.float32)).astype(np.uint8))

    t = torch.from_numpy(rgb).permute(2, 0, 1)
    out = a2n.upscale(t, model, backend="torch", precision="fp32")
    assert out.shape == (3, 2 * H, 2 * W) and out.dtype == torch.float32
    assert np.abs(out.permute(1, 2, 0).numpy() - np.clip(whole(model, rgb), 0, 1)).max() <= 1e-5
    batch = a2n.upscale(torch.stack([t, t]).mul(255).round().to(torch.uint8), model, backend="torch", precision="fp32")
    assert batch.shape == (2, 3, 2 * H, 2 * W) and batch.dtype == torch.uint8
    assert np.array_equal(batch[1].permute(1, 2, 0).numpy(), color)

    for mode, out_mode in (("RGB", "RGB"), ("RGBA", "RGBA"), ("L", "L"), ("LA", "LA"), ("P", "RGB"), ("CMYK", "RGB"), ("I;16", "I;16")):
        pil = Image.fromarray(rgb8).convert(mode) if mode != "I;16" else Image.fromarray((rgb[..., 0] * 65535).astype(np.uint16))
        out = a2n.upscale(pil, model, backend="torch", precision="fp32")
        assert isinstance(out, Image.Image) and out.mode == out_mode and out.size == (2 * W, 2 * H), mode
    assert np.array_equal(np.asarray(a2n.upscale(Image.fromarray(rgb8), model, backend="torch", precision="fp32")), color)


def test_api_errors() -> None:
    model = random_model(2)
    with pytest.raises(ImageInputError, match="model is x2"):
        a2n.upscale(image(), model, scale=4)
    with pytest.raises(ImageInputError, match="cannot upscale a list"):
        a2n.upscale([[0.0]], model, backend="torch", precision="fp32")
    with pytest.raises(ImageInputError, match="C in 1..4"):
        a2n.upscale(np.zeros((H, W, 5), np.uint8), model, backend="torch", precision="fp32")
    with pytest.raises(ImageInputError, match="uint8, uint16 or float"):
        a2n.upscale(np.zeros((H, W, 3), np.int32), model, backend="torch", precision="fp32")
    with pytest.raises(ImageInputError, match="positive"):
        a2n.upscale(image(), model, tile=0)
    assert isinstance(ImageInputError("x"), a2n.A2NError)


def test_load_model_reads_weights(tmp_path: Path) -> None:
    """load_model gives an eval-mode model with exactly the saved weights."""
    model = random_model(3, seed=5)
    save_weights(model, tmp_path / "w.safetensors")
    loaded = load_model(3, weights=tmp_path / "w.safetensors")
    assert not loaded.training and loaded.scale == 3
    img = image()
    assert np.array_equal(whole(loaded, img), whole(model, img))
    out = a2n.upscale(np.round(img * 255).astype(np.uint8), loaded, backend="torch", precision="fp32")
    assert out.shape == (3 * H, 3 * W, 3)
