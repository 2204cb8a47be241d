"""The express path: `a2n upscale` on ONNX Runtime or OpenVINO without importing torch.

Importing torch takes over a second, so once `a2n upscale` has run a weights file on ONNX Runtime
or OpenVINO, it records that in the cache (express.json), and later runs with the same file and
options go straight from the cached export to the runtime; an image too large for one forward
takes the exact tiled path on the exported stages at the same precision, also without torch once
they have been exported and auto's backend for tiles is known.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from a2n import memory, pixels, tiling
from a2n.backends import auto, forward
from a2n.backends.cache import cache_dir, file_key, machine_text, read_table, write_table
from a2n.backends.export import cached_onnx, stages_ready
from a2n.backends.runtimes import BackendError, onnxruntime_forward, openvino_forward
from a2n.backends.quantize import int8_file_keys, require_int8
from a2n.backends.stages import ExportedStages

if TYPE_CHECKING:
    from a2n.io import Picture
    from a2n.model import A2N


def express_key(weights: Path, scale: int, variant: str, backend: str, precision: str, threads: int | None) -> str:
    """What an express entry depends on: the weights file's bytes, the options asked for, the machine.

    OMP_NUM_THREADS counts too: without --threads it sets torch's thread count, which the entry keeps.
    """
    h = hashlib.sha256(weights.read_bytes())
    h.update(f"|{scale}|{variant}|{backend}|{precision}|{threads}|{os.environ.get('OMP_NUM_THREADS')}|{machine_text()}".encode())
    return h.hexdigest()[:16]


def remember_express(key: str, model: A2N, backend: str, precision: str) -> None:
    """Record that this request runs model on a runtime other than torch, so that later runs can skip torch.

    The tiled path's backend is recorded too once known (auto measures it on the first big image).
    """
    import torch

    backend_asked, precision_asked = backend, precision
    backend, precision = auto.resolve(model, backend, precision)
    if backend == "torch":
        return
    tiled_precision = auto.known_tile_precision(model, backend_asked, precision, precision_asked)
    tiled = None if tiled_precision is None else backend_asked if backend_asked != "auto" else \
        auto.known_tiled_choice(model, tiled_precision)
    forward.runner(model, backend, precision)  # raises here, before anything is recorded, when the pair cannot run
    path = require_int8(model) if precision == "int8" else cached_onnx(model)
    entry = {"backend": backend, "precision": precision, "model": str(path), "stages": str(forward.stages_path(model, tiled_precision or "fp32")),
             "tiled": tiled, "tiled_precision": tiled_precision, "threads": torch.get_num_threads(), "int8_files": int8_file_keys(model)}
    path = cache_dir() / "express.json"
    table = read_table(path)
    if table.get(key) != entry:
        table[key] = entry
        write_table(path, table)


def express_upscaler(key: str, scale: int, slow_path: Callable[[np.ndarray], np.ndarray],
                     max_memory: float | None = None) -> Callable[[Picture], Picture] | None:
    """A picture upscaler on the runtime recorded for key, made without importing torch; None when nothing is recorded.

    Images that do not run whole (memory.runs_whole: over the memory budget, or big enough that tiles
    run faster) take the exact tiled path on the exported stages when the tiled path's backend is
    recorded as one of the runtimes, and slow_path (the torch model, loaded then) otherwise.
    """
    entry = read_table(cache_dir() / "express.json").get(key)
    if entry is None or any(file_key(Path(p)) != k for p, k in entry.get("int8_files", {}).items()):
        return None  # nothing recorded, or an INT8 file came, went or was remade since: the torch path chooses again
    path = Path(entry.get("model", ""))
    if not path.is_file():
        return None
    make = onnxruntime_forward if entry["backend"] == "onnxruntime" else openvino_forward
    try:
        run = make(path, entry["precision"], entry["threads"])
    except BackendError:  # the runtime was uninstalled since: take the torch path, which chooses again
        return None
    stages: list[ExportedStages] = []

    def upscale_rgb(rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        if memory.runs_whole(h, w, scale, entry["backend"], max_memory):
            return pixels.from_planes(run(pixels.to_planes(rgb)), rgb.dtype)
        folder, tiled, tiled_precision = Path(entry.get("stages", "")), entry.get("tiled"), entry.get("tiled_precision")
        if tiled not in ("onnxruntime", "openvino") or tiled_precision is None or not stages_ready(folder):
            return slow_path(rgb)
        if not stages:
            stages.append(ExportedStages(folder, tiled, entry["threads"], tiled_precision))
        tile = tiling.plan_tile(h, w, scale, stages[0].channels, max_memory, rgb.dtype.itemsize, tiled, whole=False)
        out = np.empty((h * scale, w * scale, 3), dtype=rgb.dtype)
        tiling.run_tiled(stages[0], pixels.to_planes(rgb), out, tile, None)
        return out

    return lambda picture: pixels.upscale_picture(picture, scale, upscale_rgb)
