"""Attention analysis: forced branch weights, high-pass filter, LAM and the `analyze` commands, checked by numbers."""

from __future__ import annotations

import csv
import json
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from torch import nn

from a2n import A2NError, io, metrics
from a2n.analysis import (
    AnalysisError,
    ablation_configs,
    attribution_radius,
    diffusion_index,
    forced_attention,
    gini,
    highpass,
    highpass_correlation,
    lam,
    load_pairs,
    parse_window,
    trace_blocks,
)
from a2n.cli import main
from a2n.inference import to_tensor, upscale_uint8
from a2n.model import A2N
from a2n.resize import imresize
from a2n.weights import build_model, save_weights

from conftest import BENCHMARK, OFFICIAL, need


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every test here runs on one torch thread (see conftest.one_thread)."""


def random_model(variant: str = "a2n", nb: int = 3, scale: int = 2, seed: int = 0) -> A2N:
    torch.manual_seed(seed)
    return A2N(scale, variant, nb=nb).eval()


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A uint8 RGB image with structure at several scales, so that gradients and masks vary."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = 0.5 + 0.3 * np.sin(9 * x + 4 * y)[..., None] * np.array([1.0, 0.7, 0.4])
    return np.clip((base + 0.1 * rng.standard_normal((height, width, 3))) * 255, 0, 255).astype(np.uint8)


def non_attention_forward(model: A2N, x: torch.Tensor) -> torch.Tensor:
    """A2N whose blocks mix the non-attention branch alone: conv_last(lrelu(non_attention(entry(x)))) + x."""
    fea = model.head(x)
    t = fea
    for b in model.blocks:
        t = b.conv_last(b.lrelu(b.non_attention(b.entry(t)))) + t
    out = model.reconstruct(fea + model.trunk_conv(t)) / model.pixel_range
    return out + F.interpolate(x, scale_factor=model.scale, mode="bilinear", align_corners=False)


# ---------------------------------------------------------------- forcing pi_attn


@pytest.mark.parametrize("variant", ["a2n", "a2n-m", "additive"])
def test_force_zero_equals_non_attention_branch_alone(variant: str) -> None:
    model = random_model(variant)
    x = torch.rand(1, 3, 12, 10)
    with torch.no_grad(), forced_attention(model, range(3), 0.0):
        forced = model(x)
    with torch.no_grad():
        reference = non_attention_forward(model, x)
        unforced = model(x)
    assert torch.allclose(forced, reference, atol=1e-6, rtol=0)
    assert (forced - unforced).abs().max() > 1e-3


def test_force_own_value_changes_nothing() -> None:
    model = random_model(nb=4)
    lr = smooth_image(14, 12)
    sr, traces = trace_blocks(model, lr)
    x = to_tensor(lr)
    with torch.no_grad():
        before = model(x)
        with ExitStack() as stack:
            for i, t in enumerate(traces):
                stack.enter_context(forced_attention(model, [i], t.pi_attn))
            after = model(x)
    assert torch.allclose(before, after, atol=1e-6, rtol=0)
    assert np.array_equal(sr, upscale_uint8(model, lr))


def test_forced_attention_restores_even_after_an_error() -> None:
    model = random_model()
    model.blocks[1].branch_weights.force_attn = 0.3
    with pytest.raises(RuntimeError):
        with forced_attention(model, [0, 1], 1.0):
            assert [b.branch_weights.force_attn for b in model.blocks] == [1.0, 1.0, None]
            raise RuntimeError("inside")
    assert [b.branch_weights.force_attn for b in model.blocks] == [None, 0.3, None]


def test_trace_shapes_and_pi() -> None:
    model = random_model(nb=2)
    sr, traces = trace_blocks(model, smooth_image(10, 8))
    assert sr.shape == (20, 16, 3)
    assert [t.mask.shape for t in traces] == [(40, 10, 8)] * 2
    assert [t.input.shape for t in traces] == [(40, 10, 8)] * 2
    assert all(0 < t.mask.min() and t.mask.max() < 1 and 0 < t.pi_attn < 1 for t in traces)


def test_ablation_configs_cover_blocks_thirds_and_all() -> None:
    configs = ablation_configs(16)
    assert len(configs) == (16 + 4) * 2
    groups = {label: blocks for label, blocks, _ in configs}
    assert [len(groups[k]) for k in ("first third", "middle third", "last third", "all")] == [6, 5, 5, 16]
    assert groups["block 3"] == [2]
    assert {v for _, _, v in configs} == {0.0, 1.0}


# ---------------------------------------------------------------- high-pass correlation


@pytest.mark.parametrize("shape", [(9, 7), (4, 9, 7)])
def test_highpass_of_a_constant_image_is_zero(shape: tuple[int, ...]) -> None:
    assert np.abs(highpass(np.full(shape, 7.5))).max() < 1e-12


def test_highpass_removes_a_ramp_and_keeps_a_checkerboard() -> None:
    ramp = np.add.outer(np.arange(20.0), 2 * np.arange(20.0))
    assert np.abs(highpass(ramp)[5:-5, 5:-5]).max() < 1e-9
    checker = np.indices((20, 20)).sum(axis=0) % 2.0
    assert np.abs(highpass(checker)[5:-5, 5:-5]).min() > 0.4


def test_highpass_correlation_of_the_energy_itself_is_one() -> None:
    features = np.random.default_rng(0).standard_normal((3, 16, 16))
    energy = np.abs(highpass(features)).mean(axis=0)
    assert highpass_correlation(features, np.stack([energy, energy])) == pytest.approx(1.0)
    assert highpass_correlation(features, np.stack([-energy])) == pytest.approx(-1.0)
    assert np.isnan(highpass_correlation(features, np.ones((2, 16, 16))))


# ---------------------------------------------------------------- LAM


def test_gini_and_diffusion_index_known_values() -> None:
    assert gini(np.ones(10)) == pytest.approx(0.0)
    assert gini(np.array([0.0, 0, 1, 1])) == pytest.approx(0.5)
    spike = np.zeros(100)
    spike[17] = -3.0
    assert diffusion_index(spike) == pytest.approx(0.01)
    assert diffusion_index(np.zeros(5)) == 1.0


def test_attribution_radius() -> None:
    heat = np.zeros((11, 11))
    heat[5, 5], heat[5, 9] = 1.0, 1.0
    assert attribution_radius(heat, (5.0, 5.0), 0.5) == 0.0
    assert attribution_radius(heat, (5.0, 5.0), 0.9) == pytest.approx(4.0)


@pytest.mark.parametrize("variant,force", [("a2n", None), ("a2n-m", None), ("additive", None), ("a2n", 0.0)])
def test_lam_shape_sign_and_diffusion_range(variant: str, force: float | None) -> None:
    model = random_model(variant, nb=2)
    image = smooth_image(16, 16)
    with forced_attention(model, range(2), force) if force is not None else ExitStack():
        result = lam(model, image, (10, 12, 8), steps=6, batch=3)
    assert result["attribution"].shape == image.shape
    assert result["map"].shape == image.shape[:2]
    assert (np.abs(result["attribution"]) >= 0).all() and result["map"].sum() > 0
    assert 0.0 <= result["diffusion_index"] <= 1.0
    assert result["output"].shape == (32, 32, 3) and result["scale"] == 2
    assert [b.branch_weights.force_attn for b in model.blocks] == [None, None]


def conv_stack(depth: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Conv2d(3, 3, 3, padding=1), nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers[:-1]).eval()


def test_lam_diffusion_grows_with_receptive_field() -> None:
    image = smooth_image(32, 32, seed=1)
    window = (12, 12, 8)
    single = lam(conv_stack(1), image, window, steps=10)
    deep = lam(conv_stack(6), image, window, steps=10)
    outside = np.ones((32, 32), bool)
    outside[11:21, 11:21] = False  # a 3x3 conv reads one pixel around the 8x8 window
    assert single["map"][outside].max() == 0
    assert deep["map"][outside].sum() > 0.1 * deep["map"].sum()
    assert deep["diffusion_index"] > 1.5 * single["diffusion_index"]
    assert deep["radius_90"] > single["radius_90"]


def window_gradient_sum(image: np.ndarray, model: nn.Module, window: tuple[int, int, int]) -> float:
    """LAM's detector computed directly: sum of |horizontal| + |vertical| differences of the output window."""
    x, y, size = window
    with torch.no_grad():
        out = model(torch.from_numpy(image.transpose(2, 0, 1)).float()[None])[0].numpy()
    patch = out[:, y : y + size, x : x + size].astype(np.float64)
    return float(np.abs(np.diff(patch, axis=2)).sum() + np.abs(np.diff(patch, axis=1)).sum())


def test_lam_is_complete_for_a_linear_conv() -> None:
    """Path integrals sum to the detector's change from the blurred baseline to the image."""
    model = conv_stack(1)
    image = smooth_image(20, 20, seed=2)
    window = (4, 6, 10)
    result = lam(model, image, window, sigma=3.0, steps=200, batch=50)
    baseline = gaussian_filter(image / 255.0, (3.0, 3.0, 0), mode="reflect")
    change = window_gradient_sum(image / 255.0, model, window) - window_gradient_sum(baseline, model, window)
    assert result["attribution"].sum() == pytest.approx(change, rel=0.03)


@pytest.mark.parametrize("window", [(30, 0, 4), (-1, 0, 4), (0, 0, 1), (0, 29, 4)])
def test_lam_rejects_a_window_outside_the_output(window: tuple[int, int, int]) -> None:
    with pytest.raises(AnalysisError, match="does not fit the 32x32 output"):
        lam(random_model(nb=1), smooth_image(16, 16), window, steps=2)


def test_parse_window() -> None:
    assert parse_window("3,4,16") == (3, 4, 16)
    with pytest.raises(AnalysisError, match="X,Y,SIZE"):
        parse_window("3,4")


# ---------------------------------------------------------------- commands


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, A2N]:
    """A benchmark folder of three 24x24 HR images with x2 LR partners, and random full-size weights."""
    root = tmp_path_factory.mktemp("analysis")
    for i in range(3):
        hr = smooth_image(24, 24, seed=10 + i)
        io.write_png(root / "bench" / "HR" / f"img{i}.png", hr)
        io.write_png(root / "bench" / "LR_bicubic" / "X2" / f"img{i}x2.png", imresize(hr, 0.5))
    torch.manual_seed(3)
    save_weights(A2N(2), root / "w.safetensors")
    return root / "bench", root / "w.safetensors", build_model(2, "a2n", root / "w.safetensors")


def run(*argv: str) -> int:
    return main(["analyze", *map(str, argv)])


def read(out: Path, stem: str) -> tuple[list[dict], dict]:
    with (out / f"{stem}.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert (out / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
    return rows, json.loads((out / f"{stem}.json").read_text())


def test_cli_ablate_numbers(tiny_setup: tuple, tmp_path: Path) -> None:
    data, weights, model = tiny_setup
    assert run("ablate", "--data", data, "--limit", 2, "--weights", weights, "--scale", 2, "--out", tmp_path) == 0
    rows, summary = read(tmp_path, "ablation_bench")
    assert len(rows) == len(summary["rows"]) == 41 and summary["images"] == ["img0", "img1"]
    pairs = load_pairs(data, 2, limit=2)
    psnr = np.mean([metrics.psnr(upscale_uint8(model, lr), hr, shave=2) for _, hr, lr in pairs])
    assert summary["psnr"] == pytest.approx(psnr, abs=1e-9)
    with forced_attention(model, range(16), 0.0):
        off = np.mean([metrics.psnr(upscale_uint8(model, lr), hr, shave=2) for _, hr, lr in pairs])
    row = next(r for r in summary["rows"] if r["config"] == "all" and r["pi_attn"] == 0.0)
    assert row["d_psnr"] == pytest.approx(off - psnr, abs=1e-9)
    assert all(b.branch_weights.force_attn is None for b in model.blocks)


def test_cli_branch_weights_numbers(tiny_setup: tuple, tmp_path: Path) -> None:
    data, weights, model = tiny_setup
    assert run("branch-weights", "--data", data, "--weights", weights, "--scale", 2, "--out", tmp_path) == 0
    rows, summary = read(tmp_path, "branch_weights_bench")
    table = np.array(summary["pi_attn"])
    assert table.shape == (3, 16) and len(rows) == 16
    expected = [t.pi_attn for t in trace_blocks(model, load_pairs(data, 2)[1][2])[1]]
    assert table[1] == pytest.approx(expected, abs=1e-7)
    assert float(rows[4]["mean"]) == pytest.approx(table[:, 4].mean(), abs=1e-9)


def test_cli_highpass_numbers(tiny_setup: tuple, tmp_path: Path) -> None:
    data, weights, model = tiny_setup
    assert run("highpass", "--data", data, "--weights", weights, "--scale", 2, "--out", tmp_path, "--sigma", 1.5) == 0
    rows, summary = read(tmp_path, "highpass_bench")
    assert len(rows) == 16 and "sigma=1.5" in summary["filter"]
    lr = load_pairs(data, 2)[0][2]
    traces = trace_blocks(model, lr)[1]
    assert summary["per_image"][0][7] == pytest.approx(highpass_correlation(traces[7].input, traces[7].mask, 1.5))
    gray = lr.astype(np.float64).mean(axis=2)[None]
    assert summary["per_image_lr"][0][2] == pytest.approx(highpass_correlation(gray, traces[2].mask, 1.5))
    assert float(rows[7]["corr_mean"]) == pytest.approx(np.mean(np.array(summary["per_image"])[:, 7]))
    assert all(-1 <= r["corr_mean"] <= 1 for r in summary["rows"])


def test_cli_heatmap_and_lam(tiny_setup: tuple, tmp_path: Path) -> None:
    data, weights, model = tiny_setup
    image = data / "LR_bicubic" / "X2" / "img0x2.png"
    assert run("heatmap", image, "--channel", 5, "--weights", weights, "--scale", 2, "--out", tmp_path) == 0
    rows, summary = read(tmp_path, "heatmap_img0x2")
    shown = [float(r["shown_mean"]) for r in rows]
    assert summary["most_enhanced_block"] == int(np.argmax(shown)) + 1 and summary["channel"] == 5
    assert summary["most_suppressed_block"] == int(np.argmin(shown)) + 1
    masks = trace_blocks(model, io.read_rgb8(image))[1]
    assert shown[9] == pytest.approx(masks[9].mask[5].mean(), abs=1e-6)
    assert float(rows[9]["mask_mean"]) == pytest.approx(masks[9].mask.mean(), abs=1e-6)
    assert run("lam", image, "--window", "4,6,8", "--steps", 4, "--force-attn", 0,
               "--weights", weights, "--scale", 2, "--out", tmp_path) == 0
    rows, summary = read(tmp_path, "lam_img0x2")
    assert 0 <= summary["diffusion_index"] <= 1 and summary["force_attn"] == 0.0 and rows[0]["window"] == "4,6,8"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["heatmap", "missing.png"], "missing.png: no such file"),
        (["heatmap", "IMG", "--channel", "40"], "--channel 40 is out of range"),
        (["highpass", "--data", "nowhere"], "nowhere: no such folder"),
        (["ablate", "--data", "DATA", "--limit", "0"], "--limit must be at least 1"),
        (["lam", "IMG", "--window", "10,10,20"], "does not fit the 24x24 output"),
        (["lam", "IMG", "--window", "0,0,4", "--force-attn", "2"], "--force-attn must lie in 0..1"),
    ],
)
def test_cli_errors_are_one_line(tiny_setup: tuple, tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str], message: str) -> None:
    data, weights, _ = tiny_setup
    image = str(data / "LR_bicubic" / "X2" / "img0x2.png")
    argv = [image if a == "IMG" else str(data) if a == "DATA" else a for a in argv]
    assert run(*argv, "--weights", weights, "--scale", 2, "--out", tmp_path) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert issubclass(AnalysisError, A2NError)


# ---------------------------------------------------------------- official weights


@pytest.fixture(scope="module")
def official_x2() -> A2N:
    return build_model(2, "a2n", need(OFFICIAL / "aan_x2.pt"))


def test_official_forcing_matches_non_attention_and_own_values(official_x2: A2N) -> None:
    lr = io.read_rgb8(need(BENCHMARK / "Set5" / "LR_bicubic" / "X2" / "butterflyx2.png"))[40:72, 40:72]
    x = to_tensor(lr)
    _, traces = trace_blocks(official_x2, lr)
    with torch.no_grad():
        before = official_x2(x)
        with ExitStack() as stack:
            for i, t in enumerate(traces):
                stack.enter_context(forced_attention(official_x2, [i], t.pi_attn))
            own = official_x2(x)
        with forced_attention(official_x2, range(16), 0.0):
            off = official_x2(x)
        reference = non_attention_forward(official_x2, x)
    assert torch.allclose(before, own, atol=1e-5, rtol=0)
    assert torch.allclose(off, reference, atol=1e-5, rtol=0)
    assert (off - before).abs().mean() > 0.01


def test_official_lam_spreads_wider_than_a_single_conv(official_x2: A2N) -> None:
    lr = io.read_rgb8(need(BENCHMARK / "Set14" / "LR_bicubic" / "X2" / "barbarax2.png"))[160:192, 40:72]
    a2n = lam(official_x2, lr, (24, 24, 16), steps=10)
    conv = lam(conv_stack(1), lr, (12, 12, 8), steps=10)
    assert a2n["attribution"].shape == lr.shape
    assert 0 < conv["diffusion_index"] < a2n["diffusion_index"] <= 1
    assert all(b.branch_weights.force_attn is None for b in official_x2.blocks)


def test_write_numbers_csv_and_standard_json(tmp_path: Path) -> None:
    from a2n.analysis import write_numbers

    rows = [{"block": 1, "r": 0.25}, {"block": 2, "r": float("nan")}]
    paths = write_numbers(tmp_path / "out", "t", rows, {"note": "x", "values": [1.0, float("inf")]})
    assert [p.name for p in paths] == ["t.csv", "t.json"]
    assert (tmp_path / "out" / "t.csv").read_text().splitlines() == ["block,r", "1,0.25", "2,nan"]
    assert json.loads((tmp_path / "out" / "t.json").read_text()) == {"rows": [{"block": 1, "r": 0.25}, {"block": 2, "r": None}], "note": "x", "values": [1.0, None]}


def test_adm_state_calls_half_and_half_inert() -> None:
    from a2n.analysis import adm_state, describe_adm

    flat = adm_state(0.5 + np.linspace(-0.009, 0.009, 48).reshape(3, 16))
    assert flat["inert"] and "INERT" in describe_adm(flat) and "carry no meaning" in describe_adm(flat)
    spread = adm_state(0.5 + np.linspace(-0.2, 0.1, 48).reshape(3, 16))
    assert not spread["inert"] and spread["pi_attn_min"] == pytest.approx(0.3) and "live" in describe_adm(spread)


def test_branch_weights_cli_says_when_adms_are_inert(tiny_setup: tuple, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Random weights on 0..1 have ADM logits near 0 (inert); the same at 0..255 spread pi_attn (live)."""
    data, weights, _ = tiny_setup
    assert run("branch-weights", "--data", data, "--weights", weights, "--scale", 2, "--out", tmp_path) == 0
    assert "attention dropout: INERT" in capsys.readouterr().out
    assert json.loads((tmp_path / "branch_weights_bench.json").read_text())["inert"] is True
    torch.manual_seed(3)
    save_weights(A2N(2, pixel_range=255.0), tmp_path / "w255.safetensors")
    assert run("branch-weights", "--data", data, "--weights", tmp_path / "w255.safetensors", "--scale", 2, "--out", tmp_path) == 0
    assert "attention dropout: live" in capsys.readouterr().out


def test_info_describes_a_weights_file(tiny_setup: tuple, capsys: pytest.CaptureFixture) -> None:
    _, weights, _ = tiny_setup
    assert main(["info", "--scale", "2", "--weights", str(weights)]) == 0
    out = capsys.readouterr().out
    assert "pixel range: 0..1" in out and "attention dropout: INERT" in out and "village.png" in out
    official = OFFICIAL / "aan_x2.pt"
    if official.is_file():
        assert main(["info", "--scale", "2", "--weights", str(official)]) == 0
        out = capsys.readouterr().out
        assert "pixel range: 0..255" in out and "attention dropout: live" in out


def test_analyze_without_matplotlib_fails_before_any_work(tiny_setup: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    import sys

    from a2n import analysis

    data, weights, _ = tiny_setup
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError

    def no_work(*args, **kwargs):
        raise AssertionError("the analysis ran before the missing matplotlib was reported")

    for name in ("ablation", "branch_weights", "highpass_study", "heatmap", "lam"):
        monkeypatch.setattr(analysis, name, no_work)
    image = data / "LR_bicubic" / "X2" / "img0x2.png"
    for argv in (["ablate", "--data", data], ["branch-weights", "--data", data], ["highpass", "--data", data],
                 ["heatmap", image], ["lam", image, "--window", "0,0,4"]):
        assert run(*argv, "--weights", weights, "--scale", 2, "--out", tmp_path) == 1
        assert "figures need matplotlib; install it with: pip install 'a2n[analysis]'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_crop_around_a_window() -> None:
    from a2n.analysis import crop_around

    image = np.arange(40 * 30 * 3, dtype=np.uint8).reshape(30, 40, 3)
    crop, window, origin = crop_around(image, (21, 10, 6), scale=2, margin=3)
    assert origin == (7, 2) and crop.shape == (9, 10, 3) and window == (7, 6, 6)
    assert np.array_equal(crop, image[2:11, 7:17])
    whole, same, origin = crop_around(image, (21, 10, 6), scale=2, margin=100)
    assert whole.shape == image.shape and same == (21, 10, 6) and origin == (0, 0)
    with pytest.raises(AnalysisError, match="--crop must be at least 1"):
        crop_around(image, (0, 0, 4), 2, 0)


def test_cli_lam_on_a_crop(tiny_setup: tuple, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--crop runs LAM on the part near the window, says so, and with a margin covering the image equals the full run."""
    data, weights, model = tiny_setup
    image = data / "LR_bicubic" / "X2" / "img1x2.png"
    common = ["--window", "10,8,6", "--steps", 4, "--weights", weights, "--scale", 2]
    assert run("lam", image, *common, "--out", tmp_path / "full") == 0
    assert run("lam", image, *common, "--crop", 50, "--out", tmp_path / "wide") == 0
    assert run("lam", image, *common, "--crop", 3, "--out", tmp_path / "crop") == 0
    out = capsys.readouterr().out
    assert "the ADMs pool over the crop" in out
    _, full = read(tmp_path / "full", "lam_img1x2")
    _, wide = read(tmp_path / "wide", "lam_img1x2")
    _, crop = read(tmp_path / "crop", "lam_img1x2")
    assert wide["diffusion_index"] == pytest.approx(full["diffusion_index"], abs=1e-9) and wide["crop"] == "0,0,12,12"
    assert crop["crop"] == "2,1,9,9" and "pi_attn differs" in crop["crop_note"]
    reference = lam(model, io.read_rgb8(image)[1:10, 2:11], (6, 6, 6), steps=4)
    assert crop["diffusion_index"] == pytest.approx(reference["diffusion_index"], abs=1e-9)
