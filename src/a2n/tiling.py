"""Exact tiled inference: the A2N forward over an image of any size in bounded memory (no torch here).

A2N's attention-dropout module averages each block's features over the whole image, so cutting
the image into independent tiles changes the result. Here the trunk runs block by block over
the whole LR feature map instead: each block runs on tiles grown by its receptive radius, given
the exact pooled mean of its entry features, and keeps only their interiors; the stage before it
(the head, or the previous block) summed those entry features over each tile's interior as it
made them. The reconstruction is local, so it runs on tiles with a halo too and writes straight
into the output array. A tiled run equals the whole-image forward up to float rounding.

The feature map is kept as one window per tile (its tile grown by the block's halo), in pairs: a
block stage reads a tile's window and writes the next block's into the other of its pair, where a
runtime can write it in place; before the next block, each window's rim is filled from the
interiors of the tiles it overlaps. Only those rims are copied between blocks, not whole windows.

The stages themselves (head, block, tail) run wherever a `Stages` object puts them: on torch, or
on ONNX Runtime / OpenVINO from an export (a2n.backends); this module only cuts and stitches.
Tiles of one pass are independent: each stage call starts a tile and returns a function that waits
for it, and a few tiles are kept started, so a backend that runs several at once (OpenVINO's streams)
has the next queued when one ends. Sums are still added in tile order, so the result does not depend
on which tile finished first.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np

from a2n import A2NError, memory
from a2n.pixels import write_planes

Box = tuple[slice, slice]
Waiting = Callable[[], Any]  # what a started stage call returns: waits for the call, gives its result

BLOCK_HALO = 2  # an AAB block reaches 2 LR pixels: a 3x3 conv after a 3x3 conv in its attention branch
TAIL_HALO = 3  # head and trunk_conv (1) + the reconstruction's convs (at most 2 LR pixels at x2, x3, x4)
MAX_TILE = 128  # 256 runs level with it and 384 slower (bench/tile_sides.py); 128 also needs the least memory
MIN_TILE = 32


class MemoryBudgetError(A2NError):
    """The image cannot be processed within the allowed memory, even with the smallest tiles."""


class Stages(Protocol):
    """The pieces of an A2N forward that tiling calls, on 1 x C x H x W arrays of one kind (torch or numpy).

    Each starts a tile and returns a function that waits for it (a backend that runs one tile at a time runs
    it at once) and gives the result. head: (image window in 0..1, inner box, into) -> block 0's entry summed
    over the inner box, with the shallow features of the window written into `into`; block: (k, feature
    window, pooled mean 1 x C float32, inner box, into) -> block k+1's entry summed over the inner box (None
    after the last block), with block k's output on the window written into `into`; sums are per channel,
    float64. Only the inner box of what a stage writes is used. tail: (image window, trunk features, done)
    -> None, after calling done with the SR window in 0..1 as float32 numpy planes (valid only in done).
    prepare: numpy input planes to the stages' kind; features: an empty feature map (a window). parallel:
    how many tiles the stages run at once. Inputs and `into` must stay as they are until the call is waited for.
    """

    scale: int
    channels: int
    blocks: int
    parallel: int

    def prepare(self, x: np.ndarray) -> Any: ...
    def features(self, height: int, width: int) -> Any: ...
    def head(self, x: Any, inner: Box, into: Any) -> Waiting: ...
    def block(self, k: int, part: Any, pooled: np.ndarray, inner: Box, into: Any) -> Waiting: ...
    def tail(self, x: Any, fea: Any, done: Callable[[np.ndarray], None]) -> Waiting: ...


def plan_tile(height: int, width: int, scale: int, channels: int, max_memory: float | None = None, out_itemsize: int = 1,
              backend: str = "torch", available: int | None = None, whole: bool = True) -> int | None:
    """Tile side (input pixels) that keeps peak memory under max_memory GiB; None means one whole-image forward
    (memory.runs_whole).

    max_memory defaults to half of the memory available now; backend is where the tiles run (they
    differ in memory). Counts the tiled trunk's feature windows (two per tile, each its tile plus the
    block halo), the input and the output array, and the working set of the tiles in flight at once.
    whole=False always plans tiles (the caller has found that the whole image does not fit on the
    backend of its whole-image forward).
    """
    budget = memory.budget_bytes(max_memory, available)
    s2 = scale**2
    if whole and memory.runs_whole(height, width, scale, backend, max_memory, available):
        return None
    per_pixel = memory.tile_bytes_per_out_pixel(backend) * s2

    def need(tile: int) -> int:
        ny, nx = math.ceil(height / tile), math.ceil(width / tile)
        windows = ny * (math.ceil(height / ny) + 2 * BLOCK_HALO) * nx * (math.ceil(width / nx) + 2 * BLOCK_HALO)
        fixed = 2 * channels * 4 * windows + height * width * (3 * 4 + 3 * s2 * out_itemsize)
        return int(fixed + per_pixel * (tile + 2 * TAIL_HALO) ** 2)

    sides = range(MAX_TILE, MIN_TILE - 1, -1)
    for tile in sides:
        if need(tile) <= budget:
            return tile
    raise MemoryBudgetError(  # the least need is not at MIN_TILE: small tiles' windows overlap more
        f"a {width}x{height} image at x{scale} needs about {min(map(need, sides)) / 2**30:.1f} GiB "
        f"but the budget is {budget / 2**30:.1f} GiB; raise --max-memory or split the image"
    )


def cuts(length: int, tile: int) -> list[slice]:
    """length cut into the fewest parts of at most tile, as equal as they can be (sizes differ by at most 1)."""
    n = math.ceil(length / tile)
    return [slice(length * i // n, length * (i + 1) // n) for i in range(n)]


def tiles(height: int, width: int, tile: int) -> list[Box]:
    """The tile grid over an image: row-major boxes of at most tile x tile pixels, of nearly equal size."""
    return [(ys, xs) for ys in cuts(height, tile) for xs in cuts(width, tile)]


def grow(box: Box, halo: int, height: int, width: int, span: tuple[int, int] | None = None) -> tuple[Box, Box]:
    """The window a stage runs on for box (box plus halo), and where the box lies inside it.

    Without span the window is clipped to the image. With span (the largest box's height and width)
    every window is span + 2 * halo pixels (or the whole image side), moved inside the image rather
    than clipped: a backend then sees one input shape for the whole image, and pays once for it.
    Either way the window holds the box's receptive field or reaches the image border, so the
    result is exact.
    """

    def axis(part: slice, length: int, size: int | None) -> tuple[slice, slice]:
        lo, hi = part.start - halo, part.stop + halo
        if size is None:
            lo, hi = max(lo, 0), min(hi, length)
        else:
            size = min(size + 2 * halo, length)
            lo = min(max(lo, 0), length - size)
            hi = lo + size
        return slice(lo, hi), slice(part.start - lo, part.stop - lo)

    (gy, iy), (gx, ix) = axis(box[0], height, span and span[0]), axis(box[1], width, span and span[1])
    return (gy, gx), (iy, ix)


def scaled(box: Box, s: int) -> Box:
    return slice(box[0].start * s, box[0].stop * s), slice(box[1].start * s, box[1].stop * s)


def pieces(window: Box, rows: list[slice], cols: list[slice], windows: list[Box]) -> list[tuple[int, Box, Box]]:
    """Where a window's pixels lie in the tiles' windows: (tile, part of window, the same part in that tile's window)
    for every tile of the grid rows x cols whose box overlaps window (each tile's box within windows[tile])."""

    def meet(a: slice, b: slice) -> slice | None:
        part = slice(max(a.start, b.start), min(a.stop, b.stop))
        return part if part.start < part.stop else None

    def local(part: Box, origin: Box) -> Box:
        return (slice(part[0].start - origin[0].start, part[0].stop - origin[0].start),
                slice(part[1].start - origin[1].start, part[1].stop - origin[1].start))

    ys = [(r, part) for r, cut in enumerate(rows) if (part := meet(cut, window[0]))]
    xs = [(c, part) for c, cut in enumerate(cols) if (part := meet(cut, window[1]))]
    found = []
    for r, py in ys:
        for c, px in xs:
            j = r * len(cols) + c
            found.append((j, local((py, px), window), local((py, px), windows[j])))
    return found


def run_tiled(stages: Stages, x: np.ndarray, out: np.ndarray, tile: int, progress: bool | None = False) -> None:
    """Run the stages on 1x3xHxW float32 planes tile by tile, writing the result into out ((sH)x(sW)x3, any dtype).

    Peak memory is two feature windows per tile plus the working set of stages.parallel tiles (and the inputs
    and outputs of as many more, started and waiting for a stream).
    progress=None shows a bar only on a terminal.
    """
    from tqdm import tqdm

    _, _, h, w = x.shape
    x = stages.prepare(x)
    s = stages.scale
    rows, cols = cuts(h, tile), cuts(w, tile)
    boxes = [(ys, xs) for ys in rows for xs in cols]
    span = (max(ys.stop - ys.start for ys in rows), max(xs.stop - xs.start for xs in cols))
    windows, inners = zip(*(grow(box, BLOCK_HALO, h, w, span) for box in boxes))
    rims = [[piece for piece in pieces(window, rows, cols, windows) if piece[0] != i] for i, window in enumerate(windows)]
    side = (windows[0][0].stop - windows[0][0].start, windows[0][1].stop - windows[0][1].start)  # one shape for all
    cur, nxt = [stages.features(*side) for _ in boxes], [stages.features(*side) for _ in boxes]
    bar = tqdm(total=len(boxes) * (2 + stages.blocks), unit="tile", leave=False,
               disable=None if progress is None else not progress)
    started: deque[Waiting] = deque()

    def waited() -> Any:
        result = started.popleft()()
        bar.update()
        return result

    def each(start: Callable[[int], Waiting]) -> Iterator[Any]:
        """start every tile, keeping up to twice stages.parallel started at once; their results in tile order."""
        for i in range(len(boxes)):
            started.append(start(i))
            if len(started) >= 2 * stages.parallel:
                yield waited()
        while started:
            yield waited()

    def summed(parts: Iterable[np.ndarray | None]) -> np.ndarray:
        total = np.zeros(stages.channels, dtype=np.float64)
        for part in parts:
            if part is not None:
                total += part
        return total

    def filled(maps: list, i: int) -> Any:
        """Tile i's window of maps, its rim filled from the interiors of the tiles it overlaps."""
        for j, here, there in rims[i]:
            maps[i][:, :, here[0], here[1]] = maps[j][:, :, there[0], there[1]]
        return maps[i]

    def head(i: int) -> Waiting:
        window = windows[i]
        return stages.head(x[:, :, window[0], window[1]], inners[i], cur[i])

    def tail(i: int) -> Waiting:
        window, inner = grow(boxes[i], TAIL_HALO, h, w, span)
        trunk = stages.features(window[0].stop - window[0].start, window[1].stop - window[1].start)
        for j, here, there in pieces(window, rows, cols, windows):
            trunk[:, :, here[0], here[1]] = cur[j][:, :, there[0], there[1]]
        iy, ix = scaled(inner, s)
        ys, xs = scaled(boxes[i], s)
        return stages.tail(x[:, :, window[0], window[1]], trunk, lambda sr: write_planes(sr[:, :, iy, ix], out[ys, xs]))

    try:
        total = summed(each(head))
        for k in range(stages.blocks):
            pooled = (total / (h * w)).astype(np.float32)[None]

            def block(i: int) -> Waiting:
                return stages.block(k, filled(cur, i), pooled, inners[i], nxt[i])

            total = summed(each(block))
            cur, nxt = nxt, cur
        nxt = None  # free one set of windows before the reconstruction
        for _ in each(tail):
            pass
    finally:
        while started:  # an error: let the calls still running end before their arrays go
            try:
                started.popleft()()
            except Exception:
                pass
        bar.close()
