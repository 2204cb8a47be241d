"""Start-up of `a2n upscale`: a fresh process upscaling a 32x32 crop, so that the time is import and load.

Runs, in fresh processes and with an empty cache folder: `--backend torch`; the first `auto` run
(exports the model and times the backends once); later `auto` runs, which go straight from the
cached export to the runtime without importing torch. Prints a Markdown table with the ratio
against the torch path measured in the same run, and writes it as the `## Start-up` section of
bench/RESULTS.md.

    python bench/startup.py
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata, resources
from pathlib import Path

from PIL import Image

RESULTS = Path(__file__).parent / "RESULTS.md"
SAMPLE = Path(str(resources.files("a2n"))) / "samples" / "village.png"


def seconds(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs per case (best is kept)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "crop.png"
        Image.open(SAMPLE).convert("RGB").crop((0, 0, 32, 32)).save(image)
        env = {**os.environ, "A2N_CACHE_DIR": f"{tmp}/cache"}
        upscale = [sys.executable, "-m", "a2n", "upscale", str(image), "-o", f"{tmp}/out.png", "--overwrite"]
        rows = {
            "python -c 'import torch' (reference)": min(seconds([sys.executable, "-c", "import torch"], env) for _ in range(args.repeat)),
            "a2n upscale --backend torch": min(seconds(upscale + ["--backend", "torch"], env) for _ in range(args.repeat)),
            "a2n upscale, first auto run (export + timing once)": seconds(upscale, env),
            "a2n upscale, later auto runs (cached export, no torch import)": min(seconds(upscale, env) for _ in range(args.repeat)),
        }
    base = rows["a2n upscale --backend torch"]
    versions = ", ".join(f"{n} {metadata.version(n)}" for n in ("torch", "onnxruntime", "openvino") if _installed(n))
    lines = ["## Start-up", "",
             f"`python bench/startup.py`: fresh processes upscaling a 32x32 crop at x4 with the shipped weights (best of "
             f"{args.repeat}; the first auto run once). Machine: {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPUs; {versions}.", "",
             "| run | seconds | vs --backend torch |", "|---|---:|---:|"]
    lines += [f"| {name} | {s:.2f} | {base / s:.2f}x |" for name, s in rows.items()]
    section = "\n".join(lines) + "\n"
    print(section)
    if not args.no_write:
        text = RESULTS.read_text()
        start = text.find("## Start-up")
        if start < 0:
            RESULTS.write_text(text.rstrip("\n") + "\n\n" + section)
        else:
            end = text.find("\n## ", start + 1)
            RESULTS.write_text(text[:start] + section + (text[end + 1:] if end >= 0 else ""))


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


if __name__ == "__main__":
    main()
