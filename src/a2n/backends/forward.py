"""The forward of a model on one backend at one precision, whole or in stages, made once per model.

Nothing here chooses: `auto` is resolved first (a2n.backends.auto), and these take the result.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import TYPE_CHECKING

from a2n.backends.export import cached_onnx, export_stages, stages_folder, stages_ready
from a2n.backends.quantize import int8_stages, require_int8
from a2n.backends.runtimes import BackendError, Runner, onnxruntime_runner, openvino_runner, torch_runner
from a2n.backends.stages import ExportedStages, TorchStages

if TYPE_CHECKING:
    from a2n.model import A2N

_runners: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_stages: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def runner(model: A2N, backend: str, precision: str) -> Runner:
    """The whole-image forward of model on backend (torch, onnxruntime, openvino) at precision."""
    made = _runners.setdefault(model, {})
    if (backend, precision) not in made:
        if backend == "torch":
            made[(backend, precision)] = torch_runner(model, precision)
        elif backend == "onnxruntime":
            made[(backend, precision)] = onnxruntime_runner(cached_onnx(model), precision)
        elif backend == "openvino":
            path = require_int8(model) if precision == "int8" else cached_onnx(model)
            made[(backend, precision)] = openvino_runner(path, precision)
        else:
            raise BackendError(f"no forward for backend {backend!r}")
    return made[(backend, precision)]


def stages(model: A2N, backend: str, precision: str) -> TorchStages | ExportedStages:
    """The tiled forward's stages of model on backend at precision (exported to the cache on first use; int8: the
    INT8 stages made with the model's INT8 file, which a2n.backends.auto.resolve_tiled asks for only where they exist)."""
    import torch

    made = _stages.setdefault(model, {})
    if (backend, precision) not in made:
        if backend == "torch":
            made[(backend, precision)] = TorchStages(model, precision)
        else:
            folder = stages_path(model, precision)
            if precision != "int8" and not stages_ready(folder):
                export_stages(model, folder)
            made[(backend, precision)] = ExportedStages(folder, backend, torch.get_num_threads(), precision)
    return made[(backend, precision)]


def stages_path(model: A2N, precision: str) -> Path:
    """The folder of the model's stages at precision: its INT8 stages for int8, else its export in the cache folder."""
    if precision != "int8":
        return stages_folder(model)
    folder = int8_stages(model)
    if folder is None:
        raise BackendError(f"no INT8 stages for these x{model.scale} weights: `a2n export --format openvino --precision int8` "
                           "makes them with the INT8 file; or use --precision fp32")
    return folder
