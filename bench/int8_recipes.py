"""What each INT8 recipe costs against ground truth: Set5 / Set14 PSNR on Y lost against OpenVINO fp32.

The package's recipe (a2n.backends.quantize.recipe) with each choice of activation ranges it tries, min-max (over
all calibration crops) and mean (NNCF's default: the mean over crops of each crop's min and max), and variants,
each a part of the recipe name (joined by +): histogram or quantile ranges, smooth-conv[-ALPHA] (SmoothQuant on
the convolutions), full-bias (NNCF's full bias correction), zero-biases (a tiny bias on every convolution, so that
bias correction reaches all of them, not the 25 with a bias), crops-256 (4x the calibration crops),
channel-alignment, and last-conv-float / hr-convs-float (the output convolution, or every convolution after the
upsampling, in float). Every variant is calibrated on the same crops of the 291 training photos and checked on the
same held-out crops; the shipped weights (or --weights). No timing here: bench/infer.py times the files. Prints a
Markdown table.

    python bench/int8_recipes.py --scale 4 [--recipes min-max,mean,mean+smooth-conv] [--data ../shared/data/benchmark]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from a2n import metrics
from a2n.backends import quantize
from a2n.backends.export import export_onnx
from a2n.backends.runtimes import openvino_core
from a2n.evaluation import benchmark_pairs
from a2n.pixels import from_planes
from a2n.weights import build_model

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ("min-max", "mean", "histogram", "quantile", "mean+smooth-conv", "min-max+smooth-conv", "mean+full-bias",
           "mean+zero-biases", "mean+crops-256", "mean+channel-alignment", "mean+last-conv-float", "mean+hr-convs-float")


def with_zero_biases(model):
    """A copy of the model whose convolutions without a bias get a zero one: NNCF's bias correction can then shift
    every convolution's output back to its float mean (it corrects only convolutions that have a bias)."""
    import copy

    import torch

    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d) and module.bias is None:
            module.bias = torch.nn.Parameter(torch.full((module.out_channels,), 1e-6))  # exact zeros are folded away
    return model


def last_convs(model) -> list[str]:
    """The convolutions that write the output with no convolution between (conv_last)."""
    found, todo, seen = [], [r.input_value(0).get_node() for r in model.get_results()], set()
    while todo:
        op = todo.pop()
        if op.get_friendly_name() in seen:
            continue
        seen.add(op.get_friendly_name())
        if op.get_type_name() == "Convolution":
            found.append(op.get_friendly_name())
        else:
            todo += [v.get_node() for v in op.input_values()]
    return found


def options(recipe: str, fp32) -> dict:
    """nncf.quantize's keyword arguments for a recipe: the package's (quantize.recipe, min-max ranges) changed by each
    part (parts joined by +, e.g. mean+smooth-conv-0.5)."""
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters
    from nncf.quantization.range_estimator import RangeEstimatorParameters, RangeEstimatorParametersSet

    nncf = quantize.require_nncf()
    parts = set(recipe.split("+"))
    out = quantize.recipe(fp32)
    names = quantize.image_convs(fp32)
    if "last-conv-float" in parts:
        names += last_convs(fp32)
    if "hr-convs-float" in parts:
        names += quantize.hr_convs(fp32)
    out["ignored_scope"] = nncf.IgnoredScope(types=quantize.FLOAT_OPS, names=names, validate=False)
    if "full-bias" in parts:
        out["fast_bias_correction"] = False
    advanced = vars(out["advanced_parameters"]).copy()
    ranges = {"min-max": RangeEstimatorParametersSet.MINMAX, "mean": RangeEstimatorParameters(),
              "quantile": RangeEstimatorParametersSet.MEAN_QUANTILE, "histogram": RangeEstimatorParametersSet.HISTOGRAM}
    for name in parts & set(ranges):
        advanced["activations_range_estimator_params"] = ranges[name]
    if "channel-alignment" in parts:
        advanced["disable_channel_alignment"] = False
    alphas = [float(p.split("-")[-1]) if p[-1].isdigit() else 0.5 for p in parts if p.startswith("smooth-conv")]
    if alphas:  # SmoothQuant (smooth-conv or smooth-conv-ALPHA) runs only for ModelType.TRANSFORMER
        advanced["smooth_quant_alphas"] = AdvancedSmoothQuantParameters(convolution=alphas[0], matmul=-1)
        out["model_type"] = nncf.ModelType.TRANSFORMER
    out["advanced_parameters"] = AdvancedQuantizationParameters(**advanced)
    return out


def read_fp32(model, core):
    """The model exported to ONNX and read into OpenVINO with its biases folded, as quantize does."""
    from openvino._offline_transformations import apply_moc_transformations

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = core.read_model(str(export_onnx(model, Path(tmp) / "model.onnx")))
    apply_moc_transformations(fp32, cf=True)
    return fp32


def benchmark_psnr(compiled, data: Path, scale: int) -> list[float]:
    """PSNR on Y of every image of a benchmark folder, as `a2n evaluate` scores it."""
    values = []
    for _, hr, lr in benchmark_pairs(data, scale):
        x = np.ascontiguousarray(lr.transpose(2, 0, 1)[None], np.float32) / 255
        values.append(metrics.psnr(from_planes(compiled(x)[0], np.uint8), hr, shave=scale))
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--weights", default=None, help="default: the shipped file")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "benchmark"))
    args = parser.parse_args()
    nncf = quantize.require_nncf()

    model = build_model(args.scale, weights=args.weights)
    core = openvino_core()
    fp32, biased = (read_fp32(m, core) for m in (model, with_zero_biases(model)))
    train = [ROOT.parent / "shared" / "data" / "train" / d / "HR" for d in ("T91", "BSD200")]
    calibration, held_out = quantize.calibration_sets(train, args.scale)
    sets = {name: Path(args.data) / name for name in ("Set5", "Set14")}
    reference = core.compile_model(fp32, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    base = {name: np.mean(benchmark_psnr(reference, path, args.scale)) for name, path in sets.items()}
    base_held = quantize.validation_psnr(reference, held_out)[0]
    print(f"x{args.scale} fp32: " + ", ".join(f"{k} {v:.3f}" for k, v in base.items()) + f", held-out {base_held:.3f}", flush=True)
    rows = []
    for recipe in args.recipes.split(","):
        crops = quantize.calibration_sets(train, args.scale, 256)[0] if "crops-256" in recipe.split("+") else calibration
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            source = biased if "zero-biases" in recipe.split("+") else fp32
            int8 = nncf.quantize(source.clone(), nncf.Dataset(crops, lambda item: item[0]), subset_size=len(crops),
                                 **options(recipe, source))
        seconds = time.perf_counter() - start
        compiled = core.compile_model(int8, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        drops = {k: base[k] - np.mean(benchmark_psnr(compiled, p, args.scale)) for k, p in sets.items()}
        held = base_held - quantize.validation_psnr(compiled, held_out)[0]
        rows.append(f"| x{args.scale} | {recipe} | {held:.3f} | {drops['Set5']:.3f} | {drops['Set14']:.3f} | {seconds:.0f} |")
        print(rows[-1], flush=True)
    print("\n| scale | recipe | held-out drop (dB) | Set5 drop | Set14 drop | quantize s |\n|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
