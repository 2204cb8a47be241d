"""Folder throughput of `a2n upscale`: images in flight (decode, model, encode overlapped) vs one at a time.

Both paths run in this process on the same folder, model and backend: the baseline reads, upscales
and writes each image in turn; `a2n.batch.run` decodes the next image and encodes the last one
while the model works on the current one. Prints images/s and the ratio as a Markdown table.

    python bench/batch.py [--images 8] [--size 240x180] [--scale 4] [--backend torch]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from functools import partial
from importlib import resources
from pathlib import Path

import torch
from PIL import Image

from a2n import batch, io
from a2n.inference import load_model, upscale_picture

SAMPLE = Path(str(resources.files("a2n"))) / "samples" / "village.png"


def make_folder(folder: Path, n: int, width: int, height: int) -> None:
    """n different natural crops of the shipped sample, resized to width x height."""
    sample = Image.open(SAMPLE).convert("RGB")
    for i in range(n):
        left, top = (i * 37) % (sample.width // 3), (i * 23) % (sample.height // 3)
        crop = sample.crop((left, top, left + 2 * sample.width // 3, top + 2 * sample.height // 3))
        crop.resize((width, height), Image.Resampling.BICUBIC).save(folder / f"im{i:02d}.png")


def one_at_a_time(plan: batch.Plan, model, backend: str) -> None:
    for source, target in plan.jobs:
        io.write_image(target, upscale_picture(model, io.read_image(source), backend=backend))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--size", default="240x180", help="input WIDTHxHEIGHT")
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--backend", default="torch")
    args = ap.parse_args()
    width, height = map(int, args.size.split("x"))
    model = load_model(args.scale)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        make_folder(src, args.images, width, height)
        upscale_picture(model, io.read_image(next(src.iterdir())), backend=args.backend)  # warm-up
        seconds = {}
        for name in ("one at a time", "in flight"):
            plan = batch.make_plan([str(src)], str(Path(tmp) / name.replace(" ", "_")), args.scale)
            start = time.perf_counter()
            if name == "one at a time":
                one_at_a_time(plan, model, args.backend)
            else:
                batch.run(plan, partial(upscale_picture, model, backend=args.backend))
            seconds[name] = time.perf_counter() - start
    base = seconds["one at a time"]
    print(f"\n{args.images} images {width}x{height} -> x{args.scale} PNG, backend {args.backend}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, torch {torch.__version__}\n")
    print("| path | seconds | images/s | speed-up |")
    print("|---|---|---|---|")
    for name, s in seconds.items():
        print(f"| {name} | {s:.2f} | {args.images / s:.2f} | {base / s:.2f}x |")


if __name__ == "__main__":
    main()
