"""Where the forward runs: torch, ONNX Runtime or OpenVINO, at fp32, bf16, fp16 or int8, and `auto`'s choice.

The model is exported once to ONNX with dynamic height and width (`a2n export`, or on first use
into the cache folder, keyed by the weights), and the other runtimes load that file. An image too
large for the memory budget goes through the exact tiled path (a2n.tiling), whose stages (head,
each block, tail) are exported the same way and run on the same runtime at the same precision.
`auto`, for the backend, the precision or both, takes the fastest choice whose cost against ground
truth is at most 0.02 dB (a2n.backends.auto says how that is measured), once per machine and weights.

The modules, each one concern: cpu (what the CPU computes natively), runtimes (the three
runtimes), export (ONNX/OpenVINO files), quantize (INT8 files and tiled stages for OpenVINO), stages (the tiled
path's stages), forward (a model's forward on one backend and precision), auto (the choice),
express (runs that skip importing torch), cache (the cache folder). This module holds the entry points the rest of a2n uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from a2n.backends import forward
from a2n.backends.auto import fidelity_db, resolve, resolve_tiled
from a2n.backends.export import ExportError, export, verify
from a2n.backends.runtimes import BACKENDS, PRECISIONS, BackendError, Runner
from a2n.backends.stages import ExportedStages, TorchStages

if TYPE_CHECKING:
    from a2n.model import A2N

DEFAULT_BACKEND = "auto"  # a2n.upscale, a2n upscale and the server; evaluate stays on torch fp32 (machine-independent figures)
DEFAULT_PRECISION = "auto"  # the same three; auto never picks a precision that costs more than 0.02 dB

__all__ = ["BACKENDS", "PRECISIONS", "DEFAULT_BACKEND", "DEFAULT_PRECISION", "BackendError", "ExportError", "ExportedStages",
           "TorchStages", "export", "verify", "fidelity_db", "get_runner", "get_stages", "resolve", "resolve_tiled"]


def get_runner(model: A2N, backend: str = "torch", precision: str = "fp32") -> Runner:
    """The whole-image forward of model on backend at precision (auto: the cached fastest eligible choice)."""
    return forward.runner(model, *resolve(model, backend, precision))


def get_stages(model: A2N, backend: str = "torch", precision: str = "fp32") -> TorchStages | ExportedStages:
    """The tiled forward's stages of model at the precision the whole image would run at, on backend
    (auto: the fastest on tiles at that precision)."""
    return forward.stages(model, *resolve_tiled(model, backend, precision))
