"""`auto`: the fastest backend and precision that costs no quality, measured once per machine and weights.

The rule: a (backend, precision) may be chosen only if its PSNR against ground truth is at most
MAX_COST_DB below torch fp32's, on a check made from the packaged sample image (its HR, MATLAB
bicubic LR, PSNR on Y as `a2n evaluate`). Closeness to the fp32 output does not predict that cost:
an INT8 model 54 dB from fp32 lost 0.45 dB on Set5 at x2, while bf16, about as far, lost 0.02 at
most. An INT8 file's cost is the largest of that, what it lost on the held-out photos it was
checked on when made, and (shipped files) what it lost on Set5 and Set14 when shipped (a2n.backends.quantize). Among the eligible pairs the fastest on a real-sized
image wins, timed in interleaved rounds.
The choice is cached in auto.json per machine, weights and request (backend and precision may each
be given or left to auto); the tiled path runs at the chosen precision on the backend fastest on
tiles at that precision (`choose_tiled`), timed apart, since tiles and whole images differ. Where int8
is the choice, tiles run on the model's INT8 stages (quantized with its INT8 file, a2n.backends.quantize)
if their own recorded cost passes the rule (asked for by name: if they exist), and otherwise at what the
same request would choose without int8: bf16 where the CPU has it and it passes the rule, fp32 elsewhere.
"""

from __future__ import annotations

import math
import sys
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from a2n import A2NError, memory, tiling
from a2n.backends import forward
from a2n.backends.cache import cache_dir, file_key, machine_key, read_table, weights_key, write_table
from a2n.backends.export import STAGES_FORMAT
from a2n.backends.quantize import int8_file, int8_stages, price, require_int8, stages_price
from a2n.backends.runtimes import BACKENDS, PRECISIONS, BackendError, Runner, candidates, openvino_precisions

if TYPE_CHECKING:
    import torch

    from a2n.model import A2N

MAX_COST_DB = 0.02  # the most PSNR a precision may cost on the ground-truth check to be chosen by auto
MIN_FIDELITY_DB = 45.0  # tiles: a backend whose tiled output is further than this from fp32 is broken, never chosen
PREFER_MARGIN = 0.1  # on tiles, auto keeps its whole-image backend unless another is 10% faster
PROBE_SIZE = 128  # LR side of the image auto times each candidate on (a crop of the packaged sample)
# the same for the tiled path: 16 tiles of the largest size. With 4 (a 256 image) torch bf16 won the probe on an
# AMX Xeon and then ran big images 13% slower than OpenVINO; from 512 on the order is that of big images
# (bench/tile_probe.py, bench/RESULTS.md "Big images")
TILED_PROBE_SIZE, TILED_PROBE_TILE = 512, tiling.MAX_TILE

_choices: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {request: choice}, so a folder looks it up once
_tiled_choices: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {precision: backend on tiles}


def check_request(backend: str, precision: str) -> None:
    """Refuse an unknown backend or precision, naming the choices."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise BackendError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")


def resolve(model: A2N, backend: str, precision: str, int8: bool = True) -> tuple[str, str]:
    """The (backend, precision) a request runs on: whatever is auto becomes the cached fastest eligible choice
    (int8=False: among the candidates other than int8)."""
    check_request(backend, precision)
    if backend != "auto" and precision != "auto":
        return backend, precision
    made = _choices.setdefault(model, {})
    if (backend, precision, int8) not in made:
        made[(backend, precision, int8)] = choose(model, backend, precision, int8)
    return made[(backend, precision, int8)]


def resolve_tiled(model: A2N, backend: str, precision: str) -> tuple[str, str]:
    """The (backend, precision) the tiled path runs on: the whole image's precision, on backend or, for
    auto, on the backend fastest on tiles at that precision (choose_tiled). Where that precision is int8,
    tiles run on the INT8 stages where int8_tiles allows, else at what the request would get without int8."""
    asked = precision
    whole, precision = resolve(model, backend, precision)
    if precision == "int8":
        if backend in ("auto", "openvino") and int8_tiles(model, asked == "int8"):
            return "openvino", "int8"
        whole, precision = resolve(model, backend, "auto", int8=False)
    if backend != "auto":
        return whole, precision
    made = _tiled_choices.setdefault(model, {})
    if precision not in made:
        made[precision] = choose_tiled(model, precision, prefer=whole)
    return made[precision], precision


def int8_tiles(model: A2N, asked: bool) -> bool:
    """Whether tiles of an image that runs in int8 run on the model's INT8 stages: where they exist and, unless int8
    was asked for by name, cost at most MAX_COST_DB (their recorded held-out and benchmark loss)."""
    folder = int8_stages(model)
    return folder is not None and (asked or stages_price(folder) <= MAX_COST_DB)


def model_candidates(model: A2N) -> list[tuple[str, str]]:
    """candidates(), and OpenVINO int8 where the model has an INT8 file (a2n.backends.quantize) and OpenVINO runs INT8."""
    found = candidates()
    if ("openvino", "fp32") in found and int8_file(model) is not None and "int8" in openvino_precisions():
        found.append(("openvino", "int8"))
    return found


def pairs_for(model: A2N, backend: str, precision: str, int8: bool = True) -> list[tuple[str, str]]:
    """The candidates a request leaves to choose from; a request nothing here runs natively gets its only way."""
    found = [(b, p) for b, p in (model_candidates(model) if int8 else candidates())
             if backend in ("auto", b) and precision in ("auto", p)]
    if found:
        return found
    default = "openvino" if precision == "int8" else "torch"  # int8 asked where it cannot run: OpenVINO's error says why
    return [(backend if backend != "auto" else default, precision if precision != "auto" else "fp32")]


def choice_key(model: A2N, backend: str, precision: str, pairs: list[tuple[str, str]]) -> str:
    """auto.json's key of a whole-image choice: machine, weights, the request, and which INT8 file was among the
    pairs if one was (a remade file, as an upgrade may bring, is priced and timed again)."""
    key = f"{machine_key()}-{weights_key(model)}-{backend}-{precision}"
    return key + (f"-int8-{file_key(require_int8(model))}" if ("openvino", "int8") in pairs else "")


def choose(model: A2N, backend: str = "auto", precision: str = "auto", int8: bool = True) -> tuple[str, str]:
    """The fastest (backend, precision) for the request that costs at most MAX_COST_DB, measured once and cached."""
    pairs = pairs_for(model, backend, precision, int8)
    if len(pairs) == 1:  # nothing to choose between (torch alone, or a request that names both)
        return pairs[0]
    entry = cached_fastest(choice_key(model, backend, precision, pairs), f"{len(pairs)} backends and precisions",
                           lambda: measure(model, pairs), eligible=lambda r: r["cost_db"] <= MAX_COST_DB)
    return entry["backend"], entry["precision"]


def known_tile_precision(model: A2N, backend: str, precision: str, asked: str | None = None) -> str | None:
    """The precision the tiled path takes for a request (backend, asked) whose whole image runs at precision, if
    known without measuring (resolve_tiled): precision itself, int8 on INT8 stages, or for int8 the cached choice
    without int8; None if not measured."""
    if precision != "int8":
        return precision
    if backend in ("auto", "openvino") and int8_tiles(model, (asked or precision) == "int8"):
        return "int8"
    if (backend, "auto", False) in _choices.get(model, {}):
        return _choices[model][(backend, "auto", False)][1]
    pairs = pairs_for(model, backend, "auto", int8=False)
    if len(pairs) == 1:
        return pairs[0][1]
    return read_table(cache_dir() / "auto.json").get(choice_key(model, backend, "auto", pairs), {}).get("precision")


def cached_fastest(key: str, what: str, timings: Callable[[], list[dict]], prefer: str | None = None,
                   eligible: Callable[[dict], bool] = lambda r: r["fidelity_db"] >= MIN_FIDELITY_DB) -> dict:
    """auto.json's entry for key: the fastest eligible row of timings(), measured on first use only.

    The prefer backend's row wins unless another is PREFER_MARGIN faster: a short probe on a noisy
    machine should not flip a choice that a closer look would not."""
    path = cache_dir() / "auto.json"
    table = read_table(path)
    if key not in table:
        print(f"a2n: timing {what} once for this machine and weights (kept in {path})", file=sys.stderr)
        rows = timings()
        good = [r for r in rows if "seconds" in r and eligible(r)]
        if not good:
            raise BackendError(f"no backend ran correctly here: {rows}; pass --backend torch --precision fp32")
        best = min(good, key=lambda r: r["seconds"])
        best = next((r for r in good if r["backend"] == prefer and r["seconds"] <= best["seconds"] * (1 + PREFER_MARGIN)), best)
        table[key] = {**{k: best[k] for k in ("backend", "precision") if k in best}, "measured": rows}
        write_table(path, table)
    return table[key]


def sample_image() -> np.ndarray:
    """The packaged sample (a natural photo, 192x128) as HxWx3 uint8; seeded noise if it is missing."""
    from importlib import resources

    sample = Path(str(resources.files("a2n"))) / "samples" / "village.png"
    if sample.is_file():
        from PIL import Image

        return np.asarray(Image.open(sample).convert("RGB"))
    return np.random.default_rng(0).integers(0, 256, (128, 192, 3), dtype=np.uint8)


def probe_image(size: int) -> torch.Tensor:
    """A size x size crop of the sample (tiled to size when larger) as 1x3xSxS in 0..1: what auto times."""
    import torch

    rgb = sample_image()
    reps = (-(-size // rgb.shape[0]), -(-size // rgb.shape[1]), 1)
    rgb = np.tile(rgb, reps)[:size, :size]
    return torch.from_numpy(rgb.transpose(2, 0, 1).copy()).float().div(255).unsqueeze(0)


def ground_truth(scale: int) -> tuple[np.ndarray, torch.Tensor]:
    """The check auto scores precisions on: the sample as HR (modcrop) and its MATLAB bicubic LR as a tensor."""
    import torch

    from a2n.resize import imresize, modcrop

    hr = modcrop(sample_image(), scale)
    lr = imresize(hr, 1.0 / scale)
    return hr, torch.from_numpy(lr.transpose(2, 0, 1).copy()).float().div(255).unsqueeze(0)


def psnr_against(hr: np.ndarray, sr: torch.Tensor, scale: int) -> float:
    """PSNR on Y of an SR output (1x3xHxW in 0..1) against HR, rounded to 8 bits first, as `a2n evaluate`."""
    from a2n import metrics
    from a2n.pixels import from_planes

    return metrics.psnr(from_planes(sr.detach().float().numpy(), np.uint8), hr, shave=scale)


def fidelity_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR in dB of out against the fp32 reference, both on the 0..1 scale (inf when equal)."""
    mse = float((out.float() - ref.float()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def measure(model: A2N, pairs: list[tuple[str, str]], size: int | None = None, repeat: int = 2) -> list[dict]:
    """For each pair: its cost in dB on the ground-truth check (against torch fp32), its fidelity to torch
    fp32 there, and seconds on a PROBE_SIZE image (best of repeat interleaved rounds, after a warm-up)."""
    hr, lr = ground_truth(model.scale)
    x = probe_image(size or PROBE_SIZE)
    ref = forward.runner(model, "torch", "fp32")(lr)
    ref_psnr = psnr_against(hr, ref, model.scale)
    rows, runs, outs = [], {}, {}
    for backend, precision in pairs:
        try:
            run = forward.runner(model, backend, precision)
            out = outs[(backend, precision)] = run(lr)
            if precision != "fp32" and (backend, "fp32") in outs and fidelity_db(out, outs[(backend, "fp32")]) == math.inf:
                # the runtime took the precision hint and ran fp32 (OpenVINO's fp16 on a CPU with AVX512-FP16 but
                # no AMX-FP16): not a choice of its own, and a label that would tell the user what did not happen
                rows.append({"backend": backend, "precision": precision, "runs_as": "fp32"})
                continue
            run(x)
            runs[(backend, precision)] = run
            cost = ref_psnr - psnr_against(hr, out, model.scale)
            if precision == "int8":  # one photo is a small check: what the file was recorded to lose counts too
                cost = max(cost, price(require_int8(model)))
            rows.append({"backend": backend, "precision": precision, "cost_db": cost, "fidelity_db": fidelity_db(out, ref)})
        except A2NError as exc:
            rows.append({"backend": backend, "precision": precision, "error": str(exc)})
    for _ in range(repeat):
        for row in rows:
            if (row["backend"], row["precision"]) in runs:
                seconds = _timed(runs[(row["backend"], row["precision"])], x)
                row["seconds"] = min(row.get("seconds", math.inf), seconds)
    return rows


def measure_tiled(model: A2N, names: list[str], precision: str = "fp32", size: int | None = None, tile: int | None = None,
                  repeat: int = 2) -> list[dict]:
    """Seconds of the tiled path at precision and fidelity in dB vs torch fp32, per backend: after a run that
    compiles the tile shape, the best of repeat rounds that time every backend in turn, so that a slow spell
    of the machine does not fall on one backend alone."""
    import torch

    size, tile = size or TILED_PROBE_SIZE, tile or TILED_PROBE_TILE
    x = probe_image(size).numpy()
    scale = model.scale
    ref = np.empty((size * scale, size * scale, 3), np.float32)
    outputs, stages, errors = {}, {}, {}
    with torch.inference_mode():
        tiling.run_tiled(forward.stages(model, "torch", "fp32"), x, ref, tile)
        for name in names:
            try:
                stages[name] = forward.stages(model, name, precision)
                outputs[name] = np.empty_like(ref)
                tiling.run_tiled(stages[name], x, outputs[name], tile)
            except A2NError as exc:
                errors[name] = str(exc)
                stages.pop(name, None)
        seconds: dict[str, float] = {}
        for _ in range(repeat):
            for name, stage in stages.items():
                start = time.perf_counter()
                tiling.run_tiled(stage, x, outputs[name], tile)
                seconds[name] = min(seconds.get(name, math.inf), time.perf_counter() - start)
    return [{"backend": n, "error": errors[n]} if n in errors else
            {"backend": n, "seconds": seconds[n], "fidelity_db": fidelity_db(torch.from_numpy(outputs[n]), torch.from_numpy(ref))}
            for n in names]


def _timed(run: Runner, x: torch.Tensor) -> float:
    start = time.perf_counter()
    run(x)
    return time.perf_counter() - start


def tiled_key(model: A2N, precision: str = "fp32") -> str:
    """The auto.json key of the tiled path's choice: machine, weights, precision, the stages' format, the
    tiles each backend runs at once and the probe's size (a change to any is timed again)."""
    in_flight = "".join(str(memory.TILES_IN_FLIGHT[b]) for b in sorted(memory.TILES_IN_FLIGHT))
    probe = f"probe{TILED_PROBE_SIZE}t{TILED_PROBE_TILE}"
    return f"{machine_key()}-{weights_key(model)}-tiled{STAGES_FORMAT}-{in_flight}-{probe}-{precision}"


def choose_tiled(model: A2N, precision: str = "fp32", prefer: str | None = None) -> str:
    """The fastest backend for the tiled path at precision on this machine and weights, measured once and cached.

    Tiles do not run at the speed of a whole image (per-call costs, other shapes), and the backend
    fastest on one is not always fastest on the other, so auto times the tiled path itself; the
    whole image's backend (prefer) is kept unless another is clearly faster.
    """
    names = [b for b, p in candidates() if p == precision] or ["torch"]
    if len(names) == 1:
        return names[0]
    entry = cached_fastest(tiled_key(model, precision), f"the tiled path on {len(names)} backends at {precision}",
                           lambda: measure_tiled(model, names, precision), prefer)
    return entry["backend"]


def known_tiled_choice(model: A2N, precision: str) -> str | None:
    """auto's backend for the tiled path at precision if it was measured already (never measures); int8 tiles are OpenVINO's."""
    if precision == "int8":
        return "openvino"
    if precision in _tiled_choices.get(model, {}):
        return _tiled_choices[model][precision]
    names = [b for b, p in candidates() if p == precision] or ["torch"]
    if len(names) == 1:
        return names[0]
    return read_table(cache_dir() / "auto.json").get(tiled_key(model, precision), {}).get("backend")
