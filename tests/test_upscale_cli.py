"""Tests for `a2n upscale`: output paths and no-replace rules, folders with bad files, formats, Set5 end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

import a2n
from a2n import io, metrics
from a2n.cli import main
from a2n.inference import load_model
from a2n.pixels import upscale_channel
from a2n.resize import imresize
from conftest import BENCHMARK, OFFICIAL, need

H, W = 20, 24
Y, X = np.mgrid[0:H, 0:W]
RGB8 = np.dstack([X * 10, Y * 12, (X * Y) % 256]).astype(np.uint8)


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every test here runs on one torch thread (see conftest.one_thread)."""


@pytest.fixture(autouse=True)
def pixel_limit() -> Iterator[None]:
    """Restore Pillow's decompression-bomb limit, which --max-pixels changes for the process."""
    limit = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = limit


def upscale(*args: str | Path, weights: str) -> int:
    """The CLI on torch fp32, so that outputs equal a2n.upscale's on torch fp32 bit for bit (the default, auto, may pick
    another runtime or bf16 on a CPU that has it)."""
    return main(["upscale", *map(str, args), "--scale", "2", "--weights", weights, "--backend", "torch", "--precision", "fp32"])


def test_single_file_next_to_input(tmp_path: Path, weights: str) -> None:
    Image.fromarray(RGB8).save(tmp_path / "photo.png")
    assert upscale(tmp_path / "photo.png", weights=weights) == 0
    out = np.asarray(Image.open(tmp_path / "photo_x2.png"))
    assert out.shape == (2 * H, 2 * W, 3)
    assert np.array_equal(out, a2n.upscale(RGB8, load_model(2, weights=weights), backend="torch", precision="fp32"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png", "photo_x2.png"]


def test_existing_output_is_kept_unless_asked(tmp_path: Path, weights: str, capsys: pytest.CaptureFixture) -> None:
    Image.fromarray(RGB8).save(tmp_path / "photo.png")
    (tmp_path / "photo_x2.png").write_bytes(b"old result")
    assert upscale(tmp_path / "photo.png", weights=weights) == 1
    assert "photo_x2.png already exists; pass --overwrite to replace it or --skip-existing" in capsys.readouterr().err
    assert (tmp_path / "photo_x2.png").read_bytes() == b"old result"
    assert upscale(tmp_path / "photo.png", "--skip-existing", weights=weights) == 0
    assert "skipped" in capsys.readouterr().out
    assert (tmp_path / "photo_x2.png").read_bytes() == b"old result"
    assert upscale(tmp_path / "photo.png", "--overwrite", weights=weights) == 0
    assert Image.open(tmp_path / "photo_x2.png").size == (2 * W, 2 * H)


def test_output_never_replaces_its_input(tmp_path: Path, weights: str, capsys: pytest.CaptureFixture) -> None:
    Image.fromarray(RGB8).save(tmp_path / "photo.png")
    before = (tmp_path / "photo.png").read_bytes()
    assert upscale(tmp_path / "photo.png", "--suffix", "", "--overwrite", weights=weights) == 1
    assert "the output would replace the input" in capsys.readouterr().err
    assert upscale(tmp_path / "photo.png", "--suffix", "", "--overwrite", "-o", tmp_path, weights=weights) == 1
    assert (tmp_path / "photo.png").read_bytes() == before


def test_folder_with_bad_files_goes_on(tmp_path: Path, weights: str, capsys: pytest.CaptureFixture) -> None:
    """Corrupt and empty files are listed with their reason; the good images are all written; no bar off a TTY."""
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(RGB8).save(src / "a.png")
    Image.fromarray(RGB8).save(src / "c.jpg", quality=95)
    noisy = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(tmp_path / "noisy.png")
    (src / "b_corrupt.png").write_bytes((tmp_path / "noisy.png").read_bytes()[:3000])
    (src / "d_empty.jpg").write_bytes(b"")
    (src / "notes.txt").write_text("not an image, not an input")
    assert upscale(src, "-o", tmp_path / "out", weights=weights) == 1
    captured = capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_x2.png", "c_x2.jpg"]
    assert "2 failed, 2 upscaled, 0 skipped" in captured.err
    assert "b_corrupt.png: corrupt, truncated or unsupported image" in captured.err
    assert "d_empty.jpg: the file is empty (0 bytes)" in captured.err
    assert "notes.txt" not in captured.err + captured.out
    assert "%|" not in captured.err


def test_output_file_name_and_format(tmp_path: Path, weights: str, capsys: pytest.CaptureFixture) -> None:
    Image.fromarray(RGB8).save(tmp_path / "a.png")
    Image.fromarray(RGB8).save(tmp_path / "b.png")
    assert upscale(tmp_path / "a.png", "-o", tmp_path / "result.jpg", "--quality", "90", weights=weights) == 0
    assert Image.open(tmp_path / "result.jpg").format == "JPEG"
    assert upscale(tmp_path / "a.png", tmp_path / "b.png", "-o", tmp_path / "both.png", weights=weights) == 1
    assert "both.png: names one file but 2 inputs were given; pass a folder to -o" in capsys.readouterr().err
    assert upscale(tmp_path / "a.png", "-o", tmp_path / "x.png", "--format", "webp", weights=weights) == 1
    assert "does not match --format webp" in capsys.readouterr().err
    assert upscale(tmp_path / "a.png", "--format", "tiff", weights=weights) == 0
    assert Image.open(tmp_path / "a_x2.tiff").format == "TIFF"


def test_globs_recursion_and_own_outputs(tmp_path: Path, weights: str, capsys: pytest.CaptureFixture) -> None:
    """Subfolders are mirrored under -o; a file that is another input's output is not upscaled again."""
    (tmp_path / "in" / "sub").mkdir(parents=True)
    Image.fromarray(RGB8).save(tmp_path / "in" / "a.png")
    Image.fromarray(RGB8).save(tmp_path / "in" / "sub" / "b.png")
    assert upscale(tmp_path / "in", "--recursive", "-o", tmp_path / "out", weights=weights) == 0
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png")) == ["a_x2.png", "sub/b_x2.png"]
    assert upscale(f"{tmp_path}/in/*.png", weights=weights) == 0
    assert (tmp_path / "in" / "a_x2.png").is_file() and not (tmp_path / "in" / "sub" / "b_x2.png").exists()
    capsys.readouterr()
    assert upscale(tmp_path / "in", "--skip-existing", weights=weights) == 0
    assert "a_x2.png: it is the output of" in capsys.readouterr().out
    assert not (tmp_path / "in" / "a_x2_x2.png").exists()
    assert upscale(tmp_path / "nowhere", f"{tmp_path}/in/*.gif", weights=weights) == 1
    err = capsys.readouterr().err
    assert "nowhere: no such file or folder" in err and "*.gif: no image files match this pattern" in err


def test_tile_option_gives_the_same_image(tmp_path: Path, weights: str) -> None:
    Image.fromarray(RGB8).save(tmp_path / "a.png")
    assert upscale(tmp_path / "a.png", "-o", tmp_path / "whole", weights=weights) == 0
    assert upscale(tmp_path / "a.png", "-o", tmp_path / "tiled", "--tile", "7", "--threads", "1", weights=weights) == 0
    whole = np.asarray(Image.open(tmp_path / "whole" / "a_x2.png")).astype(int)
    tiled = np.asarray(Image.open(tmp_path / "tiled" / "a_x2.png")).astype(int)
    assert np.abs(whole - tiled).max() <= 1


def test_alpha_gray_and_16bit(tmp_path: Path, weights: str, capsys: pytest.CaptureFixture) -> None:
    alpha = (X * 255 // (W - 1)).astype(np.uint8)
    Image.fromarray(np.dstack([RGB8, alpha])).save(tmp_path / "rgba.png")
    Image.fromarray(RGB8[..., 0]).save(tmp_path / "gray.png")
    Image.fromarray((X * 2000 + Y * 300).astype(np.uint16)).save(tmp_path / "deep.png")
    assert upscale(tmp_path / "rgba.png", tmp_path / "gray.png", tmp_path / "deep.png", "-o", tmp_path / "out", weights=weights) == 0
    rgba = Image.open(tmp_path / "out" / "rgba_x2.png")
    assert rgba.mode == "RGBA" and np.array_equal(np.asarray(rgba)[..., 3], upscale_channel(alpha, 2))
    assert Image.open(tmp_path / "out" / "gray_x2.png").mode == "L"
    deep = Image.open(tmp_path / "out" / "deep_x2.png")
    assert deep.mode == "I;16" and deep.size == (2 * W, 2 * H)
    assert upscale(tmp_path / "rgba.png", "--format", "jpg", weights=weights) == 1
    assert "JPEG cannot store transparency" in capsys.readouterr().err


def test_max_pixels(tmp_path: Path, weights: str, capsys: pytest.CaptureFixture) -> None:
    """--max-pixels sets the decompression-bomb limit: below the image's size it refuses, at its size it passes."""
    Image.fromarray(RGB8).save(tmp_path / "a.png")
    assert upscale(tmp_path / "a.png", "--max-pixels", "100", weights=weights) == 1
    assert "safety limit of 100; if you trust the file, raise the limit with --max-pixels" in capsys.readouterr().err
    assert upscale(tmp_path / "a.png", "--max-pixels", str(H * W), weights=weights) == 0


def test_clear_errors(tmp_path: Path, weights: str, capsys: pytest.CaptureFixture) -> None:
    Image.fromarray(RGB8).save(tmp_path / "a.png")
    (tmp_path / "a_file").write_text("x")
    assert upscale(tmp_path / "a.png", "-o", tmp_path / "a_file" / "out", weights=weights) == 1
    assert "cannot create or write to this folder" in capsys.readouterr().err
    assert upscale(tmp_path / "a.png", "--tile", "0", weights=weights) == 1
    assert "--tile must be a positive number" in capsys.readouterr().err
    assert main(["upscale", str(tmp_path / "a.png"), "--scale", "4", "--weights", weights]) == 1
    assert "pass the matching --scale" in capsys.readouterr().err


def test_set5_end_to_end_beats_bicubic(tmp_path: Path) -> None:
    """The official x2 weights on Set5 bird through the command (tiled): higher PSNR than bicubic against HR."""
    lr_path = need(BENCHMARK / "Set5" / "LR_bicubic" / "X2" / "birdx2.png")
    hr = io.read_rgb8(need(BENCHMARK / "Set5" / "HR" / "bird.png"))
    weights = need(OFFICIAL / "aan_x2.pt")
    assert main(["upscale", str(lr_path), "--scale", "2", "--weights", str(weights), "--tile", "64", "--backend", "torch", "--precision", "fp32",
                 "-o", str(tmp_path / "sr.png")]) == 0  # pinned: auto's one-time timing is not what this test is about
    sr = io.read_rgb8(tmp_path / "sr.png")
    lr = io.read_rgb8(lr_path)
    assert sr.shape == hr.shape
    psnr_sr = metrics.psnr(sr, hr, shave=2)
    psnr_bicubic = metrics.psnr(imresize(lr, 2.0), hr, shave=2)
    assert psnr_sr > psnr_bicubic + 2.0, (psnr_sr, psnr_bicubic)


def test_shards_split_the_inputs_whatever_exists(tmp_path: Path) -> None:
    """Each input belongs to exactly one rank, and the split does not move when outputs appear."""
    from a2n.batch import make_plan

    for i in range(7):
        Image.fromarray(RGB8).save(tmp_path / f"im{i}.png")
    out = tmp_path / "out"
    plans = [make_plan([str(tmp_path)], str(out), 2, skip_existing=True, shard=(r, 3)) for r in range(3)]
    owned = [{s.name for s, _ in p.jobs} for p in plans]
    assert sorted(len(o) for o in owned) == [2, 2, 3] and set.union(*owned) == {f"im{i}.png" for i in range(7)}
    out.mkdir()
    for source, target in plans[0].jobs:  # rank 0 finishes its share before rank 1 plans
        target.write_bytes(b"done")
    assert [j for j in make_plan([str(tmp_path)], str(out), 2, skip_existing=True, shard=(1, 3)).jobs] == plans[1].jobs
    assert len(make_plan([str(tmp_path)], str(out), 2, skip_existing=True, shard=(0, 3)).skipped) == len(plans[0].jobs)


def test_torchrun_shards_a_folder_once_and_resumes(tmp_path: Path, weights: str) -> None:
    """Two processes upscale each image exactly once; a rerun with --skip-existing redoes only what is missing."""
    import os
    import subprocess
    import sys

    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this Python")
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    rng = np.random.default_rng(1)
    images = {f"im{i}.png": rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8) for i in range(5)}
    for name, arr in images.items():
        Image.fromarray(arr).save(src / name)
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "a2n", "upscale", str(src), "-o", str(out),
           "--scale", "2", "--weights", weights, "--backend", "torch", "--precision", "fp32", "--skip-existing"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def done_lines() -> list[str]:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [line for line in proc.stdout.splitlines() if " -> " in line]

    lines = done_lines()
    assert sorted(Path(line.split(" -> ")[0]).name for line in lines) == sorted(images)
    model = load_model(2, weights=weights)
    for name, arr in images.items():
        assert np.array_equal(np.asarray(Image.open(out / name.replace(".png", "_x2.png"))), a2n.upscale(arr, model, backend="torch", precision="fp32"))
    kept = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    for name in ("im1_x2.png", "im4_x2.png"):  # as if the first run had been killed before these
        (out / name).unlink()
    lines = done_lines()
    assert sorted(Path(line.split(" -> ")[1]).name for line in lines) == ["im1_x2.png", "im4_x2.png"]
    assert all((out / n).stat().st_mtime_ns == t for n, t in kept.items() if n not in ("im1_x2.png", "im4_x2.png"))
