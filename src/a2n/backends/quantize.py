"""INT8: the model quantized with NNCF for OpenVINO, calibrated on images like the training data.

NNCF's default post-training quantization costs 1.7 dB on Set5 at x2 (bench/RESULTS.md, INT8):
it rounds to its own 8-bit grids the three places where the image itself flows, the input of the
first convolution, the residual additions and `out + bilinear(lr)`, and those grids are not the
image's. Here the first convolution, Add and Interpolate stay in float (little of the compute), and
so do the attention dropout modules' two small fully connected layers (MatMul): OpenVINO runs those
in INT8 only on CPUs with VNNI, where they cost 0.31 dB on Set5 at x4 (0.02 in float; without VNNI
OpenVINO keeps them in float anyway, which is why a file made on an AVX2 CPU looked fine there).
The other convolutions run in INT8 with asymmetric activations (NNCF's mixed preset). Each activation's range is
taken two ways, NNCF's default (the mean over crops of each crop's min and max) and the full min..max over all
crops, and the file keeps the one that loses less on the held-out crops: neither wins at every scale (bench/int8_recipes.py:
min..max cut Set5's cost from 0.035 to 0.011 dB at x4 and the held-out loss from 0.084 to 0.028 at x2, where the mean
clips the peaks that edges make, but raised Set5's from 0.012 to 0.022 at x3), and the held-out crops ranked the
two as Set5 and Set14 did at all three scales. Where that recipe loses more than max_drop on
a held-out part of the calibration photos, the upsampling part's convolutions (those after the
nearest-neighbour upsampling, at the output's resolution; a few per cent of the compute at x2) go
back to float too: they write the image, with no later layer to average their rounding out (at x2
that took Set5's cost from 0.025 to 0.014 dB, bench/int8_recipes.py). Where it still loses more,
NNCF's accuracy control turns the layers that cost most back to float until it does not.

The tiled path's stages (head, each block, tail) are quantized the same way, apart, each calibrated
on what it receives when the fp32 stages run the calibration crops (quantize_stages), so that an
image too big for one forward keeps INT8's speed in tiles at about the whole INT8 image's cost.

The package ships an INT8 file and INT8 stages per shipped weights (pretrained/a2n_x<S>_<key>_int8.xml
and .bin, and a2n_x<S>_<key>_int8_stages/, made by scripts/ship_weights.py); `a2n export --format openvino --precision int8 --calibration DIR`
makes one for other weights and files it in the cache folder too, where `--precision int8` finds it.
"""

from __future__ import annotations

import logging
import os
import random
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from a2n.backends.cache import cache_dir, file_key, read_table, weights_key, write_table
from a2n.backends.export import export_stages, stages_ready
from a2n.backends.runtimes import BackendError, openvino_core, require
from a2n.backends.stages import ExportedStages, stage_names

if TYPE_CHECKING:
    from a2n.model import A2N

PRETRAINED = Path(__file__).resolve().parent.parent / "pretrained"
MAX_DROP_DB = 0.05  # the most the held-out crops may lose before accuracy control steps in (auto's own rule is 0.02)
FLOAT_OPS = ["Add", "Interpolate", "MatMul"]  # kept in float with the first convolution (see above)
CALIBRATION_CROPS, VALIDATION_CROPS = 64, 32
CALIBRATION_SIDE, VALIDATION_SIDE = 48, 64  # LR crop sides
RANGES = ("min-max", "mean")  # activation ranges tried (recipe): over all calibration crops, or NNCF's mean per crop


def int8_name(model: A2N) -> str:
    """The file name of the model's INT8 IR, keyed by its weights (a file for other weights never matches)."""
    return f"a2n_x{model.scale}_{weights_key(model)}_int8.xml"


def int8_file(model: A2N) -> Path | None:
    """The model's INT8 IR: made by `a2n export ... --precision int8` (cache folder) or shipped; None if neither."""
    for folder in (cache_dir(), PRETRAINED):
        path = folder / int8_name(model)
        if path.is_file() and path.with_suffix(".bin").is_file():
            return path
    return None


def int8_file_keys(model: A2N) -> dict[str, str | None]:
    """Each place the model's INT8 file may be (int8_file) with a hash of the file there (None: none): the express
    path's record of a choice is made again when this changes."""
    return {str(folder / int8_name(model)): file_key(folder / int8_name(model)) for folder in (cache_dir(), PRETRAINED)}


def int8_stages_name(model: A2N) -> str:
    """The folder name of the model's INT8 tiled stages, keyed by its weights like its INT8 file."""
    return f"a2n_x{model.scale}_{weights_key(model)}_int8_stages"


def int8_stages(model: A2N) -> Path | None:
    """The folder of the model's INT8 stages for the tiled path (made with its INT8 file); None if there is none."""
    for folder in (cache_dir(), PRETRAINED):
        path = folder / int8_stages_name(model)
        if stages_ready(path):
            return path
    return None


def stages_price(folder: Path) -> float:
    """The most INT8 stages are recorded to lose through the tiled path: on their held-out crops, or on the benchmark
    sets where measured (stages.json)."""
    meta = read_table(folder / "stages.json")
    return max(float(meta.get("held_out_drop_db", 0.0)), float(meta.get("benchmark_drop_db", 0.0)))


def require_int8(model: A2N) -> Path:
    """int8_file, or an error that says how to make one."""
    path = int8_file(model)
    if path is None:
        raise BackendError(f"no INT8 model for these x{model.scale} weights; make one with `a2n export --format openvino "
                           f"--precision int8 --calibration DIR --scale {model.scale} --weights ... -o PATH` "
                           "(DIR: training-like photos), or use --precision fp32")
    return path


def recorded_drops(path: Path, *keys: str) -> list[float]:
    """Losses in dB written into an INT8 file, read once: held_out_drop_db (its held-out calibration crops, when
    made by quantize) or benchmark_drop_db (Set5 and Set14, when shipped: record_benchmark_drop); 0 if unrecorded."""
    info = openvino_core().read_model(str(path)).get_rt_info()
    drops = []
    for key in keys:
        try:
            drops.append(float(info["a2n"][key].astype(str)))
        except (KeyError, RuntimeError, ValueError):
            drops.append(0.0)
    return drops


def recorded_drop(path: Path, key: str) -> float:
    """One loss written into an INT8 file (recorded_drops)."""
    return recorded_drops(path, key)[0]


def recorded_recipe(path: Path) -> tuple[str, bool]:
    """How an INT8 file was quantized: which of RANGES it was calibrated with ("mean", NNCF's default, for files made
    before the choice) and whether its upsampling part stayed in float (False for files made before that step)."""
    info = openvino_core().read_model(str(path)).get_rt_info()
    found = []
    for key, default in (("activation_ranges", "mean"), ("hr_float", "false")):
        try:
            found.append(str(info["a2n"][key].astype(str)))
        except (KeyError, RuntimeError):
            found.append(default)
    return found[0], found[1] == "true"


def held_out_drop(path: Path) -> float:
    """What an INT8 file lost on its held-out calibration crops when it was made (quantize), in dB; 0 if unrecorded."""
    return recorded_drop(path, "held_out_drop_db")


def price(path: Path) -> float:
    """The most an INT8 file is recorded to lose: on its held-out crops, or on the benchmark sets where measured."""
    return max(recorded_drops(path, "held_out_drop_db", "benchmark_drop_db"))


def record_benchmark_drop(path: Path, drop: float, sets: str) -> None:
    """Write into an INT8 file (in place, xml and bin) what it loses against fp32 on benchmark sets, so that auto
    prices it at that too: 32 held-out crops can miss a loss that Set5 shows. The copy quantize filed in the
    cache folder, which int8_file finds first, is replaced by the updated file."""
    import shutil
    import tempfile

    ov = require("openvino")
    model = openvino_core().read_model(str(path))
    model.set_rt_info(f"{drop:.4f}", ["a2n", "benchmark_drop_db"])
    model.set_rt_info(sets, ["a2n", "benchmark_sets"])
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        ov.save_model(model, str(Path(tmp) / path.name), compress_to_fp16=False)
        del model
        for suffix in (".bin", ".xml"):
            shutil.move(str((Path(tmp) / path.name).with_suffix(suffix)), str(path.with_suffix(suffix)))
    cached = cache_dir() / path.name
    if cached.is_file() and cached.resolve() != path.resolve():
        for suffix in (".xml", ".bin"):
            shutil.copy(path.with_suffix(suffix), cached.with_suffix(suffix))


def record_stages_benchmark_drop(folder: Path, drop: float, sets: str) -> None:
    """Write into INT8 stages (stages.json) what the tiled path loses with them against fp32 on benchmark sets, so that
    auto prices them at that too (stages_price); the copy in the cache folder, found first, gets it as well."""
    for where in {folder, cache_dir() / folder.name}:
        meta = read_table(where / "stages.json")
        if meta.get("weights_key") == read_table(folder / "stages.json").get("weights_key"):
            write_table(where / "stages.json", {**meta, "benchmark_drop_db": round(drop, 4), "benchmark_sets": sets})


def crops(files: list[Path], scale: int, side: int, count: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """count random (LR 1x3xHxW float32 in 0..1, HR HxWx3 uint8) crops of the photos, the LR side x side made by
    MATLAB bicubic from the HR crop, as the training data is; the photos are taken in turn, one crop each."""
    from a2n import io
    from a2n.resize import imresize

    rng = random.Random(seed)
    size = side * scale
    out: list[tuple[np.ndarray, np.ndarray]] = []
    while len(out) < count:
        for path in rng.sample(files, len(files)):
            hr = io.read_rgb8(path)
            y, x = rng.randrange(hr.shape[0] - size + 1), rng.randrange(hr.shape[1] - size + 1)
            hr = np.ascontiguousarray(hr[y:y + size, x:x + size])
            lr = imresize(hr, 1.0 / scale).transpose(2, 0, 1)[None].astype(np.float32) / 255
            out.append((np.ascontiguousarray(lr), hr))
            if len(out) == count:
                break
    return out


def calibration_sets(folders: Sequence[str | os.PathLike], scale: int, count: int | None = None) -> tuple[list, list]:
    """count (default CALIBRATION_CROPS) calibration crops and the held-out validation crops from folders of photos; the
    two never share a photo."""
    from PIL import Image

    from a2n import io

    side = max(CALIBRATION_SIDE, VALIDATION_SIDE) * scale
    usable = []
    for path in (p for folder in folders for p in io.list_images(folder)):
        with Image.open(path) as img:
            if min(img.size) >= side:
                usable.append(path)
    if len(usable) < 4:
        raise BackendError(f"{', '.join(map(str, folders))}: INT8 calibration needs at least 4 photos of {side}x{side} pixels or more "
                           f"(found {len(usable)}); use photos like the training data")
    random.Random(0).shuffle(usable)
    cut = max(2, len(usable) // 4)
    return (crops(usable[cut:], scale, CALIBRATION_SIDE, count or CALIBRATION_CROPS, seed=1),
            crops(usable[:cut], scale, VALIDATION_SIDE, VALIDATION_CROPS, seed=2))


def validation_psnr(compiled, items: list) -> tuple[float, list[float]]:
    """Mean and per-crop PSNR on Y (8-bit output, shave = scale) of a compiled model on (LR, HR) crops, as `a2n evaluate`."""
    from a2n import metrics
    from a2n.pixels import from_planes

    values = []
    for lr, hr in items:
        scale = hr.shape[0] // lr.shape[2]
        values.append(metrics.psnr(from_planes(compiled(lr)[0], np.uint8), hr, shave=scale))
    return float(np.mean(values)), values


def float_ops(model, hr_float: bool = False) -> Any:
    """NNCF's ignored scope of the recipe (module docstring): FLOAT_OPS, the convolutions that read the image, and
    with hr_float the upsampling part's (hr_convs). In the tiled stages MatMul is also each block's last 1x1
    convolution, run over the pixels (a2n.model): it stays in float there too, which measured no slower on AVX2 (its
    INT8 GEMM ran slower than the float one)."""
    names = image_convs(model) + (hr_convs(model) if hr_float else [])
    return require_nncf().IgnoredScope(types=FLOAT_OPS, names=names, validate=False)


def recipe(model, ranges: str = "min-max", hr_float: bool = False) -> dict[str, Any]:
    """nncf.quantize's options for an OpenVINO model (module docstring): the mixed preset, float_ops(model, hr_float)
    in float, and activation ranges from one of RANGES."""
    nncf = require_nncf()
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParameters, RangeEstimatorParametersSet

    estimator = {"min-max": RangeEstimatorParametersSet.MINMAX, "mean": RangeEstimatorParameters()}[ranges]
    return {"preset": nncf.QuantizationPreset.MIXED, "ignored_scope": float_ops(model, hr_float),
            "advanced_parameters": AdvancedQuantizationParameters(activations_range_estimator_params=estimator)}


def image_convs(model) -> list[str]:
    """The names of an OpenVINO model's convolutions that read the image (input "lr") with no convolution between:
    the first convolution of the whole model, of the head stage and of the tail stage (which recomputes it)."""
    return convs_downstream([p.output(0) for p in model.get_parameters() if "lr" in p.output(0).get_names()])


def hr_convs(model) -> list[str]:
    """The names of an OpenVINO model's convolutions downstream of an Interpolate: the upsampling part, at the
    output's resolution (the other Interpolate, the bilinear skip, reaches none)."""
    return convs_downstream([op.output(0) for op in model.get_ops() if op.get_type_name() == "Interpolate"], through_convs=True)


def convs_downstream(outputs: list, through_convs: bool = False) -> list[str]:
    """The names of the convolutions that these OpenVINO outputs reach: the first ones on each path, or
    (through_convs) every one."""
    seen, found, todo = set(), [], list(outputs)
    while todo:
        for target in todo.pop().get_target_inputs():
            op = target.get_node()
            if op.get_friendly_name() in seen:
                continue
            seen.add(op.get_friendly_name())
            if op.get_type_name() == "Convolution":
                found.append(op.get_friendly_name())
            if op.get_type_name() != "Convolution" or through_convs:
                todo += list(op.outputs())
    return found


def require_nncf() -> Any:
    """Import NNCF with its INFO lines off (they list every node it leaves in float), or say which extra installs it."""
    try:
        import nncf
    except ImportError as exc:
        raise BackendError("INT8 export needs NNCF: pip install 'a2n[int8]'") from exc
    nncf.set_log_level(logging.ERROR)
    return nncf


def tiled_psnr(stages: ExportedStages, items: list, tile: int) -> float:
    """Mean PSNR on Y (8-bit output, shave = scale) of the tiled path with these stages on (LR, HR) crops."""
    from a2n import metrics, tiling

    values = []
    for lr, hr in items:
        out = np.empty_like(hr)
        tiling.run_tiled(stages, lr, out, tile)
        values.append(metrics.psnr(out, hr, shave=stages.scale))
    return float(np.mean(values))


class Recorded:
    """A stage that keeps a copy of the inputs of every call: NNCF's calibration data for that stage."""

    def __init__(self, run: Callable[..., list[np.ndarray]]) -> None:
        self.run, self.calls = run, []

    def __call__(self, *xs: np.ndarray, into: tuple[np.ndarray, ...] = ()) -> list[np.ndarray]:
        self.calls.append(tuple(np.array(x) for x in xs))
        return self.run(*xs, into=into)


def quantize_stages(model: A2N, calibration_crops: list, validation_crops: list, folder: Path, ranges: str = "min-max",
                    hr_float: bool = False) -> float:
    """Write the tiled path's stages quantized to INT8 (OpenVINO IR) into folder, and return what the tiled path loses
    with them on the held-out crops (dB against its fp32 stages, tiles of half a crop; also in stages.json).

    Each stage is calibrated on what it receives when the fp32 stages run the calibration crops, and keeps in float
    what the whole model's file does (module docstring: hr_float too) with the activation ranges it took (RANGES), so
    that tiles cost about what a whole INT8 image does.
    """
    import shutil
    import tempfile
    import warnings

    import torch

    from a2n import tiling

    ov, nncf = require("openvino"), require_nncf()
    from openvino._offline_transformations import apply_moc_transformations

    core, threads = openvino_core(), torch.get_num_threads()
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        fp32_dir = export_stages(model, tmp / "fp32")
        recording = ExportedStages(fp32_dir, "openvino", threads)
        recording.runs = {name: Recorded(run) for name, run in recording.runs.items()}
        for lr, hr in calibration_crops:
            tiling.run_tiled(recording, lr, np.empty_like(hr), max(lr.shape[2:]))
        int8_dir = tmp / "int8"
        int8_dir.mkdir()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in stage_names(recording.blocks):
                stage = core.read_model(str(fp32_dir / f"{name}.onnx"))
                apply_moc_transformations(stage, cf=True)  # as in quantize
                calls = recording.runs[name].calls
                int8 = nncf.quantize(stage, nncf.Dataset(calls), subset_size=len(calls), **recipe(stage, ranges, hr_float))
                ov.save_model(int8, str(int8_dir / f"{name}.xml"), compress_to_fp16=False)
        meta = {**read_table(fp32_dir / "stages.json"), "suffix": ".xml", "precision": "int8", "weights_key": weights_key(model),
                "activation_ranges": ranges, "hr_float": hr_float}
        write_table(int8_dir / "stages.json", meta)
        tile = max(validation_crops[0][0].shape[2:]) // 2
        drop = (tiled_psnr(ExportedStages(fp32_dir, "openvino", threads), validation_crops, tile)
                - tiled_psnr(ExportedStages(int8_dir, "openvino", threads, "int8"), validation_crops, tile))
        write_table(int8_dir / "stages.json", {**meta, "held_out_drop_db": round(drop, 4)})
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(int8_dir, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return drop


def quantize(model: A2N, calibration: Sequence[str | os.PathLike], path: str | os.PathLike, max_drop: float = MAX_DROP_DB,
             stages: bool = True) -> tuple[Path, float]:
    """Write the model quantized to INT8 as OpenVINO IR (path.xml, path.bin), calibrated on folders of photos with
    the activation ranges (RANGES) that lose less on held-out crops of them, with at most max_drop dB lost there, and
    its tiled stages beside it (path_stages/, quantize_stages; kept if they lose no more; stages=False: the file
    alone); both also filed in the cache folder for --precision int8.
    Returns the file and what it loses on the held-out crops (dB, fp32 minus INT8)."""
    import shutil
    import tempfile
    import warnings

    ov, nncf = require("openvino"), require_nncf()
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters
    from openvino._offline_transformations import apply_moc_transformations

    from a2n.backends.export import export_onnx

    calibration_crops, validation_crops = calibration_sets(calibration, model.scale)
    path = Path(path).with_suffix(".xml")
    core = openvino_core()
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = core.read_model(str(export_onnx(model, Path(tmp) / "model.onnx")))
    apply_moc_transformations(fp32, cf=True)  # folds the biases' ShapeOf/Broadcast, or NNCF's bias correction finds none
    calibration_data = nncf.Dataset(calibration_crops, lambda item: item[0])
    fp32_psnr = validation_psnr(core.compile_model(fp32, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}), validation_crops)[0]

    def drop_of(int8) -> float:
        return fp32_psnr - validation_psnr(core.compile_model(int8, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}), validation_crops)[0]

    print(f"a2n: quantizing x{model.scale} to INT8 on {len(calibration_crops)} crops, checked on {len(validation_crops)} "
          "held-out crops", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tried = {}
        for ranges in RANGES:
            int8 = nncf.quantize(fp32.clone(), calibration_data, subset_size=len(calibration_crops), **recipe(fp32, ranges))
            tried[ranges] = (drop_of(int8), int8)
        ranges = min(tried, key=lambda r: tried[r][0])
        drop, int8 = tried[ranges]
        print("a2n: activation ranges " + ", ".join(f"{r} lose {d:.3f} dB" for r, (d, _) in tried.items()) + f": keeping {ranges}",
              file=sys.stderr)
        hr_float = False
        if drop > max_drop:  # the upsampling part back in float (module docstring)
            hr_int8 = nncf.quantize(fp32.clone(), calibration_data, subset_size=len(calibration_crops), **recipe(fp32, ranges, True))
            hr_drop = drop_of(hr_int8)
            print(f"a2n: INT8 loses {drop:.3f} dB on the held-out crops, more than {max_drop:g}; with the upsampling part in "
                  f"float {hr_drop:.3f} dB" + (": keeping that" if hr_drop < drop else ""), file=sys.stderr)
            if hr_drop < drop:
                hr_float, drop, int8 = True, hr_drop, hr_int8
        if drop > max_drop:  # NNCF's accuracy control: the convolutions that cost most go back to float, one by one
            print(f"a2n: INT8 loses {drop:.3f} dB on the held-out crops, more than {max_drop:g}: finding the layers to keep "
                  "in float (minutes to tens of minutes)", file=sys.stderr)
            options = recipe(fp32, ranges, hr_float)
            int8 = nncf.quantize_with_accuracy_control(
                fp32.clone(), calibration_data, nncf.Dataset(validation_crops, lambda item: item[0]), validation_psnr,
                max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE, subset_size=len(calibration_crops), preset=options["preset"],
                ignored_scope=options["ignored_scope"], advanced_quantization_parameters=options["advanced_parameters"],
                advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(max_num_iterations=sys.maxsize))
            drop = drop_of(int8)
    int8.set_rt_info(weights_key(model), ["a2n", "weights_key"])
    int8.set_rt_info(f"{drop:.4f}", ["a2n", "held_out_drop_db"])
    int8.set_rt_info(ranges, ["a2n", "activation_ranges"])
    int8.set_rt_info(str(hr_float).lower(), ["a2n", "hr_float"])
    path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(int8, str(path), compress_to_fp16=False)
    cached = cache_dir() / int8_name(model)
    if cached.resolve() != path.resolve():
        cached.parent.mkdir(parents=True, exist_ok=True)
        for suffix in (".xml", ".bin"):
            shutil.copy(path.with_suffix(suffix), cached.with_suffix(suffix))
    if not stages:
        return path, drop
    folder = path.with_name(f"{path.stem}_stages")
    print(f"a2n: quantizing the tiled path's {len(model.blocks) + 2} stages the same way (for images too big for one "
          "forward)", file=sys.stderr)
    stages_drop = quantize_stages(model, calibration_crops, validation_crops, folder, ranges, hr_float)
    if stages_drop > max(max_drop, drop):
        shutil.rmtree(folder)
        print(f"a2n: the INT8 stages lose {stages_drop:.3f} dB on the held-out crops: not kept, the tiles of big images "
              "will run in float", file=sys.stderr)
    else:
        cached = cache_dir() / int8_stages_name(model)
        if cached.resolve() != folder.resolve():
            shutil.rmtree(cached, ignore_errors=True)
            shutil.copytree(folder, cached)
    return path, drop
