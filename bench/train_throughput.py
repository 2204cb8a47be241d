"""Training throughput: our training step in fp32 and bf16 vs a plain fp32 NCHW eager loop of the same model.

All run in this process on the same patches, alternating rounds so that load from other
processes hits them alike. Prints patches/s for each and their ratio to the plain loop; the bf16
row only where the CPU has native bf16 (which `precision: auto` then times against fp32, as here).
With --compile one more row times the step under torch.compile (`compile: true`); with --bf16 the bf16 row
runs on a CPU without native bf16 too (torch emulates it there: the row says what emulation costs).

    python bench/train_throughput.py [--scale 4] [--batch 16] [--patch 48] [--rounds 3] [--steps 3] [--compile] [--bf16]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from a2n.model import A2N
from a2n.backends.cpu import native_bf16
from a2n.training import autocast_dtype, forward_backward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--patch", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time the step under torch.compile")
    ap.add_argument("--bf16", action="store_true", help="time the bf16 row even where torch emulates bf16 (slow)")
    args = ap.parse_args()

    torch.manual_seed(0)
    lr = torch.rand(args.batch, 3, args.patch, args.patch)
    hr = torch.rand(args.batch, 3, args.patch * args.scale, args.patch * args.scale)

    lr_cl, hr_cl = lr.contiguous(memory_format=torch.channels_last), hr.contiguous(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def make_step(memory_format: torch.memory_format, amp: torch.dtype | None, compiled: bool = False):
        """One Adam step of a fresh A2N in this layout and precision (our training step's code when channels_last)."""
        model = A2N(args.scale).to(memory_format=memory_format)
        opt = torch.optim.Adam(model.parameters(), 1e-4)
        call = torch.compile(model) if compiled else model
        x, y = (lr_cl, hr_cl) if memory_format == torch.channels_last else (lr, hr)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            if memory_format == torch.channels_last:
                forward_backward(call, x, y, amp, scaler)
            else:
                F.l1_loss(call(x), y).backward()
            opt.step()

        return step

    auto = autocast_dtype("auto", torch.device("cpu"))  # bf16 where native: the candidate `precision: auto` times
    bf16 = auto or (torch.bfloat16 if args.bf16 else None)
    steps = {"plain fp32 NCHW eager": make_step(torch.contiguous_format, None),
             "a2n train step, fp32, channels_last": make_step(torch.channels_last, None)}
    if bf16 is not None:
        steps["a2n train step, bf16 autocast, channels_last"] = make_step(torch.channels_last, bf16)
    for fn in steps.values():
        fn()  # warm-up
    compile_seconds = 0.0
    if args.compile:
        compiled = make_step(torch.channels_last, auto, compiled=True)
        start = time.perf_counter()
        compiled()
        compile_seconds = time.perf_counter() - start
        steps[f"the {'bf16' if auto else 'fp32'} step under torch.compile"] = compiled
    times = dict.fromkeys(steps, 0.0)
    for _ in range(args.rounds):
        for key, fn in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times[key] += time.perf_counter() - start
    n = args.rounds * args.steps * args.batch
    rates = {k: n / t for k, t in times.items()}
    base = rates["plain fp32 NCHW eager"]
    print(f"x{args.scale}, batch {args.batch}, LR patch {args.patch}, {torch.get_num_threads()} threads, "
          f"CPU native bf16: {native_bf16()}" + ("" if bf16 else " (no bf16 row: torch would emulate it; --bf16 times it anyway)"))
    for k, r in rates.items():
        print(f"{k:<50} {r:7.2f} patches/s  {r / base:5.2f}x")
    if bf16 is not None:
        fp32_rate, bf16_rate = rates["a2n train step, fp32, channels_last"], rates["a2n train step, bf16 autocast, channels_last"]
        choice = ("bf16" if bf16_rate > fp32_rate else "fp32") if auto else "fp32 (no native bf16: it does not time bf16)"
        print(f"bf16 / fp32: {bf16_rate / fp32_rate:.3f}x: `precision: auto` would train in {choice} here")
    if args.compile:
        print(f"torch.compile took {compile_seconds:.0f} s for its first step (compiling)")


if __name__ == "__main__":
    main()
