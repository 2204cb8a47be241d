"""How fast INT8 files run against OpenVINO fp32 of the same weights: the shipped INT8 file of a scale and any other
INT8 files given (say an earlier recipe's), compiled in one process and timed in interleaved rounds.

No cost column here (bench/int8_recipes.py and the files' recorded Set5/Set14 costs give it); bench/infer.py times
the CLI's choices. Run it on a quiet CPU. Prints a Markdown table: median seconds and the ratio to fp32.

    python bench/int8_speed.py --scale 2 [--files OLD.xml ...] [--sizes 256x256,640x360] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from a2n.backends import quantize
from a2n.backends.export import export_onnx
from a2n.backends.runtimes import openvino_core
from a2n.inference import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--files", nargs="*", default=[], help="other INT8 files (.xml) of the shipped weights to time")
    parser.add_argument("--sizes", default="256x256,640x360", help="input sizes, WxH")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    core = openvino_core()
    config = {"INFERENCE_NUM_THREADS": args.threads, "INFERENCE_PRECISION_HINT": "f32"}
    model = load_model(args.scale)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"OpenVINO fp32": core.compile_model(core.read_model(str(export_onnx(model, Path(tmp) / "m.onnx"))), "CPU", config)}
    shipped = quantize.require_int8(model)
    for path in [shipped, *map(Path, args.files)]:
        ranges, hr_float = quantize.recorded_recipe(path)
        label = f"INT8 {'shipped' if path == shipped else path.name} ({ranges} ranges{', upsampling part in float' if hr_float else ''})"
        runs[label] = core.compile_model(str(path), "CPU", config)

    print(f"| x{args.scale} input | file | median s | vs OpenVINO fp32 |\n|---|---|---:|---:|")
    for size in args.sizes.split(","):
        w, h = map(int, size.split("x"))
        x = np.random.default_rng(0).random((1, 3, h, w), dtype=np.float32)
        for run in runs.values():
            run(x)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                start = time.perf_counter()
                run(x)
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times["OpenVINO fp32"])
        for name, values in times.items():
            print(f"| {w}x{h} | {name} | {statistics.median(values):.3f} | {base / statistics.median(values):.2f}x |")


if __name__ == "__main__":
    main()
