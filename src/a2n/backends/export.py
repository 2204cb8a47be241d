"""Exporting the model for ONNX Runtime and OpenVINO: the whole-image forward, and the tiled path's stages.

Both are ONNX with dynamic height and width, fp32; a runtime casts to the precision it is asked
for. `a2n export` writes one for the user; the cache folder keeps one per weights for the runtimes.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from a2n import A2NError
from a2n.backends.cache import cache_dir, read_table, weights_key
from a2n.backends.runtimes import BackendError, onnxruntime_runner, openvino_core, openvino_runner, require, torch_runner

if TYPE_CHECKING:
    from a2n.model import A2N

FORMATS: tuple[str, ...] = ("onnx", "openvino")
EXPORT_TOLERANCE = 1e-4
OPSET = 17
STAGES_FORMAT = 4  # stages.json's format: 2 since the head and the blocks sum the next entry themselves, 3 channels-last maps, 4 sums by matmul
READABLE_FORMATS = (3, 4)  # 4 differs from 3 only inside the sums' graphs, so INT8 stages made at 3 still run


class ExportError(A2NError):
    """An export whose output differs from the torch forward, or a path it cannot write."""


def export_onnx(model: A2N, path: str | os.PathLike) -> Path:
    """Write the whole-image forward as ONNX (fp32, input `lr` 1x3xHxW in 0..1, dynamic H and W)."""
    import warnings

    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shadow = copy.deepcopy(model).cpu().float().eval()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            shadow, (torch.rand(1, 3, 16, 16),), str(tmp), dynamo=False, opset_version=OPSET,
            input_names=["lr"], output_names=["sr"],
            dynamic_axes={"lr": {2: "height", 3: "width"}, "sr": {2: "out_height", 3: "out_width"}},
        )
    os.replace(tmp, path)
    return path


def export_openvino(model: A2N, path: str | os.PathLike) -> Path:
    """Write the whole-image forward as OpenVINO IR (path.xml and path.bin, fp32 weights)."""
    ov = require("openvino")
    path = Path(path).with_suffix(".xml")
    onnx_path = export_onnx(model, path.with_suffix(".onnx"))
    ov.save_model(openvino_core().read_model(str(onnx_path)), str(path), compress_to_fp16=False)
    onnx_path.unlink()
    return path


def export(model: A2N, fmt: str, path: str | os.PathLike) -> tuple[Path, float]:
    """Export to onnx or openvino and check it against torch; returns the file and the max abs diff."""
    if fmt not in FORMATS:
        raise BackendError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = export_onnx(model, path) if fmt == "onnx" else export_openvino(model, path)
    diff = verify(model, out)
    if diff > EXPORT_TOLERANCE:
        raise ExportError(f"{out}: the exported model differs from torch by {diff:.2e} (more than {EXPORT_TOLERANCE:g})")
    return out, diff


def verify(model: A2N, path: str | os.PathLike, sizes: tuple[tuple[int, int], ...] = ((24, 20), (13, 31))) -> float:
    """Max abs difference (0..1 scale) between an exported file and the torch forward, over several sizes."""
    import torch

    path = Path(path)
    runner = openvino_runner(path, "fp32") if path.suffix == ".xml" else onnxruntime_runner(path, "fp32")
    ref = torch_runner(model, "fp32")
    gen = torch.Generator().manual_seed(0)
    return max(float((runner(x) - ref(x)).abs().max()) for x in (torch.rand(1, 3, h, w, generator=gen) for h, w in sizes))


def cached_onnx(model: A2N) -> Path:
    """The model's ONNX file in the cache folder, exported (and verified) on first use."""
    path = cache_dir() / f"a2n_x{model.scale}_{weights_key(model)}.onnx"
    if not path.is_file():
        export_onnx(model, path)
    return path


def export_stages(model: A2N, folder: str | os.PathLike) -> Path:
    """Write the stages of the tiled forward as ONNX (fp32, dynamic height and width) into a folder.

    head.onnx (lr, rows, cols -> fea, sum), block00.onnx .. (part, pooled, rows, cols -> part, sum;
    the last block has no rows, cols or sum) and tail.onnx (lr, trunk -> sr); sum is the next block's
    entry summed over the rows x cols masks (model.entry_sum). Images are 1 x 3 x H x W, feature
    maps (fea, part, out, trunk) channels-last, 1 x H x W x C (a2n.model says why, above HeadStage).
    """
    import shutil
    import warnings

    import torch

    from a2n.model import BlockStage, HeadStage, TailStage

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    shadow = copy.deepcopy(model).cpu().float().eval()
    nf, n = shadow.conv_first.out_channels, len(shadow.blocks)
    image, maps = {2: "height", 3: "width"}, {1: "height", 2: "width"}
    spatial = {"rows": {0: "height"}, "cols": {0: "width"}}
    x, fea, masks = torch.rand(1, 3, 16, 16), torch.rand(1, 16, 16, nf), (torch.ones(16), torch.ones(16))
    graphs = [(HeadStage(shadow), (x, *masks), "head", ["lr", "rows", "cols"], ["fea", "sum"], {"lr": image, "fea": maps, **spatial}),
              (TailStage(shadow), (x, fea), "tail", ["lr", "trunk"], ["sr"], {"lr": image, "trunk": maps, "sr": image})]
    for k, block in enumerate(shadow.blocks):
        if k + 1 < n:
            graphs.append((BlockStage(block, shadow.blocks[k + 1]), (fea, torch.rand(1, nf), *masks), f"block{k:02d}",
                           ["part", "pooled", "rows", "cols"], ["out", "sum"], {"part": maps, "out": maps, **spatial}))
        else:
            graphs.append((BlockStage(block), (fea, torch.rand(1, nf)), f"block{k:02d}", ["part", "pooled"], ["out"],
                           {"part": maps, "out": maps}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module, inputs, name, input_names, output_names, axes in graphs:
            torch.onnx.export(module, inputs, str(tmp / f"{name}.onnx"), dynamo=False, opset_version=OPSET,
                              input_names=input_names, output_names=output_names, dynamic_axes=axes)
    meta = {"format": STAGES_FORMAT, "scale": shadow.scale, "channels": nf, "blocks": n}
    (tmp / "stages.json").write_text(json.dumps(meta))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process exported the same weights first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def stages_ready(folder: Path) -> bool:
    """Whether folder holds stages that this version runs (older formats are remade; the cache's exports are
    in folders named by STAGES_FORMAT, so they are made at the newest)."""
    return read_table(folder / "stages.json").get("format") in READABLE_FORMATS


def stages_folder(model: A2N) -> Path:
    """Where the model's exported stages live in the cache folder."""
    return cache_dir() / f"a2n_x{model.scale}_{weights_key(model)}_stages{STAGES_FORMAT}"
