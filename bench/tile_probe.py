"""Which probe size predicts the fastest backend for big images' tiles: what auto's tiled timing sees at each size.

auto times the tiled path once per machine and weights (a2n.backends.auto.measure_tiled, a crop of the
packaged sample in 128-pixel tiles) and keeps the whole image's backend unless another is 10% faster.
This runs that timing at several probe sizes, then the real tiled path on a big natural image on each
backend, in one process, so the probe whose order matches the big image's can be read off. Prints a
Markdown table of seconds per backend.

    python bench/tile_probe.py [--precision bf16] [--scales 2 4] [--sizes 256 384 512] [--big 1024x1024] [--rounds 3]
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

from a2n import inference  # noqa: E402
from a2n.backends import auto, runtimes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--scales", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 384, 512])
    parser.add_argument("--big", default="1024x1024", help="input HEIGHTxWIDTH of the big image")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    names = [b for b, p in runtimes.candidates() if p == args.precision]
    if len(names) < 2:
        sys.exit(f"only {names} run {args.precision} on this CPU: nothing for auto to choose between")
    h, w = (int(v) for v in args.big.split("x"))
    big = natural_input(h, w)
    rows = []
    for scale in args.scales:
        model, origin = model_for(scale)
        for size in args.sizes:
            measured = auto.measure_tiled(model, names, args.precision, size=size, repeat=args.rounds)
            rows.append((scale, f"probe {size}x{size} ({(size // auto.TILED_PROBE_TILE) ** 2} tiles)",
                         {r["backend"]: r.get("seconds") for r in measured}))
        out = np.empty((h * scale, w * scale, 3), np.float32)
        seconds: dict[str, float] = {}
        for name in names:
            inference.forward_tiled(model, big, out, auto.TILED_PROBE_TILE, False, name, args.precision)  # compile the shapes
        for _ in range(args.rounds):
            for name in names:
                start = time.perf_counter()
                inference.forward_tiled(model, big, out, auto.TILED_PROBE_TILE, False, name, args.precision)
                seconds[name] = min(seconds.get(name, np.inf), time.perf_counter() - start)
        rows.append((scale, f"**big image {w}x{h}** (the real tiled path)", seconds))
        print(f"x{scale} done ({origin} weights)", file=sys.stderr, flush=True)
    print(f"\n{args.precision}, {torch.get_num_threads()} threads, tiles of {auto.TILED_PROBE_TILE}, best of {args.rounds} rounds "
          f"after a warm-up; auto keeps the whole image's backend unless another is {auto.PREFER_MARGIN:.0%} faster\n")
    print(f"| scale | timed on | {' | '.join(f'{n} (s)' for n in names)} | fastest | slowest / fastest |")
    print(f"|---|---|{'---:|' * len(names)}---|---:|")
    for scale, what, seconds in rows:
        done = {n: s for n, s in seconds.items() if s is not None}
        fastest = min(done, key=done.get)
        cells = " | ".join(f"{seconds[n]:.3f}" if seconds.get(n) is not None else "failed" for n in names)
        print(f"| x{scale} | {what} | {cells} | {fastest} | {max(done.values()) / done[fastest]:.2f}x |")


if __name__ == "__main__":
    main()
