"""Copy a run's best weights into the package when they beat the shipped ones on validation PSNR.

    python scripts/ship_weights.py runs/a2n_x2_b/best.safetensors --recipe "..." [--compute "..."]

The candidate and the shipped file are both scored on Set5 with `a2n evaluate`'s code, so the
comparison does not rely on numbers written at different times.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors import safe_open

from a2n.evaluation import evaluate_folder
from a2n.weights import build_model, save_weights, shipped_weights_path

PRETRAINED = Path(__file__).resolve().parents[1] / "src" / "a2n" / "pretrained"


def set5_psnr(path: Path, scale: int, variant: str, data: Path) -> float:
    return evaluate_folder(data, scale, build_model(scale, variant, path))[-1].psnr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("candidate", type=Path)
    ap.add_argument("--recipe", required=True, help="how the weights were trained, stored in the metadata")
    ap.add_argument("--compute", default="", help="the compute used, stored in the metadata")
    ap.add_argument("--data", type=Path, default=Path("../shared/data/benchmark/Set5"))
    args = ap.parse_args()

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


if __name__ == "__main__":
    main()
