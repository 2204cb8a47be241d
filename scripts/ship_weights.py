"""Copy a run's best weights into the package when they beat the shipped ones on validation PSNR.

    python scripts/ship_weights.py runs/a2n_x2_b/best.safetensors --recipe "..." [--compute "..."]
    python scripts/ship_weights.py --int8-only --scale 2    # remake the INT8 files of the shipped x2 weights
    python scripts/ship_weights.py --int8-stages-only --scale 2    # remake only their INT8 tiled stages

The candidate and the shipped file are both scored on Set5 with `a2n evaluate`'s code, so the
comparison does not rely on numbers written at different times. Shipped weights get their INT8
file (pretrained/a2n_x<S>_<key>_int8.xml/.bin, a2n.backends.quantize), calibrated on the training
photos within auto's 0.02 dB on held-out crops (so that auto may take it), with its Set5/Set14 cost against
fp32 written into it, and INT8 stages for the tiled path beside it (pretrained/a2n_x<S>_<key>_int8_stages/,
their cost in tiles written into their stages.json); the files of the weights they replace are removed.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from safetensors import safe_open

from a2n.backends import quantize
from a2n.backends.auto import MAX_COST_DB
from a2n.evaluation import evaluate_folder
from a2n.weights import build_model, save_weights, shipped_weights_path

PRETRAINED = Path(__file__).resolve().parents[1] / "src" / "a2n" / "pretrained"
TRAINING_PHOTOS = [Path("../shared/data/train/T91/HR"), Path("../shared/data/train/BSD200/HR")]
BENCHMARK, BENCHMARK_SETS = Path("../shared/data/benchmark"), ("Set5", "Set14")  # the INT8 file's recorded cost
STAGES_TILE = 48  # LR tile side the INT8 stages' cost is measured with: every Set5/Set14 image in several tiles


def set5_psnr(path: Path, scale: int, variant: str, data: Path) -> float:
    return evaluate_folder(data, scale, build_model(scale, variant, path))[-1].psnr


def ship_int8(scale: int, variant: str, max_drop: float = MAX_COST_DB, stages_only: bool = False) -> None:
    """Quantize the shipped weights of scale to INT8 next to them (the file and the tiled stages; stages_only: the
    stages alone), replacing those of earlier weights, and record in each what it loses on Set5 and Set14 against
    fp32: auto prices them at that too (a2n.backends.quantize.price and stages_price)."""
    model = build_model(scale, variant, shipped_weights_path(scale, variant))
    for old in PRETRAINED.glob(f"{variant}_x{scale}_*_int8_stages"):
        shutil.rmtree(old)
    if stages_only:
        calibration, validation = quantize.calibration_sets(TRAINING_PHOTOS, scale)
        quantize.quantize_stages(model, calibration, validation, PRETRAINED / quantize.int8_stages_name(model),
                                 *quantize.recorded_recipe(quantize.require_int8(model)))
        shutil.rmtree(quantize.cache_dir() / quantize.int8_stages_name(model), ignore_errors=True)  # an older copy would be found first
    else:
        for old in PRETRAINED.glob(f"{variant}_x{scale}_*_int8.*"):
            old.unlink()
        path, drop = quantize.quantize(model, TRAINING_PHOTOS, PRETRAINED / quantize.int8_name(model), max_drop)
    costs, tiled = {}, {}
    for name in BENCHMARK_SETS:
        fp32 = evaluate_folder(BENCHMARK / name, scale, model)[-1].psnr
        if not stages_only:
            costs[name] = round(fp32 - evaluate_folder(BENCHMARK / name, scale, model, backend="openvino", precision="int8")[-1].psnr, 4)
        if quantize.int8_stages(model) is not None:
            tiled[name] = round(fp32 - evaluate_folder(BENCHMARK / name, scale, model, backend="openvino", precision="int8",
                                                       tile=STAGES_TILE)[-1].psnr, 4)
    if costs:
        quantize.record_benchmark_drop(path, max(costs.values()), ", ".join(f"{k} {v:+.4f}" for k, v in costs.items()))
        print(json.dumps({"int8": str(path), "scale": scale, "held_out_drop_db": round(drop, 4), "cost_db": costs}))
    if tiled:
        folder = PRETRAINED / quantize.int8_stages_name(model)  # the shipped folder (int8_stages finds the cache's copy first)
        quantize.record_stages_benchmark_drop(folder, max(tiled.values()),
                                              ", ".join(f"{k} {v:+.4f} (tiles of {STAGES_TILE})" for k, v in tiled.items()))
        print(json.dumps({"int8_stages": str(folder), "scale": scale, "tiled_cost_db": tiled,
                          "held_out_drop_db": quantize.read_table(folder / "stages.json")["held_out_drop_db"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("candidate", type=Path, nargs="?")
    ap.add_argument("--recipe", help="how the weights were trained, stored in the metadata")
    ap.add_argument("--compute", default="", help="the compute used, stored in the metadata")
    ap.add_argument("--data", type=Path, default=Path("../shared/data/benchmark/Set5"))
    ap.add_argument("--int8-only", action="store_true", help="only remake the INT8 file of the shipped weights of --scale")
    ap.add_argument("--int8-stages-only", action="store_true", help="only remake the INT8 stages (tiled path) of --scale")
    ap.add_argument("--scale", type=int, choices=(2, 3, 4))
    ap.add_argument("--max-drop", type=float, default=MAX_COST_DB,
                    help="INT8: held-out loss above which the upsampling part goes back to float, then NNCF's accuracy "
                         "control runs (tens of minutes at x2); default auto's rule, so that auto may take the file")
    args = ap.parse_args()
    if args.int8_only or args.int8_stages_only:
        if args.scale is None:
            ap.error("--int8-only and --int8-stages-only need --scale")
        ship_int8(args.scale, "a2n", args.max_drop, stages_only=args.int8_stages_only)
        return
    if args.candidate is None or args.recipe is None:
        ap.error("give the candidate weights and --recipe")

    with safe_open(str(args.candidate), framework="pt") as f:
        meta = dict(f.metadata())
    scale, variant = int(meta["scale"]), meta["variant"]
    new = set5_psnr(args.candidate, scale, variant, args.data)
    current = shipped_weights_path(scale, variant)
    old = set5_psnr(current, scale, variant, args.data) if current else float("-inf")
    print(json.dumps({"candidate": str(args.candidate), "scale": scale, "set5_psnr": round(new, 4), "shipped_set5_psnr": round(old, 4)}))
    if new <= old:
        print("not shipped: the shipped weights are at least as good on Set5")
        return
    model = build_model(scale, variant, args.candidate)
    save_weights(model, PRETRAINED / f"{variant}_x{scale}.safetensors", trained=args.recipe, compute=args.compute,
                 set5_psnr=round(new, 4), step=meta.get("step", ""))
    print(f"shipped: {PRETRAINED / f'{variant}_x{scale}.safetensors'}")
    ship_int8(scale, variant, args.max_drop)


if __name__ == "__main__":
    main()
