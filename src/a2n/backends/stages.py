"""The tiled path's stages (head, each block, tail) on torch or on an exported runtime, at a precision.

a2n.tiling drives them tile by tile; at fp32 the result equals the whole-image forward within 1e-4.
At bf16 each stage computes in bf16 and hands the next bf16 maps (fp32 on torch) and float64 pooled sums, so a
tiled image is as close to the fp32 output as the whole bf16 image is (tests/test_backends.py
states the bound). At int8 the stages are OpenVINO IR quantized apart (a2n.backends.quantize), as
near fp32 as the whole INT8 image (tests/test_int8.py).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from a2n import memory, tiling
from a2n.backends.runtimes import OpenVINOStage, Outputs, onnxruntime_outputs, torch_dtype

if TYPE_CHECKING:
    import torch

    from a2n.model import A2N


def _summed(y: torch.Tensor) -> np.ndarray:
    import torch

    return y.sum(dim=(0, 2, 3), dtype=torch.float64).cpu().numpy()


class TorchStages:
    """The tiled forward's stages on the torch model (on its device) at a precision, one tile at a time."""

    parallel = 1

    def __init__(self, model: A2N, precision: str = "fp32") -> None:
        import copy

        import torch

        self.dtype = torch_dtype(precision)
        self.model = model if self.dtype == torch.float32 else copy.deepcopy(model).to(self.dtype)
        self.scale, self.channels, self.blocks = model.scale, model.conv_first.out_channels, len(model.blocks)
        self.device = next(model.parameters()).device

    def prepare(self, x: np.ndarray) -> torch.Tensor:
        import torch

        return torch.from_numpy(x).to(self.device, self.dtype).contiguous(memory_format=torch.channels_last)

    def features(self, height: int, width: int) -> torch.Tensor:
        import torch

        return torch.empty(1, self.channels, height, width, device=self.device, dtype=self.dtype, memory_format=torch.channels_last)

    def head(self, x: torch.Tensor, inner: tiling.Box, into: torch.Tensor) -> tiling.Waiting:
        into.copy_(self.model.head(x))
        summed = _summed(self.model.blocks[0].entry(into[:, :, inner[0], inner[1]]))
        return lambda: summed

    def block(self, k: int, part: torch.Tensor, pooled: np.ndarray, inner: tiling.Box, into: torch.Tensor) -> tiling.Waiting:
        import torch

        block = self.model.blocks[k]
        into.copy_(block.mix(part, block.entry(part), torch.from_numpy(pooled).to(self.device, self.dtype)))
        summed = _summed(self.model.blocks[k + 1].entry(into[:, :, inner[0], inner[1]])) if k + 1 < self.blocks else None
        return lambda: summed

    def tail(self, x: torch.Tensor, fea: torch.Tensor, done: Callable[[np.ndarray], None]) -> tiling.Waiting:
        sr = self.model.tail(x, self.model.head(x), fea).detach().float().cpu().numpy()
        return lambda: done(sr)


def stage_names(blocks: int) -> list[str]:
    """The stages' file names (without suffix) in the order a tiled forward runs them."""
    return ["head", *(f"block{k:02d}" for k in range(blocks)), "tail"]


MAP_PORTS = frozenset({"fea", "part", "out", "trunk"})  # the stages' feature-map inputs and outputs (export_stages)


def _masks(shape: tuple[int, ...], inner: tiling.Box) -> tuple[np.ndarray, np.ndarray]:
    """0/1 float32 row and column masks of a window of shape (..., H, W) that select its inner box."""
    rows, cols = np.zeros(shape[-2], np.float32), np.zeros(shape[-1], np.float32)
    rows[inner[0]], cols[inner[1]] = 1, 1
    return rows, cols


class ExportedStages:
    """The tiled forward's stages from export_stages, on ONNX Runtime (fp32) or OpenVINO (at a precision; int8: the
    stages of a2n.backends.quantize), numpy in and out, each stage's runtime in runs by file name.

    Feature maps are channels-last in memory, as the exported stages take them, and indexed 1 x C x H x W
    here (a transposed view). At bf16 on OpenVINO they are bf16 (uint16 arrays of its bits): the stages
    compute in bf16 and would round them there anyway, and moving half the bytes with no conversions made
    big images' tiles about 1.2x faster (bench/RESULTS.md, Big images). OpenVINO writes a stage's feature
    map straight into the window it is given (`into`); ONNX Runtime's is copied there. OpenVINO runs
    memory.TILES_IN_FLIGHT tiles at once on as many streams (given two threads or more), started from the
    caller's thread; ONNX Runtime as many on one session from a pool of as many threads, each call on its share
    of the threads.
    """

    def __init__(self, folder: Path, backend: str, threads: int, precision: str = "fp32") -> None:
        meta = json.loads((folder / "stages.json").read_text())
        self.scale, self.channels, self.blocks = meta["scale"], meta["channels"], meta["blocks"]
        self.parallel = min(memory.TILES_IN_FLIGHT[backend], threads)
        bf16_maps = backend == "openvino" and precision == "bf16"
        self.map_dtype = np.uint16 if bf16_maps else np.float32
        self.pool = None
        if backend == "onnxruntime":
            def make(path: Path) -> Outputs:  # a session runs calls from several threads at once, each on its own threads
                return onnxruntime_outputs(path, precision, threads // self.parallel)
            self.pool = ThreadPoolExecutor(self.parallel) if self.parallel > 1 else None
        else:
            def make(path: Path) -> Outputs:
                return OpenVINOStage(path, threads, self.parallel, precision, MAP_PORTS if bf16_maps else frozenset())
        suffix = meta.get("suffix", ".onnx")  # INT8 stages are OpenVINO IR (a2n.backends.quantize)
        self.runs = {name: make(folder / f"{name}{suffix}") for name in stage_names(self.blocks)}
        self.spare: list[np.ndarray] = []  # SR windows for the tail: one per call in flight

    def _start(self, name: str, *xs: np.ndarray, into: tuple[np.ndarray, ...] = ()) -> Callable[[], list[np.ndarray]]:
        """Start a stage: on OpenVINO's streams, on the ONNX Runtime pool, or (one thread) run it now."""
        run = self.runs[name]
        if isinstance(run, OpenVINOStage):
            return run.start(*xs, into=into)
        if self.pool is not None:
            return self.pool.submit(run, *xs, into=into).result
        outputs = run(*xs, into=into)
        return lambda: outputs

    def _send(self, fea: np.ndarray) -> np.ndarray:
        """A window from features() as the runtime takes and writes it: the channels-last array itself, not a copy."""
        nhwc = fea.transpose(0, 2, 3, 1)
        assert nhwc.flags.c_contiguous, "feature windows come from features()"
        return nhwc

    def prepare(self, x: np.ndarray) -> np.ndarray:
        return x

    def features(self, height: int, width: int) -> np.ndarray:
        return np.empty((1, height, width, self.channels), dtype=self.map_dtype).transpose(0, 3, 1, 2)

    def head(self, x: np.ndarray, inner: tiling.Box, into: np.ndarray) -> tiling.Waiting:
        wait = self._start("head", np.ascontiguousarray(x), *_masks(x.shape, inner), into=(self._send(into),))
        return lambda: wait()[0][0].astype(np.float64)

    def block(self, k: int, part: np.ndarray, pooled: np.ndarray, inner: tiling.Box, into: np.ndarray) -> tiling.Waiting:
        name = f"block{k:02d}"
        if k + 1 < self.blocks:
            wait = self._start(name, self._send(part), pooled, *_masks(part.shape, inner), into=(self._send(into),))
            return lambda: wait()[0][0].astype(np.float64)
        wait = self._start(name, self._send(part), pooled, into=(self._send(into),))

        def finish() -> None:  # the last block sums nothing
            wait()

        return finish

    def tail(self, x: np.ndarray, fea: np.ndarray, done: Callable[[np.ndarray], None]) -> tiling.Waiting:
        h, w = x.shape[2:]
        shape = (1, 3, h * self.scale, w * self.scale)
        try:
            sr = self.spare.pop()
        except IndexError:  # none spare (another thread may have taken the last)
            sr = None
        if sr is None or sr.shape != shape:
            sr = np.empty(shape, np.float32)
        wait = self._start("tail", np.ascontiguousarray(x), self._send(fea), into=(sr,))

        def finish() -> None:
            wait()
            done(sr)
            self.spare.append(sr)  # the next tail call writes into it again

        return finish
