"""Inference speed: the official-style eager forward against each of our backends and precisions.

One run over the same inputs (256x256 at x4, and a 1280x720 output at x2, x3, x4); prints a
Markdown table and writes it as the `## Inference speed` section of bench/RESULTS.md. Start-up
is measured by bench/startup.py.

With --big, big images instead (a 2000x1500 input at x2, a 1000x1000 input at x4, under
--max-memory 4 so that both tile): the official forward with its quadrant chop, and our exact
tiled path on each backend, each against the whole-image auto rate per output pixel measured
just before it (auto's tiled choice --rounds times, median), and the INT8 stages where shipped. Written as `## Big images`; the
tile side is weighed by bench/tile_sides.py.

    python bench/infer.py --threads 2 [--big [--rounds 3]]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from official_a2n import AAN, forward_chop  # noqa: E402

from a2n import backends, inference, tiling  # noqa: E402
from a2n import A2NError  # noqa: E402
from a2n.backends import auto as auto_choice, cpu, fidelity_db, get_runner, quantize  # noqa: E402
from a2n.model import A2N, count_macs  # noqa: E402
from a2n.weights import build_model, shipped_weights_path  # noqa: E402

CASES = [("256x256 input, x4", 4, 256, 256), ("1280x720 output, x2", 2, 360, 640),
         ("1278x720 output, x3", 3, 240, 426), ("1280x720 output, x4", 4, 180, 320)]
OURS = [("torch", "fp32"), ("torch", "bf16"), ("torch", "fp16"), ("onnxruntime", "fp32"),
        ("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "fp16"), ("openvino", "int8")]
RESULTS = Path(__file__).parent / "RESULTS.md"
CROP = 48  # side of the crop that precisions torch emulates on this CPU are timed on
BIG_CASES = [("2000x1500 input, x2", 2, 1500, 2000), ("1000x1000 input, x4", 4, 1000, 1000)]
BIG_MEMORY = 4.0  # GiB: --max-memory of the big cases, under which both tile
TILED = ("torch", "onnxruntime", "openvino")


def matmul_peak(dtype: torch.dtype, n: int, repeat: int = 3) -> float:
    """Best GFLOP/s of an n x n matmul in dtype."""
    a, b = torch.rand(n, n).to(dtype), torch.rand(n, n).to(dtype)
    a @ b
    best = min(_seconds(lambda: a @ b) for _ in range(repeat))
    return 2 * n**3 / best / 1e9


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def model_for(scale: int) -> tuple[A2N, str]:
    """The shipped weights, or a seeded random model when there are none (speed does not depend on values)."""
    if shipped_weights_path(scale) is not None:
        return build_model(scale), "shipped"
    torch.manual_seed(0)
    return A2N(scale).eval(), "seeded random"


def set5_cost(model: A2N, backend: str, precision: str, costs: dict) -> str:
    """PSNR cost on Set5 (Y, as `a2n evaluate`) of backend at precision against torch fp32, once per scale and pair."""
    from a2n.evaluation import evaluate_folder

    set5 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "benchmark" / "Set5"
    if not set5.is_dir():
        return "no Set5 (../shared absent)"
    key = (model.scale, backend, precision)
    if key not in costs:
        if (model.scale, "torch", "fp32") not in costs:
            costs[(model.scale, "torch", "fp32")] = evaluate_folder(set5, model.scale, model, backend="torch", precision="fp32")[-1].psnr
        costs[key] = evaluate_folder(set5, model.scale, model, backend=backend, precision=precision)[-1].psnr
    return f"{costs[(model.scale, 'torch', 'fp32')] - costs[key]:+.3f}"


def official_runner(model: A2N):
    """The official-style network with the same weights, on 0..1 images (scaled around it like ours)."""
    net = AAN(model.scale).eval()
    net.load_state_dict(model.state_dict(), strict=True)
    pr = model.pixel_range

    @torch.inference_mode()
    def run(x: torch.Tensor) -> torch.Tensor:
        return net(x * pr) / pr

    return run


def time_runner(run, x: torch.Tensor, repeat: int) -> tuple[float, torch.Tensor]:
    """Best wall seconds of repeat runs after one warm-up, and the output."""
    out = run(x)
    return min(_seconds(lambda: run(x)) for _ in range(repeat)), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per fast case (best is kept)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    parser.add_argument("--big", action="store_true", help="big images through the tiled path instead (## Big images)")
    parser.add_argument("--rounds", type=int, default=3, help="with --big: runs of auto's tiled choice (the median is kept)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.big:
        section = big_images(args)
        print(section)
        if not args.no_write:
            write_section(section, "## Big images")
        return
    peak_bf16 = matmul_peak(torch.bfloat16, 2048 if cpu.native_bf16() else 512)  # emulated bf16 is ~100x slower
    peak_fp32 = matmul_peak(torch.float32, 2048)
    auto = auto_choice.choose(model_for(4)[0])
    lines = ["| case | forward | seconds | speed-up | GFLOP/s | % bf16 peak | % fp32 peak | fidelity (dB) | Set5 cost (dB) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    costs: dict = {}
    for name, scale, h, w in CASES:
        model, origin = model_for(scale)
        x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
        flops = 2 * count_macs(model, h, w)
        base, ref = time_runner(official_runner(model), x, args.repeat)
        ours = get_runner(model, "torch", "fp32")(x)
        rows = [("official eager fp32 NCHW", base, fidelity_db(ref, ours), "")]
        for backend, precision in OURS:
            try:
                run = get_runner(model, backend, precision)
            except A2NError as exc:
                rows.append((f"{backend} {precision}", None, str(exc).split(";")[0], ""))
                continue
            label = f"{backend} {precision}" + (" (auto's choice)" if (backend, precision) == auto else "")
            if backend == "torch" and precision != "fp32" and not cpu.native_bf16():
                crop = x[:, :, :CROP, :CROP]
                seconds, out = time_runner(run, crop, 1)
                seconds *= flops / (2 * count_macs(model, CROP, CROP))
                rows.append((label + f", emulated: {CROP}x{CROP} crop, time scaled", seconds, fidelity_db(out, get_runner(model)(crop)),
                             "emulated here: not scored"))
                continue
            seconds, out = time_runner(run, x, args.repeat)
            rows.append((label, seconds, fidelity_db(out, ours), set5_cost(model, backend, precision, costs)))
        for label, seconds, fid, cost in rows:
            if seconds is None:
                lines.append(f"| {name} | {label} | n/a | | | | | {fid} | |")
                continue
            gflops = flops / seconds / 1e9
            lines.append(f"| {name} | {label} | {seconds:.3f} | {base / seconds:.2f}x | {gflops:.1f} | "
                         f"{100 * gflops / peak_bf16:.0f}% | {100 * gflops / peak_fp32:.0f}% | {fid:.1f} | {cost} |")
        print("\n".join(lines[-len(rows):]), flush=True)
        lines.append(f"| {name} | floor: {flops / 1e9:.1f} GFLOP at the bf16 / fp32 matmul peak | {flops / peak_bf16 / 1e9:.3f} / {flops / peak_fp32 / 1e9:.3f} | | | | | | |")
    header = [
        "## Inference speed", "",
        f"`python bench/infer.py --threads {args.threads}`, one run. Machine: {platform.machine()}, {torch.get_num_threads()} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu.native_bf16()}; "
        f"torch {torch.__version__}; weights: {origin}.",
        f"Matmul peak measured in this run (fp32 2048x2048, bf16 2048 with native bf16, else 512): bf16 {peak_bf16:.1f} GFLOP/s, fp32 {peak_fp32:.1f} GFLOP/s. "
        f"GFLOP/s counts 2 x the multiply-adds of convolutions and linear layers (`a2n info`). Fidelity: PSNR of "
        f"each output against our torch fp32 output on the 0..1 scale. Set5 cost: PSNR on Y (as `a2n evaluate`) of torch fp32 "
        f"minus that of the row, at the case's scale. `auto` chose {auto[0]} {auto[1]} here.", "",
    ]
    footer = ["", "Start-up of `a2n upscale`: see Start-up below (`bench/startup.py`).", ""]
    section = "\n".join(header + lines + footer)
    print(section)
    if not args.no_write:
        write_section(section)


def natural_input(height: int, width: int) -> torch.Tensor:
    """The packaged sample photo resized (bicubic) to width x height, as 1x3xHxW in 0..1."""
    from importlib import resources

    from PIL import Image

    sample = Path(str(resources.files("a2n"))) / "samples" / "village.png"
    rgb = np.asarray(Image.open(sample).convert("RGB").resize((width, height), Image.Resampling.BICUBIC))
    return torch.from_numpy(rgb.transpose(2, 0, 1).copy()).float().div(255).unsqueeze(0)


def tiled_seconds(model: A2N, x: torch.Tensor, backend: str, tile: int, precision: str = "fp32") -> tuple[float, np.ndarray]:
    """Wall seconds of one tiled run on backend at precision, and its output.

    The stages are made and warmed up first on a crop that gives the same window shapes (two tiles
    a side), so that OpenVINO's compile per shape is not timed; it is a one-time cost per image size."""
    h, w = x.shape[2:]
    boxes = tiling.tiles(h, w, tile)
    span_h, span_w = max(b[0].stop - b[0].start for b in boxes), max(b[1].stop - b[1].start for b in boxes)
    crop = x[:, :, :min(h, 2 * span_h), :min(w, 2 * span_w)]
    inference.forward_tiled(model, crop, np.empty((crop.shape[2] * model.scale, crop.shape[3] * model.scale, 3), np.float32),
                            tile, False, backend, precision)
    out = np.empty((h * model.scale, w * model.scale, 3), np.float32)
    return _seconds(lambda: inference.forward_tiled(model, x, out, tile, False, backend, precision)), out


def big_images(args: argparse.Namespace) -> str:
    """The `## Big images` section: official chop vs our tiled path per backend.

    This machine's speed wanders by 20-40% within minutes, so every big run is divided by a
    whole-image auto run on a 1280x720 output made right before it (its neighbour in time), and
    the row auto picks for tiles is repeated args.rounds times, reporting the median ratio and
    the range. The speed-up over the official code is the ratio of the two normalised rates.
    """
    lines = ["| case | forward | tile | seconds | GFLOP/s | vs whole-image auto, per output pixel | vs the same image whole | speed-up over official | fidelity (dB) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    summary = []
    for name, scale, h, w in BIG_CASES:
        model, origin = model_for(scale)
        auto = backends.resolve(model, "auto", "auto")  # as a2n upscale does: the tiles run at the whole image's precision
        auto_tiled, precision = backends.resolve_tiled(model, "auto", "auto")
        ref_h, ref_w = 720 // scale, 1280 // scale  # a 1280x720 output: fits one forward
        ref_x = natural_input(ref_h, ref_w)
        whole = get_runner(model, *auto)

        def ref_rate() -> float:
            """Output pixels per second of whole-image auto, now (best of two)."""
            return ref_h * ref_w * scale**2 / time_runner(whole, ref_x, 2)[0]

        x = natural_input(h, w)
        flops, out_pixels = 2 * count_macs(model, h, w), h * w * scale**2
        net = AAN(scale).eval()
        net.load_state_dict(model.state_dict(), strict=True)
        pr = model.pixel_range
        with torch.inference_mode():
            rate = ref_rate()
            official_seconds = _seconds(lambda: forward_chop(net, x * pr, scale))
            official = (forward_chop(net, x * pr, scale) / pr).clamp(0, 1)[0].permute(1, 2, 0).numpy()
        official_ratio = out_pixels / official_seconds / rate
        rows = [("official eager fp32 NCHW, quadrant chop", "", [official_seconds], [official_ratio], official, [])]
        for backend in [auto_tiled] + [b for b in TILED if b != auto_tiled and (b, precision) in auto_choice.candidates()]:
            tile = inference.plan_tile(h, w, model, BIG_MEMORY, 1, backend)
            times, ratios, same = [], [], []
            for _ in range(args.rounds if backend == auto_tiled else 1):
                rate = ref_rate()
                seconds, out = tiled_seconds(model, x, backend, tile, precision)
                times.append(seconds)
                ratios.append(out_pixels / seconds / rate)
                if backend == auto_tiled:  # the same image in one forward, beside it: past the budget, but this machine has the memory
                    with torch.inference_mode():
                        same.append(_seconds(lambda: whole(x)) / seconds)
                print(f"{name}, tiled {backend}: {seconds:.1f} s, {ratios[-1]:.2f}x" + (f", {same[-1]:.2f}x the same image whole" if same else ""), flush=True)
            label = f"tiled, {backend} {precision}" + (f" (auto's choice for tiles; median of {len(times)})" if backend == auto_tiled else "")
            rows.append((label, tile, times, ratios, out, same))
        stages = quantize.int8_stages(model)
        if precision != "int8" and stages is not None and ("openvino", "fp32") in auto_choice.candidates():
            tile, whole_int8 = inference.plan_tile(h, w, model, BIG_MEMORY, 1, "openvino"), get_runner(model, "openvino", "int8")
            rate = ref_rate()
            seconds, out = tiled_seconds(model, x, "openvino", tile, "int8")
            with torch.inference_mode():
                same = [_seconds(lambda: whole_int8(x)) / seconds]
            rows.append((f"tiled, openvino int8 on the INT8 stages (asked by name; vs the same image whole: the INT8 file; "
                         f"recorded cost {quantize.stages_price(stages):.3f} dB)", tile, [seconds], [out_pixels / seconds / rate], out, same))
            print(f"{name}, tiled openvino int8: {seconds:.1f} s, {same[0]:.2f}x the same image whole in INT8", flush=True)
        exact = next(r[4] for r in rows if "torch" in r[0] and "tiled" in r[0])  # equals the whole-image forward (tests)
        for label, tile, times, ratios, out, same in rows:
            seconds, ratio = float(np.median(times)), float(np.median(ratios))
            spread = f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
            whole_same = f"{float(np.median(same)):.2f}x ({min(same):.2f}-{max(same):.2f})" if same else ""
            lines.append(f"| {name} | {label} | {tile} | {seconds:.1f} | {flops / seconds / 1e9:.1f} | {ratio:.2f}x{spread} | {whole_same} | "
                         f"{ratio / official_ratio:.2f}x | {fidelity_db(torch.from_numpy(out), torch.from_numpy(exact)):.1f} |")
        print("\n".join(lines[-len(rows):]), flush=True)
        summary.append(f"{name}: whole-image auto is {auto[0]} {auto[1]} on a {ref_w}x{ref_h} input, auto for tiles chose {auto_tiled}")
    header = [
        "## Big images", "",
        f"`python bench/infer.py --threads {args.threads} --big --rounds {args.rounds}`, one run. Machine: {platform.machine()}, "
        f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}; torch {torch.__version__}; "
        f"weights: {origin}; inputs: the packaged sample resized. Tiles are planned under `--max-memory {BIG_MEMORY:g}` for each "
        "backend. Every row is divided by a whole-image auto run on a 1280x720 output made just before it, because this machine's "
        "speed wanders by 20-40% within minutes; auto's row for tiles is repeated (median, range in brackets). Speed-up over "
        "official: the ratio of the two normalised rates. Vs the same image whole: auto's whole-image forward on the big input "
        "itself (past the budget), run right after each of auto's tiled rounds. Fidelity: PSNR against our tiled torch output, which equals the "
        "whole-image forward (the official chop is not exact: each quadrant's ADMs pool over it alone).",
        "; ".join(summary) + ".", "",
    ]
    return "\n".join(header + lines + [""])


def write_section(section: str, heading: str = "## Inference speed") -> None:
    """Put section into RESULTS.md in place of an earlier one under the same heading, or at the end."""
    text = RESULTS.read_text()
    start = text.find(heading)
    if start < 0:
        RESULTS.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    end = text.find("\n## ", start + 1)
    RESULTS.write_text(text[:start] + section + (text[end + 1:] if end >= 0 else ""))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
