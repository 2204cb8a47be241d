"""Reading and writing A2N weights: official checkpoints (.pt/.pth) and our safetensors files.

Foreign formats are converted here, at the edge, so the model never knows about them.
"""

from __future__ import annotations

from a2n import A2NError, shipped_weights_path

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from a2n.model import A2N

WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model", "model_state_dict", "net")


class WeightsError(A2NError):
    """A weights file that cannot be read or does not fit the requested model."""


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict and metadata in a file; unwraps training wrappers and a `module.` prefix."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    if path.stat().st_size == 0:
        raise WeightsError(f"{path}: the file is empty; download or copy it again")
    metadata: dict[str, str] = {}
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"{path}: not a readable safetensors file ({exc}); it may be truncated") from exc
    else:
        try:
            obj: Any = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for truncated or foreign files
            raise WeightsError(
                f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                "it may be truncated or not a checkpoint"
            ) from exc
        if isinstance(obj, dict) and isinstance(obj.get("config"), dict) and "scale" in obj["config"]:
            # an `a2n train` checkpoint (runs before pixel_range was a key trained on 0..1); the EMA is what validation scored
            metadata = {"format": "a2n-train", "pixel_range": str(float(obj["config"].get("pixel_range", 1.0))), "step": str(obj.get("step")),
                        "scale": str(obj["config"]["scale"]), "variant": str(obj["config"].get("variant", "a2n"))}
            obj = obj["ema"] if isinstance(obj.get("ema"), dict) else obj["model"]
        state = _unwrap(obj, path)
    return _strip_prefix(state), metadata


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        if isinstance(obj, dict):
            inner = next((obj[k] for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], dict)), None)
            if inner is not None:
                obj = inner
                continue
        break
    raise WeightsError(
        f"{path}: no state dict found (expected a dict of tensors, or one under {', '.join(WRAPPER_KEYS)})"
    )


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def describe(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What a state dict itself tells: x4 or not, and the variant."""
    variant = "a2n"
    if any(".attention.attention1." in k for k in state):
        variant = "additive"
    elif state.get("AAB_trunk.0.non_attention.weight") is not None and state["AAB_trunk.0.non_attention.weight"].shape[-1] == 1:
        variant = "a2n-m"
    return {"x4": "upconv2.weight" in state, "variant": variant}


def scale_hint(path: Path, metadata: dict[str, str]) -> int | None:
    """The scale a file declares in its metadata, or in its name (e.g. aan_x3.pt)."""
    if "scale" in metadata:
        return int(metadata["scale"])
    m = re.search(r"(?:^|[^a-z0-9])x([234])(?:[^0-9]|$)", path.stem.lower())
    return int(m.group(1)) if m else None


def load_weights(model: A2N, path: str | os.PathLike) -> dict[str, str]:
    """Load a weights file into the model strictly; returns the file's metadata.

    Official checkpoints (no metadata) work on 0..255, so the model's pixel_range becomes 255.
    """
    path = Path(path)
    state, metadata = read_checkpoint(path)
    info = describe(state)
    wanted = f"x{model.scale} {model.variant}"
    if info["variant"] != model.variant:
        raise WeightsError(f"{path}: holds {info['variant']} weights but {wanted} was requested; pass --variant {info['variant']}")
    if info["x4"] != (model.scale == 4):
        have = "x4" if info["x4"] else "x2 or x3"
        raise WeightsError(f"{path}: holds {have} weights but {wanted} was requested; pass the matching --scale")
    hint = scale_hint(path, metadata)
    if hint is not None and hint != model.scale:
        raise WeightsError(f"{path}: holds x{hint} weights but {wanted} was requested; pass --scale {hint}")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or wrong_shape:
        parts = [f"{len(items)} {what} (e.g. {items[0]})" for what, items in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong_shape)) if items]
        raise WeightsError(f"{path}: does not fit {wanted}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    model.pixel_range = file_pixel_range(metadata)
    return metadata


def _feeds_sigmoid_or_softmax(key: str) -> bool:
    """1x1 convs before a sigmoid and the ADM's first layer: their outputs must not scale with the range."""
    return any(part in key for part in (".attention.k2.", "att1.conv.", "att2.conv.", ".ADM.0."))


def convert_pixel_range(state: dict[str, torch.Tensor], variant: str, old: float, new: float) -> dict[str, torch.Tensor]:
    """The same network for pixels in 0..new instead of 0..old (an exact rewrite, up to rounding).

    Features scale with the range, so biases scale by new/old; the layers whose outputs feed a
    sigmoid or the ADM's softmax must not, so their weights scale by old/new and their biases stay.
    """
    if old == new:
        return dict(state)
    if variant == "additive":
        raise WeightsError("the additive variant adds a sigmoid to a feature map, so it cannot be converted between "
                           "pixel ranges exactly; retrain it in the range you want")
    factor = new / old
    out = {}
    for key, value in state.items():
        if _feeds_sigmoid_or_softmax(key):
            out[key] = value / factor if key.endswith("weight") else value.clone()
        else:
            out[key] = value * factor if key.endswith("bias") else value.clone()
    return out


def save_weights(model: A2N, path: str | os.PathLike, **metadata: Any) -> None:
    """Write the model as safetensors with metadata (scale, variant, pixel range, recipe), atomically."""
    path = Path(path)
    meta = {"format": "a2n", "scale": str(model.scale), "variant": model.variant, "pixel_range": str(model.pixel_range)}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes files private; weights and checkpoints are ordinary files
    try:
        save_file(state, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_pixel_range(metadata: dict[str, str]) -> float:
    """The pixel range a file's weights expect: recorded in ours, 255 for official files (no metadata)."""
    return float(metadata.get("pixel_range", 255.0 if not metadata else 1.0))


def convert_file(src: str | os.PathLike, dst: str | os.PathLike, pixel_range: float, scale: int | None = None) -> A2N:
    """Write `src` as safetensors for pixels in 0..pixel_range; the network's outputs stay the same."""
    src, dst = Path(src), Path(dst)
    state, metadata = read_checkpoint(src)
    info = describe(state)
    scale = scale or scale_hint(src, metadata) or (4 if info["x4"] else None)
    if scale is None:
        raise WeightsError(f"{src}: x2 and x3 weights look alike and the file does not say which it is; pass --scale")
    model = A2N(scale=scale, variant=info["variant"], pixel_range=pixel_range)
    model.load_state_dict(convert_pixel_range(state, info["variant"], file_pixel_range(metadata), pixel_range))
    kept = {k: v for k, v in metadata.items() if k not in ("format", "scale", "variant", "pixel_range")}
    kept["converted_from"] = f"{src.name} (pixel range {file_pixel_range(metadata):g})"
    save_weights(model, dst, **kept)
    return model.eval()


def build_model(scale: int, variant: str = "a2n", weights: str | os.PathLike | None = None) -> A2N:
    """A model for (scale, variant) with the given weights, or the shipped ones when None.

    Raises WeightsError when no weights are given and none are shipped for this combination.
    """
    model = A2N(scale=scale, variant=variant)  # type: ignore[arg-type]
    if weights is None:
        weights = shipped_weights_path(scale, variant)
        if weights is None:
            raise WeightsError(f"no shipped weights for {variant} x{scale}; pass --weights FILE")
    load_weights(model, weights)
    return model.eval()
