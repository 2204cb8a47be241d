"""Peak memory (RSS) and time of `a2n upscale` at x4: a 1280x720 output and a 2000x2000 input (8000x8000 output).

Each run is a separate process; its peak RSS comes from the kernel (wait4). A plain whole-image
forward is measured on a 500x500 input, where it still fits; its growth over the baseline (an
8x8 input: Python, torch and the model) is scaled to 2000x2000 by pixel count (it is linear).
--backend onnxruntime or openvino measures their whole-image forward instead of torch's. Uses the
shipped x4 weights when present, else seeded random ones (memory and time do not depend on the
values). Prints a Markdown table for bench/RESULTS.md.

--bound checks the budget instead: an 800x800 input at x4 under `--max-memory 1` (so it tiles) on
each backend, peak RSS against the budget plus that backend's baseline (8x8 input).

    python bench/memory.py [--threads N] [--skip-large] [--backend torch|onnxruntime|openvino] [--bound]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch
from PIL import Image

from a2n.model import A2N
from a2n.weights import save_weights, shipped_weights_path

SAMPLE = Path(str(resources.files("a2n"))) / "samples" / "village.png"


def make_input(path: Path, width: int, height: int) -> None:
    """The shipped sample resized (bicubic) to the size wanted, so the content is natural."""
    Image.open(SAMPLE).convert("RGB").resize((width, height), Image.Resampling.BICUBIC).save(path)


def measure(args: list[str]) -> tuple[float, float]:
    """(peak RSS in GiB, seconds) of one `a2n upscale` process; raises if it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "a2n", "upscale", *args], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"a2n upscale {' '.join(args)} failed")
    return usage.ru_maxrss * 1024 / 2**30, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="torch threads for a2n upscale (default: torch's)")
    parser.add_argument("--skip-large", action="store_true", help="leave out the 2000x2000 input")
    parser.add_argument("--backend", default="torch", help="backend of the forwards, tiled or whole")
    parser.add_argument("--bound", action="store_true", help="check the memory bound of the tiled path on every backend")
    opts = parser.parse_args()
    if opts.bound:
        return bound(opts.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        weights = shipped_weights_path(4)
        if weights is None:
            torch.manual_seed(0)
            weights = tmp_path / "random_x4.safetensors"
            save_weights(A2N(scale=4), weights)
        common = ["--scale", "4", "--weights", str(weights), "--overwrite", "--backend", opts.backend]
        if opts.threads:
            common += ["--threads", str(opts.threads)]
        cases = [("baseline: 32x32 output (8x8 input)", 8, 8, [])]
        cases.append(("1280x720 output (320x180 input)", 320, 180, []))
        cases.append(("plain forward, 500x500 input (--tile 100000)", 500, 500, ["--tile", "100000"]))
        if not opts.skip_large:
            cases.append(("8000x8000 output (2000x2000 input)", 2000, 2000, []))
        rows = []
        for name, w, h, extra in cases:
            src = tmp_path / f"in_{w}x{h}.png"
            make_input(src, w, h)
            rss, seconds = measure([str(src), "-o", str(tmp_path / "out"), *common, *extra])
            rows.append((name, rss, seconds))
            print(f"{name}: peak RSS {rss:.2f} GiB, {seconds:.1f} s", file=sys.stderr, flush=True)
    base, plain = rows[0][1], rows[2][1]
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, backend {opts.backend}, "
          f"threads {opts.threads or torch.get_num_threads()}, weights {'shipped' if shipped_weights_path(4) else 'random'} x4\n")
    print("| case | peak RSS (GiB) | time (s) |")
    print("| --- | ---: | ---: |")
    for name, rss, seconds in rows:
        print(f"| {name} | {rss:.2f} | {seconds:.1f} |")
    print(f"| plain forward of a 2000x2000 input: baseline + 16 x growth of the 500x500 one | ~{base + 16 * (plain - base):.0f} | |")


def bound(threads: int | None, budget: float = 1.0, side: int = 800) -> None:
    """Peak RSS of a tiled upscale under --max-memory budget on each backend, against budget + baseline."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        weights = shipped_weights_path(4)
        small, big = tmp_path / "small.png", tmp_path / "big.png"
        make_input(small, 8, 8)
        make_input(big, side, side)
        for backend in ("torch", "onnxruntime", "openvino"):
            common = ["--scale", "4", "--weights", str(weights), "--overwrite", "--backend", backend, "-o", str(tmp_path / "out")]
            common += ["--threads", str(threads)] if threads else []
            base, _ = measure([str(small), *common])
            measure([str(big), *common, "--max-memory", str(budget)])  # exports the stages once
            rss, seconds = measure([str(big), *common, "--max-memory", str(budget)])
            rows.append((backend, base, rss, seconds))
            print(f"{backend}: baseline {base:.2f} GiB, tiled {rss:.2f} GiB, {seconds:.1f} s", file=sys.stderr, flush=True)
    print(f"{side}x{side} input at x4 ({4 * side}x{4 * side} output), `--max-memory {budget:g}`, shipped x4 weights, "
          f"threads {threads or torch.get_num_threads()}; second run of each (the first exports the stages)\n")
    print("| backend | baseline 8x8 input (GiB) | tiled peak RSS (GiB) | growth (GiB) | within the budget | time (s) |")
    print("| --- | ---: | ---: | ---: | --- | ---: |")
    for backend, base, rss, seconds in rows:
        print(f"| {backend} | {base:.2f} | {rss:.2f} | {rss - base:.2f} | {'yes' if rss - base <= budget else 'NO'} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
