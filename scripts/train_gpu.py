"""Train the joint x2/x3/x4 A2N on a GPU for a number of minutes, then score its best files on Set5.

    pip install --no-deps -e .        # once, on the GPU machine (it has CUDA torch and no network)
    python scripts/train_gpu.py --minutes 10 [--device cuda] [--config FILE] [key=value ...]

Runs from the repository root. configs/a2n_joint_gpu.yaml warm-starts from the shipped files and
lays the warm-up and cosine over `--minutes` of training (time_budget_hours; validation included;
start-up and the Set5 table at the end come on top). It writes best_x<S>.safetensors, last_x<S>
and last.pt to out_dir, then prints Set5 PSNR of the shipped and the best files and the gain, and
writes the table to <out_dir>/set5.json. Ship with scripts/ship_weights.py (only on a Set5 gain).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from a2n import A2NError
from a2n.evaluation import evaluate_folder
from a2n.training import TrainConfig, load_config, train
from a2n.weights import build_model, shipped_weights_path

ROOT = Path(__file__).resolve().parents[1]


def set5_table(cfg: TrainConfig, set5: Path, device: str) -> list[dict[str, float | int | str]]:
    """Set5 PSNR (Y) of the shipped file and of the run's best file at each scale, and the gain."""
    rows: list[dict[str, float | int | str]] = []
    for scale in cfg.scales or [cfg.scale]:
        best = Path(cfg.out_dir) / (f"best_x{scale}.safetensors" if cfg.scales else "best.safetensors")
        shipped = shipped_weights_path(scale, cfg.variant)
        if not best.is_file():
            raise A2NError(f"{best}: the run wrote no best file (did it validate?)")
        scores = {}
        for name, path in (("shipped", shipped), ("trained", best)):
            if path is None:
                scores[name] = float("nan")  # no shipped file for this variant and scale
                continue
            model = build_model(scale, cfg.variant, path).to(device)
            scores[name] = evaluate_folder(set5, scale, model)[-1].psnr
        rows.append({"scale": scale, "shipped": scores["shipped"], "trained": scores["trained"],
                     "gain": scores["trained"] - scores["shipped"], "file": str(best)})
    return rows


def format_rows(rows: list[dict[str, float | int | str]], set5: Path) -> str:
    """The Set5 table as plain text: scale, shipped PSNR, trained PSNR, gain (dB, Y)."""
    lines = [f"Set5 PSNR (dB, Y) of {set5}", f"{'scale':>5} {'shipped':>8} {'trained':>8} {'gain':>7}"]
    for r in rows:
        lines.append(f"{'x' + str(r['scale']):>5} {r['shipped']:>8.3f} {r['trained']:>8.3f} {r['gain']:>+7.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, train for the budget, print and save the Set5 table; the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="training budget in minutes, validation included (default 10)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where to train and evaluate (default cuda)")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "a2n_joint_gpu.yaml")
    ap.add_argument("--set5", type=Path, default=ROOT.parent / "shared" / "data" / "benchmark" / "Set5",
                    help="benchmark folder (HR/ and LR_bicubic/X<s>/) for the table at the end")
    ap.add_argument("--resume", action="store_true", help="continue <out_dir>/last.pt within the same budget")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="override config entries, e.g. batch_size=32")
    args = ap.parse_args(argv)
    if args.minutes <= 0:
        ap.error(f"--minutes must be positive, got {args.minutes}")
    try:
        cfg = load_config(args.config, [*args.overrides, f"time_budget_hours={args.minutes / 60!r}"])
        if cfg.val_dir is None:
            raise A2NError("val_dir is null: the recipe keeps its best files by validation; set val_dir")
        if args.device == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed patch shapes: cuDNN picks the fastest convolutions once
        summary = train(cfg, resume=args.resume, device=args.device)
        if summary["status"] != "finished":
            print(f"not scored: {summary['status']}", file=sys.stderr)
            return 1
        rows = set5_table(cfg, args.set5, args.device)
    except A2NError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = format_rows(rows, args.set5)
    print(f"{summary['step']} steps in {summary['elapsed'] / 60:.1f} minutes on {args.device}")
    print(table)
    (Path(cfg.out_dir) / "set5.json").write_text(json.dumps({"steps": summary["step"], "elapsed": summary["elapsed"],
                                                             "device": args.device, "set5": str(args.set5), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
