"""Running a model on images: exact tiled inference in bounded memory, and the Python API.

A2N's attention-dropout module averages each block's features over the whole image, so cutting
the image into independent tiles changes the result. Here the trunk runs block by block over
the whole LR feature map instead: a first pass over tiles sums the block's pointwise entry
features (so the pooled mean is exact), a second pass runs the rest of the block on tiles grown
by the block's receptive radius and keeps only their interiors. The reconstruction is local, so
it runs on tiles with a halo too and writes straight into the output array. A tiled run equals
the whole-image forward up to float rounding.
"""

from __future__ import annotations

from a2n import A2NError

import math
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from a2n import memory
from a2n import pixels as pixels_mod
from a2n.model import A2N
from a2n.pixels import ImageInputError, from_planes, to_planes

if TYPE_CHECKING:
    from a2n.io import Picture

Box = tuple[slice, slice]

BLOCK_HALO = 2  # an AAB block reaches 2 LR pixels: a 3x3 conv after a 3x3 conv in its attention branch
TAIL_HALO = 3  # head and trunk_conv (1) + the reconstruction's convs (at most 2 LR pixels at x2, x3, x4)
MAX_TILE = 256  # larger tiles are not faster on a CPU (the halo costs under 5% here), only bigger
MIN_TILE = 32


class MemoryBudgetError(A2NError):
    """The image cannot be processed within the allowed memory, even with the smallest tiles."""


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8, uint16 or float (0..1) array -> 1x3xHxW float32 tensor in 0..1."""
    return torch.from_numpy(to_planes(img))


def to_uint8(t: torch.Tensor) -> np.ndarray:
    """1x3xHxW tensor in 0..1 -> HxWx3 uint8 array, rounded and clipped."""
    return to_array(t, np.uint8)


def to_array(t: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    """1x3xHxW tensor in 0..1 -> HxWx3 array of dtype: uint8 and uint16 rounded, floats clipped to 0..1."""
    return from_planes(t.detach().float().cpu().numpy(), dtype)


@torch.inference_mode()
def forward(model: A2N, x: torch.Tensor) -> torch.Tensor:
    """Whole-image forward in fp32, channels_last (about 2x faster than NCHW on a CPU)."""
    p = next(model.parameters())
    x = x.to(p.device, torch.float32).contiguous(memory_format=torch.channels_last)
    return model(x).contiguous()


def upscale_uint8(model: A2N, img: np.ndarray) -> np.ndarray:
    """Super-resolve one HxWx3 uint8 image with a whole-image forward."""
    return to_uint8(forward(model, to_tensor(img)).cpu())


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes the device can give now: free GPU memory, or MemAvailable of the system."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return memory.available_memory()


def plan_tile(
    height: int, width: int, model: A2N, max_memory: float | None = None, out_itemsize: int = 1, backend: str = "torch"
) -> int | None:
    """Tile side (input pixels) that keeps peak memory under max_memory GiB; None means one whole-image forward.

    max_memory defaults to half of the memory available now; backend is where a whole-image forward
    would run (they differ in memory). Counts the two LR feature maps of the tiled trunk, the input
    and the output array, and the working set of one tile.
    """
    p = next(model.parameters())
    budget = memory.budget_bytes(max_memory, None if max_memory is not None else available_memory(p.device))
    s2 = model.scale**2
    if memory.forward_bytes(height, width, model.scale, backend) <= budget:
        return None
    nf = model.conv_first.out_channels
    fixed = height * width * (2 * nf * 4 + 3 * 4 + 3 * s2 * out_itemsize)
    tile = int(math.sqrt(max(budget - fixed, 0) / (memory.TILE_BYTES_PER_OUT_PIXEL * s2))) - 2 * TAIL_HALO
    if tile < MIN_TILE:
        need = (fixed + memory.TILE_BYTES_PER_OUT_PIXEL * s2 * (MIN_TILE + 2 * TAIL_HALO) ** 2) / 2**30
        raise MemoryBudgetError(
            f"a {width}x{height} image at x{model.scale} needs about {need:.1f} GiB "
            f"but the budget is {budget / 2**30:.1f} GiB; raise --max-memory or split the image"
        )
    return min(tile, MAX_TILE)


def _tiles(height: int, width: int, tile: int) -> list[Box]:
    """The tile grid over an image: row-major boxes of at most tile x tile pixels."""
    return [
        (slice(y, min(y + tile, height)), slice(x, min(x + tile, width)))
        for y in range(0, height, tile)
        for x in range(0, width, tile)
    ]


def _grow(box: Box, halo: int, height: int, width: int) -> tuple[Box, Box]:
    """The box grown by halo (clipped to the image) and where the original box lies inside it."""
    ys, xs = box
    y0, x0 = max(ys.start - halo, 0), max(xs.start - halo, 0)
    grown = (slice(y0, min(ys.stop + halo, height)), slice(x0, min(xs.stop + halo, width)))
    inner = (slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0))
    return grown, inner


def _at(t: torch.Tensor, box: Box) -> torch.Tensor:
    return t[:, :, box[0], box[1]]


def _scaled(box: Box, s: int) -> Box:
    return slice(box[0].start * s, box[0].stop * s), slice(box[1].start * s, box[1].stop * s)


@torch.inference_mode()
def forward_tiled(model: A2N, x: torch.Tensor, out: np.ndarray, tile: int, progress: bool | None = False) -> None:
    """Run the model on a 1x3xHxW tensor tile by tile, writing the result into out ((sH)x(sW)x3).

    Equals the whole-image forward: each block's pooled mean is summed over all tiles first, and
    every local step runs on tiles grown by its receptive radius. Peak memory is two LR feature
    maps plus one tile's working set. progress=None shows a bar only on a terminal.
    """
    p = next(model.parameters())
    x = x.to(p.device, torch.float32).contiguous(memory_format=torch.channels_last)
    _, _, h, w = x.shape
    s, nf = model.scale, model.conv_first.out_channels
    boxes = _tiles(h, w, tile)
    blocks = list(model.AAB_trunk)
    bar = tqdm(total=len(boxes) * (2 + 2 * len(blocks)), unit="tile", leave=False, disable=None if progress is None else not progress)
    cur = torch.empty(1, nf, h, w, device=p.device, memory_format=torch.channels_last)
    nxt = torch.empty_like(cur)
    for box in boxes:
        grown, inner = _grow(box, 1, h, w)
        _at(cur, box).copy_(_at(model.head(_at(x, grown)), inner))
        bar.update()
    for block in blocks:
        total = torch.zeros(nf, dtype=torch.float64, device=p.device)
        for box in boxes:
            total += block.entry(_at(cur, box)).sum(dim=(0, 2, 3), dtype=torch.float64)
            bar.update()
        pooled = (total / (h * w)).float().unsqueeze(0)
        for box in boxes:
            grown, inner = _grow(box, BLOCK_HALO, h, w)
            part = _at(cur, grown)
            _at(nxt, box).copy_(_at(block.mix(part, block.entry(part), pooled), inner))
            bar.update()
        cur, nxt = nxt, cur
    del nxt
    for box in boxes:
        grown, inner = _grow(box, TAIL_HALO, h, w)
        part = _at(x, grown)
        res = model.reconstruct(model.head(part) + model.trunk_conv(_at(cur, grown)))
        if model.pixel_range != 1.0:
            res = res / model.pixel_range
        sr = res + F.interpolate(part, scale_factor=s, mode="bilinear", align_corners=False)
        ys, xs = _scaled(box, s)
        out[ys, xs] = to_array(_at(sr, _scaled(inner, s)), out.dtype)
        bar.update()
    bar.close()


def upscale_array(
    model: A2N,
    rgb: np.ndarray,
    tile: int | None = None,
    max_memory: float | None = None,
    progress: bool | None = False,
    backend: str = "torch",
    precision: str = "fp32",
) -> np.ndarray:
    """Super-resolve an HxWx3 RGB array (uint8, uint16 or float in 0..1); returns the same dtype.

    tile is the tile side in input pixels; by default it is chosen from max_memory (GiB), and an
    image that fits is run whole. The result is the same either way. backend and precision pick
    the whole-image forward (a2n.backends); tiles always run on torch in fp32, exactly.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ImageInputError(f"expected an HxWx3 RGB array, got shape {rgb.shape}")
    h, w = rgb.shape[:2]
    if tile is not None and tile < 1:
        raise ImageInputError(f"the tile size must be a positive number of pixels, got {tile}")
    from a2n.backends import get_runner, resolve

    backend, precision = resolve(model, backend, precision)
    if tile is None:
        tile = plan_tile(h, w, model, max_memory, rgb.dtype.itemsize, backend)
    if tile is None or tile >= max(h, w):
        return to_array(get_runner(model, backend, precision)(to_tensor(rgb)), rgb.dtype)
    out = np.empty((h * model.scale, w * model.scale, 3), dtype=rgb.dtype)
    forward_tiled(model, to_tensor(rgb), out, tile, progress)
    return out


def upscale_pixels(
    model: A2N,
    pixels: np.ndarray,
    tile: int | None = None,
    max_memory: float | None = None,
    progress: bool | None = False,
    backend: str = "torch",
    precision: str = "fp32",
) -> np.ndarray:
    """Super-resolve HxW (gray), HxWx1, HxWx2 (gray+alpha), HxWx3 (RGB) or HxWx4 (RGBA) pixels.

    Gray runs as RGB and comes back as the mean of the three outputs; alpha is upscaled
    separately with bicubic and re-attached (a2n.pixels). Keeps the dtype.
    """
    return pixels_mod.upscale_pixels(
        pixels, model.scale, lambda rgb: upscale_array(model, rgb, tile, max_memory, progress, backend, precision))


def load_model(scale: int = 4, variant: str = "a2n", weights: str | os.PathLike | None = None, device: str | torch.device | None = None) -> A2N:
    """A ready-to-run model: the shipped weights for (scale, variant) unless weights names a file."""
    from a2n.weights import build_model

    model = build_model(scale, variant, weights)
    return model.to(device if device is not None else "cpu").eval()


def upscale(
    image: Any,
    model: A2N | None = None,
    scale: int | None = None,
    tile: int | None = None,
    max_memory: float | None = None,
    backend: str = "torch",
    precision: str = "fp32",
) -> Any:
    """Super-resolve a PIL image, a numpy array or a torch tensor and return the same kind.

    Arrays are HxW or HxWxC (uint8, uint16, or float in 0..1); tensors are CxHxW or NxCxHxW
    (float in 0..1, or uint8). Without a model, the shipped weights for scale (default 4) are
    loaded; with one, scale may be left out or must match it. tile and max_memory (GiB) as in
    upscale_array; the output is the same for every tile size. backend (auto, torch, onnxruntime,
    openvino) and precision (fp32, bf16, fp16) pick the whole-image forward, as in a2n.backends.
    """
    if model is None:
        model = load_model(scale or 4)
    elif scale is not None and scale != model.scale:
        raise ImageInputError(f"scale={scale} was asked for but the model is x{model.scale}; leave scale out or load an x{scale} model")
    if isinstance(image, np.ndarray):
        return upscale_pixels(model, image, tile, max_memory, False, backend, precision)
    if isinstance(image, torch.Tensor):
        return _upscale_tensor(model, image, tile, max_memory, backend, precision)
    from PIL import Image

    if isinstance(image, Image.Image):
        from a2n import io

        return io.to_pil(upscale_picture(model, io.from_pil(image), tile, max_memory, False, backend, precision))
    raise ImageInputError(f"cannot upscale a {type(image).__name__}; pass a PIL image, a numpy array or a torch tensor")


def _upscale_tensor(model: A2N, t: torch.Tensor, tile: int | None, max_memory: float | None, backend: str, precision: str) -> torch.Tensor:
    if t.ndim not in (3, 4) or t.shape[-3] not in (1, 2, 3, 4):
        raise ImageInputError(f"expected a CxHxW or NxCxHxW tensor with C in 1..4, got shape {tuple(t.shape)}")
    if t.dtype != torch.uint8 and not t.dtype.is_floating_point:
        raise ImageInputError(f"tensors must be float (0..1) or uint8, got {t.dtype}")
    batch = t.unsqueeze(0) if t.ndim == 3 else t
    outs = []
    for img in batch:
        hwc = img.detach().permute(1, 2, 0).cpu().float().numpy() if t.dtype != torch.uint8 else img.permute(1, 2, 0).cpu().numpy()
        outs.append(torch.from_numpy(upscale_pixels(model, hwc, tile, max_memory, False, backend, precision)).permute(2, 0, 1))
    out = torch.stack(outs).to(t.device, t.dtype)
    return out[0] if t.ndim == 3 else out


def upscale_picture(
    model: A2N,
    picture: Picture,
    tile: int | None = None,
    max_memory: float | None = None,
    progress: bool | None = False,
    backend: str = "torch",
    precision: str = "fp32",
) -> Picture:
    """Super-resolve a decoded picture: pixels, alpha, and its DPI (scaled so the print size stays)."""
    return pixels_mod.upscale_picture(
        picture, model.scale, lambda rgb: upscale_array(model, rgb, tile, max_memory, progress, backend, precision))
