"""Training throughput: our training step vs a plain fp32 NCHW eager loop of the same model.

Both run in this process on the same patches, alternating rounds so that load from other
processes hits both alike. Prints patches/s for each and their ratio; with --compile a third row
times the same step under torch.compile (`compile: true` in a config) and prints its compile time.

    python bench/train_throughput.py [--scale 4] [--batch 16] [--patch 48] [--rounds 3] [--steps 3] [--compile]
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
    args = ap.parse_args()

    torch.manual_seed(0)
    lr = torch.rand(args.batch, 3, args.patch, args.patch)
    hr = torch.rand(args.batch, 3, args.patch * args.scale, args.patch * args.scale)

    plain = A2N(args.scale)
    plain_opt = torch.optim.Adam(plain.parameters(), 1e-4)

    def plain_step() -> None:
        plain_opt.zero_grad(set_to_none=True)
        F.l1_loss(plain(lr), hr).backward()
        plain_opt.step()

    ours = A2N(args.scale).to(memory_format=torch.channels_last)
    ours_opt = torch.optim.Adam(ours.parameters(), 1e-4)
    amp = autocast_dtype("auto", torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    lr_cl, hr_cl = lr.contiguous(memory_format=torch.channels_last), hr.contiguous(memory_format=torch.channels_last)

    def our_step() -> None:
        ours_opt.zero_grad(set_to_none=True)
        forward_backward(ours, lr_cl, hr_cl, amp, scaler)
        ours_opt.step()

    times = {"plain fp32 NCHW eager": 0.0, f"a2n train step ({'bf16' if amp else 'fp32'} autocast, channels_last)": 0.0}
    steps = {"plain": plain_step, "ours": our_step}
    plain_step(), our_step()  # warm-up
    if args.compile:
        compiled = A2N(args.scale).to(memory_format=torch.channels_last)
        compiled.load_state_dict(ours.state_dict())
        compiled_opt = torch.optim.Adam(compiled.parameters(), 1e-4)
        compiled_fn = torch.compile(compiled)

        def compiled_step() -> None:
            compiled_opt.zero_grad(set_to_none=True)
            forward_backward(compiled_fn, lr_cl, hr_cl, amp, scaler)
            compiled_opt.step()

        start = time.perf_counter()
        compiled_step()
        compile_seconds = time.perf_counter() - start
        times["the same step under torch.compile"] = 0.0
        steps["compiled"] = compiled_step
    for _ in range(args.rounds):
        for key, fn in zip(times, steps.values()):
            start = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times[key] += time.perf_counter() - start
    n = args.rounds * args.steps * args.batch
    rates = {k: n / t for k, t in times.items()}
    print(f"x{args.scale}, batch {args.batch}, LR patch {args.patch}, {torch.get_num_threads()} threads, "
          f"CPU native bf16: {native_bf16()}")
    for k, r in rates.items():
        print(f"{k:<55} {r:7.2f} patches/s")
    base, mine = list(rates.values())[:2]
    print(f"ratio: {mine / base:.2f}x")
    if args.compile:
        print(f"torch.compile: {rates['the same step under torch.compile'] / mine:.2f}x our eager step, "
              f"after a first step of {compile_seconds:.0f} s (compiling)")


if __name__ == "__main__":
    main()
