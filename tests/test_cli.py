"""Command line: `info` figures, `degrade` equal to the MATLAB files, and one-line errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from a2n.cli import main
from a2n.model import A2N
from a2n.weights import save_weights

from conftest import BENCHMARK, need


@pytest.mark.parametrize("scale,variant,params,macs", [(2, "a2n", "1,036,443", "247.5 G"), (3, "a2n", "1,036,443", "117.5 G"),
                                                       (4, "a2n", "1,047,459", "72.4 G"), (4, "a2n-m", "842,659", "60.6 G")])
def test_info(scale, variant, params, macs, capsys) -> None:
    assert main(["info", "--scale", str(scale), "--variant", variant]) == 0
    out = capsys.readouterr().out
    assert params in out and macs in out


def test_degrade_matches_matlab(tmp_path: Path, capsys) -> None:
    set5 = need(BENCHMARK / "Set5")
    assert main(["degrade", str(set5 / "HR"), str(tmp_path), "--scale", "4"]) == 0
    made = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in made] == sorted(p.name for p in (set5 / "LR_bicubic" / "X4").glob("*.png"))
    for p in made:
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(set5 / "LR_bicubic" / "X4" / p.name)))
    assert main(["degrade", str(set5 / "HR"), str(tmp_path), "--scale", "4"]) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err


def test_degrade_keeps_grayscale(tmp_path: Path) -> None:
    hr = tmp_path / "hr"
    hr.mkdir()
    Image.fromarray(np.arange(35 * 26, dtype=np.uint8).reshape(35, 26)).save(hr / "g.png")
    assert main(["degrade", str(hr), str(tmp_path / "lr"), "--scale", "3"]) == 0
    out = Image.open(tmp_path / "lr" / "gx3.png")
    assert out.mode == "L" and out.size == (8, 11)


@pytest.fixture()
def bench(tmp_path: Path) -> Path:
    """A small benchmark folder of generated images with MATLAB-style LR partners."""
    rng = np.random.default_rng(0)
    (tmp_path / "B" / "HR").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(tmp_path / "B" / "HR" / f"im{i}.png")
    assert main(["degrade", str(tmp_path / "B" / "HR"), str(tmp_path / "B" / "LR_bicubic" / "X2"), "--scale", "2"]) == 0
    torch.manual_seed(0)
    save_weights(A2N(2), tmp_path / "w.safetensors")
    return tmp_path


def run_error(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_evaluate_on_generated_folder_and_save_images(bench: Path, capsys) -> None:
    assert main(["evaluate", "--data", str(bench / "B"), "--scale", "2", "--weights", str(bench / "w.safetensors"),
                 "--save-images", str(bench / "sr")]) == 0
    assert len(list((bench / "sr").rglob("*.png"))) == 4
    shutil.rmtree(bench / "B" / "LR_bicubic")  # LR made on the fly now gives the same table
    first = capsys.readouterr().out
    assert main(["evaluate", "--data", str(bench / "B"), "--scale", "2", "--weights", str(bench / "w.safetensors")]) == 0
    second = capsys.readouterr().out
    strip = lambda t: [line.rsplit(maxsplit=1)[0] for line in t.splitlines()]  # drop the seconds column
    assert strip(first) == strip(second)


def test_evaluate_errors(bench: Path, capsys) -> None:
    w = str(bench / "w.safetensors")
    lr_dir = bench / "B" / "LR_bicubic" / "X2"
    (lr_dir / "im1x2.png").rename(bench / "moved.png")
    assert "im1x2.png: missing LR partner" in run_error(["evaluate", "--data", str(bench / "B"), "--scale", "2", "--weights", w], capsys)
    Image.fromarray(np.zeros((7, 7, 3), np.uint8)).save(lr_dir / "im1x2.png")
    assert "does not match HR" in run_error(["evaluate", "--data", str(bench / "B"), "--scale", "2", "--weights", w], capsys)
    (lr_dir / "im1x2.png").write_bytes(b"not a png at all")
    assert "im1x2.png: not an image" in run_error(["evaluate", "--data", str(bench / "B"), "--scale", "2", "--weights", w], capsys)
    assert "nowhere: no such folder" in run_error(["evaluate", "--data", str(bench / "nowhere"), "--scale", "2", "--weights", w], capsys)
    assert "missing.pt: no such weights file" in run_error(["evaluate", "--data", str(bench / "B"), "--scale", "2", "--weights", str(bench / "missing.pt")], capsys)
    assert "holds x2 weights" in run_error(["evaluate", "--data", str(bench / "B"), "--scale", "3", "--weights", w], capsys)


def test_bad_options_are_one_line(capsys) -> None:
    for argv in (["info", "--scale", "5"], ["evaluate", "--scale", "2"], ["frobnicate"], ["degrade", "a"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "error:" in err


def test_console_script_runs() -> None:
    exe = Path(sys.executable).parent / "a2n"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "a2n"]
    proc = subprocess.run(cmd + ["info", "--scale", "3"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "1,036,443" in proc.stdout
    proc = subprocess.run(cmd + ["evaluate", "--data", "/nonexistent", "--scale", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
