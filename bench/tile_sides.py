"""Where larger tiles stop paying: the exact tiled path at several tile sides against the same image whole.

One process, interleaved rounds (the order flips each round), so that the machine's drift hits every
side alike; each round divides the whole-image forward's seconds by the tiled run's. Every stage
keeps all its compiled shapes here, so no round pays OpenVINO's compile. Prints a Markdown table.

    python bench/tile_sides.py [--backend openvino] [--precision bf16|int8] [--scale 2] [--size 768x1024] [--rounds 5] [--tiles 128,256,384]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from infer import model_for, natural_input  # noqa: E402

from a2n import backends, inference  # noqa: E402
from a2n.backends import runtimes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="openvino", choices=("torch", "onnxruntime", "openvino"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "int8"),
                        help="of the whole image and of the tiles (int8: the INT8 file whole, the INT8 stages tiled; openvino)")
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--size", default="768x1024", help="input HEIGHTxWIDTH")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tiles", default="128,256,384")
    args = parser.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    sides = [int(t) for t in args.tiles.split(",")]
    runtimes.OpenVINOStage.KEEP_SHAPES = len(sides) + 1  # cycling through more sides than it keeps would time compiles
    model, origin = model_for(args.scale)
    x = natural_input(h, w)
    out = np.empty((h * args.scale, w * args.scale, 3), np.float32)
    whole = backends.get_runner(model, args.backend, args.precision)

    def run_whole() -> None:
        with torch.inference_mode():
            whole(x)

    jobs = {t: (lambda t=t: inference.forward_tiled(model, x, out, t, False, args.backend, args.precision)) for t in sides}
    jobs[0] = run_whole
    for job in jobs.values():  # compile and warm up every shape first
        job()
    seconds: dict[int, list[float]] = {k: [] for k in jobs}
    for r in range(args.rounds):
        for k in list(jobs) if r % 2 == 0 else list(jobs)[::-1]:
            start = time.perf_counter()
            jobs[k]()
            seconds[k].append(time.perf_counter() - start)
        print(f"round {r}: " + ", ".join(f"{'whole' if k == 0 else f'tile {k}'} {v[-1]:.2f} s" for k, v in seconds.items()), flush=True)
    print(f"\n{args.backend} {args.precision}, {w}x{h} input at x{args.scale}, weights: {origin}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds; rate against the same image whole, median (range):\n")
    print("| tile side | seconds (median) | vs the same image whole |\n| ---: | ---: | ---: |")
    for t in sides:
        ratios = [a / b for a, b in zip(seconds[0], seconds[t])]
        print(f"| {t} | {np.median(seconds[t]):.2f} | {np.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")
    print(f"| whole | {np.median(seconds[0]):.2f} | 1.00x |")


if __name__ == "__main__":
    main()
