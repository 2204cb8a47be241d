"""How much memory an upscale takes and may take: the measured costs and the budget (no torch).

The costs are peak-RSS growth measured for fp32 on a CPU, rounded up (bench/RESULTS.md, bench/memory.py).
"""

from __future__ import annotations

import os
from pathlib import Path

MEMORY_SHARE = 0.5  # default max_memory: this share of the memory available now
# A whole-image forward costs this per output and per input pixel; one tile's working set this
# per output pixel of the tile.
FORWARD_BYTES_PER_OUT_PIXEL = 300
FORWARD_BYTES_PER_IN_PIXEL = 1000
TILE_BYTES_PER_OUT_PIXEL = 800
# ONNX Runtime and OpenVINO take more for the same whole-image forward: 1.45x and 1.29x torch's growth
# at x4 (bench/memory.py --backend), so 1.2x and 1.07x the costs above; these factors round up.
FORWARD_FACTOR = {"torch": 1.0, "openvino": 1.2, "onnxruntime": 1.35}
# The tiled path on them keeps 18 compiled stages, each holding some memory of its own: an 800x800
# input at x4 under --max-memory 1 needed 2.0x for OpenVINO to stay within it (bench/memory.py --bound).
TILE_FACTOR = {"torch": 1.0, "openvino": 2.0, "onnxruntime": 1.35}
# Tiles the tiled path runs at once: two on OpenVINO and ONNX Runtime, each on half the threads,
# which is faster than one on all of them (bench/RESULTS.md, Big images).
TILES_IN_FLIGHT = {"torch": 1, "openvino": 2, "onnxruntime": 2}
# Inputs of more pixels than this run in tiles even when a whole-image forward fits the budget: the whole forward
# slows per pixel as images grow and the tiles do not, so from about this size on the tiles are faster
# (bench/RESULTS.md, Big images).
TILED_ABOVE_PIXELS = 768 * 1024


def available_memory() -> int:
    """Bytes the system can give now (MemAvailable), or half of the physical memory without /proc."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def budget_bytes(max_memory: float | None, available: int | None = None) -> float:
    """The budget in bytes: max_memory GiB, or MEMORY_SHARE of the memory available now."""
    if max_memory is not None:
        return max_memory * 2**30
    return MEMORY_SHARE * (available if available is not None else available_memory())


def runs_whole(height: int, width: int, scale: int, backend: str, max_memory: float | None, available: int | None = None) -> bool:
    """Whether an image runs as one forward by default: it fits the budget on backend and is not so big that tiles are faster."""
    return height * width <= TILED_ABOVE_PIXELS and forward_bytes(height, width, scale, backend) <= budget_bytes(max_memory, available)


def tile_bytes_per_out_pixel(backend: str = "torch") -> float:
    """The working set of the tiles in flight per output pixel of one tile, on backend."""
    return TILES_IN_FLIGHT[backend] * TILE_FACTOR[backend] * TILE_BYTES_PER_OUT_PIXEL


def forward_bytes(height: int, width: int, scale: int, backend: str = "torch") -> int:
    """Peak memory of a whole-image forward on a height x width input, on backend."""
    per_pixel = FORWARD_BYTES_PER_OUT_PIXEL * scale**2 + FORWARD_BYTES_PER_IN_PIXEL
    return int(FORWARD_FACTOR[backend] * per_pixel * height * width)
