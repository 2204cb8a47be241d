"""Copy a run's best weights into the package when they beat the shipped ones on validation PSNR.

    python scripts/ship_weights.py runs/a2n_x2_b/best.safetensors --recipe "..." [--compute "..."]
    python scripts/ship_weights.py --int8-only --scale 2    # remake the INT8 file of the shipped x2 weights

The candidate and the shipped file are both scored on Set5 with `a2n evaluate`'s code, so the
comparison does not rely on numbers written at different times. Shipped weights get their INT8
file (pretrained/a2n_x<S>_<key>_int8.xml/.bin, a2n.backends.quantize), calibrated on the training
photos, with its Set5/Set14 cost against fp32 written into it; the file of the weights they replace is removed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors import safe_open

from a2n.backends import quantize
from a2n.evaluation import evaluate_folder
from a2n.weights import build_model, save_weights, shipped_weights_path

PRETRAINED = Path(__file__).resolve().parents[1] / "src" / "a2n" / "pretrained"
TRAINING_PHOTOS = [Path("../shared/data/train/T91/HR"), Path("../shared/data/train/BSD200/HR")]
BENCHMARK, BENCHMARK_SETS = Path("../shared/data/benchmark"), ("Set5", "Set14")  # the INT8 file's recorded cost


def set5_psnr(path: Path, scale: int, variant: str, data: Path) -> float:
    return evaluate_folder(data, scale, build_model(scale, variant, path))[-1].psnr


def ship_int8(scale: int, variant: str, max_drop: float = quantize.MAX_DROP_DB) -> None:
    """Quantize the shipped weights of scale to INT8 next to them, replacing the file of earlier weights, and record
    in it what it loses on Set5 and Set14 against fp32: auto prices the file at that too (a2n.backends.quantize.price)."""
    model = build_model(scale, variant, shipped_weights_path(scale, variant))
    for old in PRETRAINED.glob(f"{variant}_x{scale}_*_int8.*"):
        old.unlink()
    path, drop = quantize.quantize(model, TRAINING_PHOTOS, PRETRAINED / quantize.int8_name(model), max_drop)
    costs = {}
    for name in BENCHMARK_SETS:
        fp32 = evaluate_folder(BENCHMARK / name, scale, model)[-1].psnr
        int8 = evaluate_folder(BENCHMARK / name, scale, model, backend="openvino", precision="int8")[-1].psnr
        costs[name] = round(fp32 - int8, 4)
    quantize.record_benchmark_drop(path, max(costs.values()), ", ".join(f"{k} {v:+.4f}" for k, v in costs.items()))
    print(json.dumps({"int8": str(path), "scale": scale, "held_out_drop_db": round(drop, 4), "cost_db": costs}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("candidate", type=Path, nargs="?")
    ap.add_argument("--recipe", help="how the weights were trained, stored in the metadata")
    ap.add_argument("--compute", default="", help="the compute used, stored in the metadata")
    ap.add_argument("--data", type=Path, default=Path("../shared/data/benchmark/Set5"))
    ap.add_argument("--int8-only", action="store_true", help="only remake the INT8 file of the shipped weights of --scale")
    ap.add_argument("--scale", type=int, choices=(2, 3, 4))
    ap.add_argument("--max-drop", type=float, default=quantize.MAX_DROP_DB,
                    help="INT8: held-out loss above which NNCF's accuracy control runs (tens of minutes at x2)")
    args = ap.parse_args()
    if args.int8_only:
        if args.scale is None:
            ap.error("--int8-only needs --scale")
        ship_int8(args.scale, "a2n", args.max_drop)
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
