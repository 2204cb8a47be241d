"""Benchmark evaluation: PSNR/SSIM on Y against HR images, with a MATLAB-bicubic baseline."""

from __future__ import annotations

from a2n import A2NError

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from a2n import io, metrics
from a2n.inference import upscale_array
from a2n.model import A2N
from a2n.resize import imresize, modcrop


ENSEMBLE_METHOD = "a2n+"


class EvaluationError(A2NError):
    """A benchmark folder that is incomplete or inconsistent."""


@dataclass
class ImageScore:
    name: str
    psnr: float
    ssim: float


@dataclass
class DatasetResult:
    dataset: str
    scale: int
    method: str
    psnr: float = 0.0
    ssim: float = 0.0
    seconds: float = 0.0
    images: list[ImageScore] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def benchmark_pairs(data_dir: str | os.PathLike, scale: int) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(name, HR after modcrop, LR) for each image of a benchmark folder.

    LR comes from LR_bicubic/X<scale>/<name>x<scale>.png when that folder exists, otherwise it is
    made with the MATLAB-exact resize.
    """
    data_dir = Path(data_dir)
    hr_dir = data_dir / "HR"
    if not hr_dir.is_dir():
        raise EvaluationError(f"{data_dir}: no HR folder; a benchmark folder holds HR/*.png and LR_bicubic/X{scale}/")
    hr_files = io.list_images(hr_dir)
    if not hr_files:
        raise EvaluationError(f"{hr_dir}: no images found")
    lr_dir = data_dir / "LR_bicubic" / f"X{scale}"
    for hr_path in hr_files:
        hr = modcrop(io.read_rgb8(hr_path), scale)
        if lr_dir.is_dir():
            lr_path = lr_dir / f"{hr_path.stem}x{scale}.png"
            if not lr_path.is_file():
                raise EvaluationError(
                    f"{lr_path}: missing LR partner of {hr_path}; add it, or remove {lr_dir} to make LR on the fly"
                )
            lr = io.read_rgb8(lr_path)
            if lr.shape[0] * scale != hr.shape[0] or lr.shape[1] * scale != hr.shape[1]:
                raise EvaluationError(
                    f"{lr_path}: size {lr.shape[1]}x{lr.shape[0]} does not match HR {hr.shape[1]}x{hr.shape[0]} "
                    f"at x{scale}; regenerate it with `a2n degrade`"
                )
        else:
            lr = imresize(hr, 1.0 / scale)
        yield hr_path.stem, hr, lr


def evaluate_folder(
    data_dir: str | os.PathLike,
    scale: int,
    model: A2N | None,
    save_images: str | os.PathLike | None = None,
    on_image: Callable[[str], None] | None = None,
    backend: str = "torch",
    precision: str = "fp32",
    ensemble: bool = False,
    tile: int | None = None,
) -> list[DatasetResult]:
    """Score the bicubic baseline and, when given, the model (on backend at precision; ensemble: A2N+, method a2n+;
    tile: through the tiled path in tiles of that many LR pixels) on one benchmark folder."""
    data_dir = Path(data_dir)
    name = data_dir.resolve().name
    methods = ["bicubic"] + ([ENSEMBLE_METHOD if ensemble else "a2n"] if model is not None else [])
    results = {m: DatasetResult(name, scale, m) for m in methods}
    for image_name, hr, lr in benchmark_pairs(data_dir, scale):
        for method in methods:
            start = time.perf_counter()
            sr = imresize(lr, float(scale)) if method == "bicubic" else upscale_array(model, lr, tile, backend=backend, precision=precision,
                                                                                      ensemble=ensemble)
            results[method].seconds += time.perf_counter() - start
            if save_images is not None:
                io.write_png(Path(save_images) / name / f"x{scale}" / method / f"{image_name}.png", sr)
            results[method].images.append(
                ImageScore(image_name, metrics.psnr(sr, hr, shave=scale), metrics.ssim(sr, hr, shave=scale))
            )
        if on_image is not None:
            on_image(image_name)
    for r in results.values():
        r.psnr = float(np.mean([i.psnr for i in r.images]))
        r.ssim = float(np.mean([i.ssim for i in r.images]))
    return list(results.values())


def format_table(results: list[DatasetResult]) -> str:
    """A plain-text table: dataset, scale, method, images, PSNR, SSIM, seconds."""
    lines = [f"{'dataset':<10} {'scale':>5} {'method':<8} {'images':>6} {'PSNR':>8} {'SSIM':>7} {'seconds':>8}"]
    for r in results:
        lines.append(
            f"{r.dataset:<10} {'x' + str(r.scale):>5} {r.method:<8} {len(r.images):>6} {r.psnr:>8.3f} {r.ssim:>7.4f} {r.seconds:>8.1f}"
        )
    return "\n".join(lines)
