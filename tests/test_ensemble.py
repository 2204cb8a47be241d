"""A2N+ (self-ensemble): the mean over the 8 flips and rotations, in the API, tiled, on Set5, in `a2n upscale` and `a2n evaluate`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from a2n import cli, io, metrics
from a2n.cli import main
from a2n.inference import forward, load_model, self_ensemble, to_tensor, upscale, upscale_array
from a2n.model import A2N
from a2n.resize import modcrop
from conftest import BENCHMARK, need
from test_inference import image, random_model

H, W = 20, 24  # not square: the rotated images are 24 x 20


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every test here runs on one torch thread (see conftest.one_thread)."""


def by_hand(model: A2N, img: np.ndarray) -> np.ndarray:
    """The mean of the 8 forwards on flipped and rotated tensors, each clipped and turned back, as HxWx3 float32."""
    x = to_tensor(img)
    outs = []
    for flip in (False, True):
        t = x.flip(-1) if flip else x
        for k in range(4):
            y = torch.rot90(forward(model, torch.rot90(t, k, dims=(2, 3))).clamp(0, 1), -k, dims=(2, 3))
            outs.append(y.flip(-1) if flip else y)
    return torch.stack(outs).mean(0)[0].permute(1, 2, 0).numpy()


def test_transforms_are_undone_exactly() -> None:
    """Nearest-neighbour upscaling commutes with flips and rotations: its ensemble is itself, bit for bit, on a non-square image."""
    rgb = np.round(image() * 255).astype(np.uint8)
    shapes = []

    def nearest(t: np.ndarray) -> np.ndarray:
        shapes.append(t.shape)
        return t.repeat(3, axis=0).repeat(3, axis=1)

    out = self_ensemble(nearest, rgb)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, nearest(rgb))
    assert shapes[:8] == [(H, W, 3), (W, H, 3)] * 4


def test_ensemble_is_the_mean_of_the_8_outputs() -> None:
    """Float output equals the hand-made mean within 1e-5; uint8 is that mean rounded once (within one step)."""
    model = random_model(2, pixel_range=255.0)
    img = image()
    expected = by_hand(model, img)
    out = upscale_array(model, img, backend="torch", precision="fp32", ensemble=True)
    assert out.shape == (2 * H, 2 * W, 3) and out.dtype == np.float32
    assert np.abs(out - expected).max() <= 1e-5
    plain = upscale_array(model, img, backend="torch", precision="fp32")
    assert np.abs(out - plain).max() > 1e-3  # the 8 outputs do differ
    rgb8 = np.round(img * 255).astype(np.uint8)
    out8 = upscale_array(model, rgb8, backend="torch", precision="fp32", ensemble=True)
    rounded = np.round(by_hand(model, rgb8.astype(np.float32) / 255) * 255)
    assert out8.dtype == np.uint8 and np.abs(out8.astype(np.int64) - rounded).max() <= 1


def test_ensemble_tiled_equals_whole() -> None:
    """Every one of the 8 images takes upscale_array's exact tiled path: tiled equals whole within 1e-4."""
    model = random_model(2, pixel_range=255.0)
    img = image()
    whole = upscale_array(model, img, backend="torch", precision="fp32", ensemble=True)
    tiled = upscale_array(model, img, tile=9, backend="torch", precision="fp32", ensemble=True)  # 3 x 3 tiles, 20 x 24 and 24 x 20
    assert np.abs(tiled - whole).max() <= 1e-4


def test_api_passes_ensemble_through() -> None:
    """a2n.upscale on gray+alpha pixels and on tensors runs the ensemble on the colour and keeps the layout."""
    model = random_model(2, pixel_range=255.0)
    img = image()
    gray_alpha = np.dstack([img[..., 0], img[..., 1]])
    out = upscale(gray_alpha, model, backend="torch", precision="fp32", ensemble=True)
    assert out.shape == (2 * H, 2 * W, 2)
    gray_rgb = np.repeat(img[..., :1], 3, axis=2)
    assert np.abs(out[..., 0] - by_hand(model, gray_rgb).mean(axis=2)).max() <= 1e-5
    t = torch.from_numpy(img).permute(2, 0, 1)
    big = upscale(t, model, backend="torch", precision="fp32", ensemble=True)
    assert np.abs(big.permute(1, 2, 0).numpy() - by_hand(model, img)).max() <= 1e-5


def test_ensemble_raises_psnr_on_set5() -> None:
    """With the shipped x2 weights, A2N+ scores a higher PSNR (Y) than one forward on a Set5 image (woman, not square)."""
    hr = modcrop(io.read_rgb8(need(BENCHMARK / "Set5" / "HR" / "woman.png")), 2)
    lr = io.read_rgb8(need(BENCHMARK / "Set5" / "LR_bicubic" / "X2" / "womanx2.png"))
    model = load_model(2)
    plain = metrics.psnr(upscale_array(model, lr, backend="torch", precision="fp32"), hr, shave=2)
    plus = metrics.psnr(upscale_array(model, lr, backend="torch", precision="fp32", ensemble=True), hr, shave=2)
    assert plus > plain + 0.02, (plain, plus)


def test_upscale_cli_ensemble(tmp_path: Path, weights: str, capsys: pytest.CaptureFixture) -> None:
    """`a2n upscale --ensemble` writes what the API's ensemble gives; its help says what it costs."""
    rgb8 = np.round(image() * 255).astype(np.uint8)
    io.write_png(tmp_path / "in.png", rgb8)
    args = ["upscale", str(tmp_path / "in.png"), "--scale", "2", "--weights", weights, "--backend", "torch", "--precision", "fp32"]
    assert main(args + ["-o", str(tmp_path / "plus.png"), "--ensemble"]) == 0
    expected = upscale_array(load_model(2, weights=weights), rgb8, backend="torch", precision="fp32", ensemble=True)
    np.testing.assert_array_equal(io.read_rgb8(tmp_path / "plus.png"), expected)

    with pytest.raises(SystemExit):
        main(["upscale", "--help"])
    assert "8x the time" in " ".join(capsys.readouterr().out.split())


def test_ensemble_skips_the_express_path(monkeypatch: pytest.MonkeyPatch, weights: str) -> None:
    """With --ensemble `a2n upscale` goes to the torch model's upscaler, never to the express path."""
    from a2n.backends import express

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the express path was asked")

    monkeypatch.setattr(express, "express_upscaler", refuse)
    monkeypatch.setattr(express, "remember_express", refuse)
    args = cli.build_parser().parse_args(["upscale", "x.png", "--scale", "2", "--weights", weights, "--backend", "onnxruntime", "--ensemble"])
    upscaler = cli._upscaler(args)
    assert upscaler.keywords["ensemble"] is True


def test_evaluate_ensemble(tmp_path: Path, weights: str, capsys: pytest.CaptureFixture) -> None:
    """`a2n evaluate --ensemble` scores A2N+ in a row labelled a2n+ (torch fp32, as without it)."""
    data = tmp_path / "Tiny"
    hrs = {"a": np.round(image(24, 20, 1) * 255).astype(np.uint8), "b": np.round(image(16, 22, 2) * 255).astype(np.uint8)}
    for name, hr in hrs.items():
        io.write_png(data / "HR" / f"{name}.png", hr)
    out = tmp_path / "r.json"
    assert main(["evaluate", "--data", str(data), "--scale", "2", "--weights", weights, "--ensemble", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    bicubic, plus = json.loads(out.read_text())["results"]
    assert (bicubic["method"], plus["method"]) == ("bicubic", "a2n+")
    assert "a2n+" in table and f"{plus['psnr']:.3f}" in table
    from a2n.evaluation import benchmark_pairs

    model = load_model(2, weights=weights)
    scores = [metrics.psnr(upscale_array(model, lr, backend="torch", precision="fp32", ensemble=True), hr, shave=2)
              for _, hr, lr in benchmark_pairs(data, 2)]
    assert abs(plus["psnr"] - float(np.mean(scores))) <= 1e-9
