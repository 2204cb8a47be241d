"""Running a model on images: the Python API, whole-image or exactly tiled (a2n.tiling) in bounded memory.

Both paths run on the backend and at the precision asked for (a2n.backends; `auto` for both by
default, the same defaults as `a2n upscale` and the server). At fp32 the tiled path equals the
whole-image forward within 1e-4; at bf16 it is as close to the fp32 output as the whole bf16 image is.
ensemble=True (A2N+, self_ensemble) averages the outputs for the 8 flips and rotations: 8x the time.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from a2n import backends, memory, tiling
from a2n import pixels as pixels_mod
from a2n.model import A2N
from a2n.pixels import ImageInputError, from_planes, to_planes

if TYPE_CHECKING:
    from a2n.io import Picture

DEFAULT_BACKEND = backends.DEFAULT_BACKEND
DEFAULT_PRECISION = backends.DEFAULT_PRECISION


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
    height: int, width: int, model: A2N, max_memory: float | None = None, out_itemsize: int = 1, backend: str = "torch",
    whole: bool = True,
) -> int | None:
    """Tile side (input pixels) within max_memory GiB for this model (None: one whole-image forward); see tiling.plan_tile.

    Without max_memory the budget is half of what the model's device (GPU or system) has free now.
    """
    available = None if max_memory is not None else available_memory(next(model.parameters()).device)
    return tiling.plan_tile(height, width, model.scale, model.conv_first.out_channels, max_memory, out_itemsize, backend,
                            available, whole)


def forward_tiled(model: A2N, x: torch.Tensor, out: np.ndarray, tile: int, progress: bool | None = False,
                  backend: str = "torch", precision: str = "fp32") -> None:
    """Run the model on a 1x3xHxW tensor tile by tile on backend at precision, writing the result into out ((sH)x(sW)x3).

    At fp32 equals the whole-image forward (a2n.tiling); progress=None shows a bar only on a terminal.
    """
    stages = backends.get_stages(model, backend, precision)
    with torch.inference_mode():
        tiling.run_tiled(stages, x.detach().float().cpu().contiguous().numpy(), out, tile, progress)


def self_ensemble(upscale_rgb: Callable[[np.ndarray], np.ndarray], rgb: np.ndarray) -> np.ndarray:
    """A2N+: the mean of upscale_rgb over the 8 flips and rotations of rgb, each turned back, in float32, rounded to rgb's dtype once."""
    x = to_planes(rgb)[0].transpose(1, 2, 0)  # HxWx3 float32 in 0..1, whatever rgb's dtype
    total: np.ndarray | None = None
    for flipped in (False, True):
        source = x[:, ::-1] if flipped else x
        for turns in range(4):
            back = np.rot90(upscale_rgb(np.ascontiguousarray(np.rot90(source, turns))), -turns)
            back = back[:, ::-1] if flipped else back
            total = back.astype(np.float32) if total is None else np.add(total, back, out=total)
    return from_planes((total / np.float32(8)).transpose(2, 0, 1)[None], rgb.dtype)


def upscale_array(
    model: A2N,
    rgb: np.ndarray,
    tile: int | None = None,
    max_memory: float | None = None,
    progress: bool | None = False,
    backend: str = DEFAULT_BACKEND,
    precision: str = DEFAULT_PRECISION,
    ensemble: bool = False,
) -> np.ndarray:
    """Super-resolve an HxWx3 RGB array (uint8, uint16 or float in 0..1); returns the same dtype.

    tile is the tile side in input pixels; by default it is chosen from max_memory (GiB), and an
    image that fits is run whole unless it is big enough that tiles run faster (memory.runs_whole).
    The result is the same either way (at bf16, as close to fp32).
    backend and precision pick where it runs (a2n.backends; auto: the fastest choice that costs at
    most 0.02 dB); tiles run at the same precision on that backend (auto: the fastest on tiles).
    ensemble=True (A2N+) runs each of the 8 flips and rotations this way and averages them (self_ensemble): 8x the time.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ImageInputError(f"expected an HxWx3 RGB array, got shape {rgb.shape}")
    h, w = rgb.shape[:2]
    if tile is not None and tile < 1:
        raise ImageInputError(f"the tile size must be a positive number of pixels, got {tile}")
    if ensemble:
        return self_ensemble(lambda t: upscale_array(model, t, tile, max_memory, progress, backend, precision), rgb)
    whole, whole_precision = backends.resolve(model, backend, precision)
    available = None if max_memory is not None else available_memory(next(model.parameters()).device)
    if (memory.runs_whole(h, w, model.scale, whole, max_memory, available) if tile is None else tile >= max(h, w)):
        return to_array(backends.get_runner(model, whole, whole_precision)(to_tensor(rgb)), rgb.dtype)
    tiled, precision = backends.resolve_tiled(model, backend, precision)  # auto: the fastest backend on tiles, maybe another
    if tile is None:  # within the budget on the backend the tiles run on
        tile = plan_tile(h, w, model, max_memory, rgb.dtype.itemsize, tiled, whole=False)
    out = np.empty((h * model.scale, w * model.scale, 3), dtype=rgb.dtype)
    forward_tiled(model, to_tensor(rgb), out, tile, progress, tiled, precision)
    return out


def upscale_pixels(
    model: A2N,
    pixels: np.ndarray,
    tile: int | None = None,
    max_memory: float | None = None,
    progress: bool | None = False,
    backend: str = DEFAULT_BACKEND,
    precision: str = DEFAULT_PRECISION,
    ensemble: bool = False,
) -> np.ndarray:
    """Super-resolve HxW (gray), HxWx1, HxWx2 (gray+alpha), HxWx3 (RGB) or HxWx4 (RGBA) pixels.

    Gray runs as RGB and comes back as the mean of the three outputs; alpha is upscaled
    separately with bicubic and re-attached (a2n.pixels). Keeps the dtype. ensemble as in upscale_array.
    """
    return pixels_mod.upscale_pixels(
        pixels, model.scale, lambda rgb: upscale_array(model, rgb, tile, max_memory, progress, backend, precision, ensemble))


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
    backend: str = DEFAULT_BACKEND,
    precision: str = DEFAULT_PRECISION,
    ensemble: bool = False,
) -> Any:
    """Super-resolve a PIL image, a numpy array or a torch tensor and return the same kind.

    Arrays are HxW or HxWxC (uint8, uint16, or float in 0..1); tensors are CxHxW or NxCxHxW
    (float in 0..1, or uint8). Without a model, the shipped weights for scale (default 4) are
    loaded; with one, scale may be left out or must match it. tile and max_memory (GiB) as in
    upscale_array; the output is the same for every tile size. backend (auto by default, as for
    `a2n upscale`: the fastest installed runtime, timed once; or torch, onnxruntime, openvino) and
    precision (auto by default: the fastest that costs at most 0.02 dB against ground truth; or fp32,
    bf16, fp16) pick where it runs, as in a2n.backends. ensemble=True (A2N+) averages the outputs for
    the 8 flips and rotations of the image: a little more accurate, 8x the time.
    """
    if model is None:
        model = load_model(scale or 4)
    elif scale is not None and scale != model.scale:
        raise ImageInputError(f"scale={scale} was asked for but the model is x{model.scale}; leave scale out or load an x{scale} model")
    if isinstance(image, np.ndarray):
        return upscale_pixels(model, image, tile, max_memory, False, backend, precision, ensemble)
    if isinstance(image, torch.Tensor):
        return _upscale_tensor(model, image, tile, max_memory, backend, precision, ensemble)
    from PIL import Image

    if isinstance(image, Image.Image):
        from a2n import io

        return io.to_pil(upscale_picture(model, io.from_pil(image), tile, max_memory, False, backend, precision, ensemble))
    raise ImageInputError(f"cannot upscale a {type(image).__name__}; pass a PIL image, a numpy array or a torch tensor")


def _upscale_tensor(model: A2N, t: torch.Tensor, tile: int | None, max_memory: float | None, backend: str, precision: str,
                    ensemble: bool = False) -> torch.Tensor:
    if t.ndim not in (3, 4) or t.shape[-3] not in (1, 2, 3, 4):
        raise ImageInputError(f"expected a CxHxW or NxCxHxW tensor with C in 1..4, got shape {tuple(t.shape)}")
    if t.dtype != torch.uint8 and not t.dtype.is_floating_point:
        raise ImageInputError(f"tensors must be float (0..1) or uint8, got {t.dtype}")
    batch = t.unsqueeze(0) if t.ndim == 3 else t
    outs = []
    for img in batch:
        hwc = img.detach().permute(1, 2, 0).cpu().float().numpy() if t.dtype != torch.uint8 else img.permute(1, 2, 0).cpu().numpy()
        outs.append(torch.from_numpy(upscale_pixels(model, hwc, tile, max_memory, False, backend, precision, ensemble)).permute(2, 0, 1))
    out = torch.stack(outs).to(t.device, t.dtype)
    return out[0] if t.ndim == 3 else out


def upscale_picture(
    model: A2N,
    picture: Picture,
    tile: int | None = None,
    max_memory: float | None = None,
    progress: bool | None = False,
    backend: str = DEFAULT_BACKEND,
    precision: str = DEFAULT_PRECISION,
    ensemble: bool = False,
) -> Picture:
    """Super-resolve a decoded picture: pixels, alpha, and its DPI (scaled so the print size stays); ensemble as in upscale_array."""
    return pixels_mod.upscale_picture(
        picture, model.scale, lambda rgb: upscale_array(model, rgb, tile, max_memory, progress, backend, precision, ensemble))
