"""Attention analysis of A2N as in the paper: heatmaps, high-pass correlation, attention dropout,
branch weights, and Local Attribution Maps (Gu and Dong, CVPR 2021).

The functions here return numbers; the ``plot_*`` functions draw them with matplotlib (Agg).
Blocks are numbered from 1 in every table and figure, as in the paper.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from scipy.stats import spearmanr
from torch import nn

from a2n import A2NError, metrics
from a2n.evaluation import benchmark_pairs
from a2n.inference import to_tensor, to_uint8, upscale_uint8
from a2n.model import A2N

HIGHPASS_SIGMA = 1.0
LAM_SIGMA = 5.0
LAM_STEPS = 50
INERT_MARGIN = 0.01  # ADMs whose pi_attn stays this close to 0.5 everywhere mix the branches half and half

Pair = tuple[str, np.ndarray, np.ndarray]


class AnalysisError(A2NError):
    """Analysis input that cannot be used: a bad folder, window, channel or option."""


@dataclass
class BlockTrace:
    """What one block saw and produced for one image: its input, attention mask and pi_attn."""

    input: np.ndarray
    mask: np.ndarray
    pi_attn: float


# ---------------------------------------------------------------- data and switches


def load_pairs(data_dir: str | os.PathLike, scale: int, limit: int | None = None) -> list[Pair]:
    """(name, HR, LR) uint8 images of a benchmark folder (HR/ and LR_bicubic/X<s>/), the first `limit`."""
    path = Path(data_dir)
    if not path.is_dir():
        raise AnalysisError(f"{path}: no such folder; pass a benchmark folder holding HR/ and LR_bicubic/X{scale}/")
    if limit is not None and limit < 1:
        raise AnalysisError(f"--limit must be at least 1, got {limit}")
    return list(itertools.islice(benchmark_pairs(path, scale), limit))


@contextmanager
def forced_attention(model: A2N, blocks: Iterable[int], value: float) -> Iterator[None]:
    """Fix pi_attn of the given blocks (0-based) to `value` inside the block (attention dropout); always restores."""
    chosen = [model.blocks[i].branch_weights for i in blocks]
    saved = [b.force_attn for b in chosen]
    try:
        for b in chosen:
            b.force_attn = float(value)
        yield
    finally:
        for b, old in zip(chosen, saved):
            b.force_attn = old


def trace_blocks(model: A2N, lr: np.ndarray) -> tuple[np.ndarray, list[BlockTrace]]:
    """The SR output (uint8) and, per block, its input features, attention mask (C x H x W) and pi_attn."""
    inputs: dict[int, torch.Tensor] = {}
    masks: dict[int, torch.Tensor] = {}
    pis: dict[int, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(model.blocks):
        handles.append(block.register_forward_pre_hook(_keeper(inputs, i)))
        handles.append(block.attention.sigmoid.register_forward_hook(_keeper(masks, i)))
        handles.append(block.branch_weights.register_forward_hook(_keeper(pis, i)))
    try:
        sr = upscale_uint8(model, lr)
    finally:
        for h in handles:
            h.remove()
    traces = [BlockTrace(_numpy(inputs[i]), _numpy(masks[i]), float(pis[i][0, 0])) for i in range(len(model.blocks))]
    return sr, traces


def _keeper(store: dict[int, torch.Tensor], index: int) -> Callable[..., None]:
    """A hook that keeps a module's output (forward hook) or first input (pre-hook) under `index`."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor | None = None) -> None:
        store[index] = args[0] if output is None else output

    return hook


def _numpy(t: torch.Tensor) -> np.ndarray:
    """The first image of a batch as a float32 numpy array."""
    return t[0].detach().float().cpu().contiguous().numpy()


# ---------------------------------------------------------------- 1. heatmaps


def heatmap(model: A2N, lr: np.ndarray, channel: int | None = None) -> dict[str, Any]:
    """Per block: the mask (mean over channels, or one channel), the block input's channel mean, and stats."""
    _, traces = trace_blocks(model, lr)
    n_channels = traces[0].mask.shape[0]
    if channel is not None and not 0 <= channel < n_channels:
        raise AnalysisError(f"--channel {channel} is out of range; the attention masks have channels 0..{n_channels - 1}")
    shown = [t.mask.mean(axis=0) if channel is None else t.mask[channel] for t in traces]
    rows = []
    for i, (t, mask) in enumerate(zip(traces, shown)):
        per_channel = t.mask.mean(axis=(1, 2))
        rows.append({
            "block": i + 1,
            "shown_mean": float(mask.mean()),
            "mask_mean": float(t.mask.mean()),
            "mask_std": float(t.mask.std()),
            "pi_attn": t.pi_attn,
            "most_enhanced_channel": int(per_channel.argmax()),
            "most_suppressed_channel": int(per_channel.argmin()),
            "highpass_corr": highpass_correlation(t.input, t.mask),
        })
    means = [r["shown_mean"] for r in rows]
    return {
        "input": lr,
        "masks": shown,
        "features": [t.input.mean(axis=0) for t in traces],
        "channel": channel,
        "rows": rows,
        "most_enhanced_block": int(np.argmax(means)) + 1,
        "most_suppressed_block": int(np.argmin(means)) + 1,
    }


# ---------------------------------------------------------------- 2. high-pass correlation


def highpass(x: np.ndarray, sigma: float = HIGHPASS_SIGMA) -> np.ndarray:
    """x minus its Gaussian blur over the last two (spatial) axes: the high-frequency part."""
    x = np.asarray(x, dtype=np.float64)
    return x - gaussian_filter(x, (0,) * (x.ndim - 2) + (sigma, sigma), mode="reflect")


def highpass_correlation(block_input: np.ndarray, mask: np.ndarray, sigma: float = HIGHPASS_SIGMA) -> float:
    """Pearson r between the channel-mean mask and the channel-mean |high-pass| of the block input (C x H x W)."""
    energy = np.abs(highpass(block_input, sigma)).mean(axis=0).ravel()
    attention = np.asarray(mask, dtype=np.float64).mean(axis=0).ravel()
    if energy.std() == 0 or attention.std() == 0:
        return math.nan
    return float(np.corrcoef(energy, attention)[0, 1])


def highpass_study(model: A2N, pairs: list[Pair], sigma: float = HIGHPASS_SIGMA) -> dict[str, Any]:
    """Per block, the mask's high-pass correlation over a dataset, and whether it rises with depth as the paper reports.

    The reference is the block input; the high-pass of the LR image (gray) is given beside it for comparison.
    """
    if sigma <= 0:
        raise AnalysisError(f"--sigma must be positive, got {sigma}")
    block_corr, image_corr = [], []
    for _, _, lr in pairs:
        _, traces = trace_blocks(model, lr)
        gray = lr.astype(np.float64).mean(axis=2)[None]
        block_corr.append([highpass_correlation(t.input, t.mask, sigma) for t in traces])
        image_corr.append([highpass_correlation(gray, t.mask, sigma) for t in traces])
    corr, corr_image = np.array(block_corr), np.array(image_corr)
    mean, mean_image = np.nanmean(corr, axis=0), np.nanmean(corr_image, axis=0)
    rows = [
        {"block": i + 1, "corr_mean": float(mean[i]), "corr_std": float(np.nanstd(corr[:, i])),
         "image_corr_mean": float(mean_image[i]), "image_corr_std": float(np.nanstd(corr_image[:, i])),
         "images": int(np.isfinite(corr[:, i]).sum())}
        for i in range(corr.shape[1])
    ]
    thirds = np.array_split(mean, 3)
    depth = np.arange(len(mean))
    rho, p_value = spearmanr(depth, mean)
    return {
        "filter": f"|x - GaussianBlur(x, sigma={sigma})|, mean over channels",
        "rows": rows,
        "images": [name for name, _, _ in pairs],
        "per_image": corr.tolist(),
        "per_image_lr": corr_image.tolist(),
        "early_mean": float(thirds[0].mean()),
        "late_mean": float(thirds[-1].mean()),
        "spearman_depth": float(rho),
        "spearman_p": float(p_value),
        "image_spearman_depth": float(spearmanr(depth, mean_image)[0]),
        "rises_with_depth": bool(rho > 0 and p_value < 0.05),
    }


# ---------------------------------------------------------------- 3. attention dropout


def ablation_configs(n_blocks: int) -> list[tuple[str, list[int], float]]:
    """(label, 0-based blocks, forced pi_attn): each block, the three thirds and all, at pi_attn 0 and 1."""
    thirds = [list(map(int, part)) for part in np.array_split(np.arange(n_blocks), 3)]
    groups = [(f"block {i + 1}", [i]) for i in range(n_blocks)]
    groups += list(zip(("first third", "middle third", "last third"), thirds)) + [("all", list(range(n_blocks)))]
    return [(label, blocks, value) for label, blocks in groups for value in (0.0, 1.0)]


def _scores(model: A2N, pairs: list[Pair], scale: int) -> tuple[float, float]:
    """Mean PSNR and SSIM (Y, `scale` pixels shaved) of the model's outputs against HR."""
    sr = [(upscale_uint8(model, lr), hr) for _, hr, lr in pairs]
    return (float(np.mean([metrics.psnr(s, h, shave=scale) for s, h in sr])),
            float(np.mean([metrics.ssim(s, h, shave=scale) for s, h in sr])))


def ablation(model: A2N, pairs: list[Pair]) -> dict[str, Any]:
    """PSNR/SSIM (Y, mean over images) with pi_attn forced per block and per group, and their change."""
    psnr0, ssim0 = _scores(model, pairs, model.scale)
    rows = [{"config": "unmodified", "blocks": "", "pi_attn": None, "psnr": psnr0, "ssim": ssim0, "d_psnr": 0.0, "d_ssim": 0.0}]
    for label, blocks, value in ablation_configs(len(model.blocks)):
        with forced_attention(model, blocks, value):
            p, s = _scores(model, pairs, model.scale)
        rows.append({"config": label, "blocks": " ".join(str(b + 1) for b in blocks), "pi_attn": value,
                     "psnr": p, "ssim": s, "d_psnr": p - psnr0, "d_ssim": s - ssim0})
    return {"rows": rows, "images": [name for name, _, _ in pairs], "psnr": psnr0, "ssim": ssim0}


# ---------------------------------------------------------------- 4. branch weights


def branch_weights(model: A2N, pairs: list[Pair]) -> dict[str, Any]:
    """pi_attn of every block for every image, with its mean and spread per block."""
    pis: dict[int, torch.Tensor] = {}
    handles = [b.branch_weights.register_forward_hook(_keeper(pis, i)) for i, b in enumerate(model.blocks)]
    table_rows = []
    try:
        for _, _, lr in pairs:
            upscale_uint8(model, lr)
            table_rows.append([float(pis[i][0, 0]) for i in range(len(model.blocks))])
    finally:
        for h in handles:
            h.remove()
    table = np.array(table_rows)
    state = adm_state(table)
    rows = [
        {"block": i + 1, "mean": float(col.mean()), "std": float(col.std()), "min": float(col.min()),
         "median": float(np.median(col)), "max": float(col.max())}
        for i, col in enumerate(table.T)
    ]
    return {"rows": rows, "images": [name for name, _, _ in pairs], "pi_attn": table.tolist(), **state}


def adm_state(pi_attn: np.ndarray) -> dict[str, Any]:
    """Spread of pi_attn over images x blocks, and whether the ADMs are inert (all within INERT_MARGIN of 0.5)."""
    table = np.asarray(pi_attn, dtype=np.float64)
    return {"pi_attn_min": float(table.min()), "pi_attn_max": float(table.max()), "pi_attn_std": float(table.std()),
            "inert": bool(np.abs(table - 0.5).max() < INERT_MARGIN)}


def describe_adm(state: dict[str, Any]) -> str:
    """One line for users: what the attention-dropout modules of these weights do."""
    spread = f"pi_attn {state['pi_attn_min']:.3f} .. {state['pi_attn_max']:.3f}, std {state['pi_attn_std']:.3f}"
    if state["inert"]:
        return (f"attention dropout: INERT ({spread}): every block mixes its two branches half and half, "
                "so the branch weights of these weights carry no meaning")
    return f"attention dropout: live ({spread} over images x blocks)"


# ---------------------------------------------------------------- 5. local attribution maps


def parse_window(text: str) -> tuple[int, int, int]:
    """'X,Y,SIZE' (output pixels: top-left corner and side) to a tuple of ints."""
    try:
        x, y, size = (int(v) for v in text.split(","))
    except ValueError:
        raise AnalysisError(f"--window {text!r}: expected X,Y,SIZE as three integers, e.g. 100,80,16") from None
    return x, y, size


def gini(values: np.ndarray) -> float:
    """Gini coefficient of |values|: 0 when spread evenly, near 1 when concentrated in one element."""
    v = np.sort(np.abs(np.asarray(values, dtype=np.float64)).ravel())
    total = v.sum()
    if total == 0:
        return 0.0
    rank = np.arange(1, v.size + 1)
    return float(np.sum((2 * rank - v.size - 1) * v) / (v.size * total))


def diffusion_index(attribution_map: np.ndarray) -> float:
    """LAM's diffusion index on 0..1 (1 - Gini): larger when more input pixels contribute."""
    return 1.0 - gini(attribution_map)


def _window_gradient(out: torch.Tensor, window: tuple[int, int, int]) -> torch.Tensor:
    """LAM's detector: the summed L1 gradient magnitude of each output inside the window."""
    x, y, size = window
    patch = out[:, :, y : y + size, x : x + size]
    dx = (patch[..., :, 1:] - patch[..., :, :-1]).abs().sum(dim=(1, 2, 3))
    dy = (patch[..., 1:, :] - patch[..., :-1, :]).abs().sum(dim=(1, 2, 3))
    return dx + dy


def crop_around(image: np.ndarray, window: tuple[int, int, int], scale: int, margin: int) -> tuple[np.ndarray, tuple[int, int, int], tuple[int, int]]:
    """The part of an LR image within `margin` input pixels of an output window: (crop, window in the crop's output, LR origin)."""
    if margin < 1:
        raise AnalysisError(f"--crop must be at least 1 input pixel, got {margin}")
    x, y, size = window
    height, width = image.shape[:2]
    x0, y0 = max(0, x // scale - margin), max(0, y // scale - margin)
    x1, y1 = min(width, -(-(x + size) // scale) + margin), min(height, -(-(y + size) // scale) + margin)
    if x0 >= x1 or y0 >= y1:
        raise AnalysisError(f"window {x},{y},{size} lies outside the {width * scale}x{height * scale} output")
    return image[y0:y1, x0:x1], (x - x0 * scale, y - y0 * scale, size), (x0, y0)


def lam(
    model: nn.Module,
    image: np.ndarray,
    window: tuple[int, int, int],
    sigma: float = LAM_SIGMA,
    steps: int = LAM_STEPS,
    batch: int = 10,
    progress: bool = False,
) -> dict[str, Any]:
    """Local Attribution Map of an output window over an HxWx3 uint8 input.

    Integrates the gradient of the window's gradient magnitude along a progressive-blur path from
    a Gaussian blur of width `sigma` to the image (`steps` Riemann steps). The attribution has the
    input's shape; its diffusion index tells how far the model looks.
    """
    if steps < 1 or sigma <= 0:
        raise AnalysisError(f"LAM needs --steps >= 1 and --sigma > 0, got steps={steps}, sigma={sigma}")
    p = next(model.parameters())
    image_t = to_tensor(image).to(p.device)
    with torch.no_grad():
        out = model(image_t)
    scale = out.shape[-1] // image_t.shape[-1]
    x, y, size = window
    height, width = out.shape[-2:]
    if size < 2 or x < 0 or y < 0 or x + size > width or y + size > height:
        raise AnalysisError(
            f"window {x},{y},{size} does not fit the {width}x{height} output; "
            f"pick SIZE >= 2, X + SIZE <= {width}, Y + SIZE <= {height}"
        )
    base = image.astype(np.float64) / 255.0
    path = np.stack([gaussian_filter(base, (s, s, 0), mode="reflect") for s in np.linspace(sigma, 0.0, steps + 1)])
    path_t = torch.from_numpy(path.transpose(0, 3, 1, 2)).float().to(p.device)
    grads = []
    starts = range(0, steps, batch)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="LAM", unit="batch", leave=False, disable=None)
    for start in starts:
        points = path_t[start : min(start + batch, steps)].clone().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(_window_gradient(model(points), window).sum(), points)
        grads.append(grad)
    attribution = (torch.cat(grads) * (path_t[1:] - path_t[:-1])).sum(dim=0)
    attribution_np = attribution.permute(1, 2, 0).cpu().double().numpy()
    heat = np.abs(attribution_np).sum(axis=2)
    centre = ((y + size / 2) / scale - 0.5, (x + size / 2) / scale - 0.5)
    row = {
        "window": f"{x},{y},{size}",
        "diffusion_index": diffusion_index(heat),
        "radius_50": attribution_radius(heat, centre, 0.5),
        "radius_90": attribution_radius(heat, centre, 0.9),
        "sigma": sigma,
        "steps": steps,
    }
    return {**row, "rows": [row], "input": image, "output": to_uint8(out.cpu()), "scale": scale, "window": window,
            "centre": centre, "attribution": attribution_np, "map": heat}


def attribution_profile(attribution_map: np.ndarray, centre: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel distances from `centre` (row, column), increasing, and the share of |attribution| within each."""
    rows, cols = np.indices(attribution_map.shape)
    distance = np.hypot(rows - centre[0], cols - centre[1]).ravel()
    order = np.argsort(distance, kind="stable")
    cumulative = np.cumsum(np.abs(attribution_map).ravel()[order])
    return distance[order], cumulative / (cumulative[-1] or 1.0)


def attribution_radius(attribution_map: np.ndarray, centre: tuple[float, float], share: float) -> float:
    """Smallest distance from `centre` (row, column) within which `share` of the total attribution lies."""
    if not np.any(attribution_map):
        return 0.0
    distance, cumulative = attribution_profile(attribution_map, centre)
    return float(distance[min(int(np.searchsorted(cumulative, share)), distance.size - 1)])


# ---------------------------------------------------------------- numbers and figures


def write_numbers(out_dir: str | os.PathLike, stem: str, rows: list[dict], summary: dict[str, Any]) -> list[Path]:
    """Write the table as <stem>.csv and the table plus summary as <stem>.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / f"{stem}.csv", out / f"{stem}.json"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps(_finite({"rows": rows, **summary}), indent=1))
    return [csv_path, json_path]


def _finite(obj: Any) -> Any:
    """NaN and infinities become null, so the JSON is standard."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend, or a hint to install it."""
    try:
        import matplotlib
    except ImportError:
        raise AnalysisError("figures need matplotlib; install it with: pip install 'a2n[analysis]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write a figure as PNG and free it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def plot_heatmap(result: dict[str, Any], path: str | os.PathLike, title: str = "") -> Path:
    """Grid of block input (channel mean) and attention mask per block, the extreme blocks framed."""
    plt = pyplot()
    n = len(result["masks"])
    per_row = 4
    rows = max(3, math.ceil(n / per_row))
    fig, axes = plt.subplots(rows, 1 + 2 * per_row, figsize=(2 + 2 * per_row * 1.7, rows * 1.9 + 0.8), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    axes[0, 0].imshow(result["input"])
    axes[0, 0].set_title("input (LR)", fontsize=9)
    lo = float(np.percentile(np.stack(result["masks"]), 1))
    hi = float(np.percentile(np.stack(result["masks"]), 99))
    marks = {result["most_enhanced_block"]: ("most enhanced", "red"), result["most_suppressed_block"]: ("most suppressed", "blue")}
    for i, (feature, mask) in enumerate(zip(result["features"], result["masks"])):
        ax_f, ax_m = axes[i // per_row, 1 + 2 * (i % per_row)], axes[i // per_row, 2 + 2 * (i % per_row)]
        scale = float(np.abs(feature).max()) or 1.0
        im_f = ax_f.imshow(feature / scale, cmap="RdBu_r", vmin=-1, vmax=1)
        im_m = ax_m.imshow(mask, cmap="inferno", vmin=lo, vmax=hi)
        ax_f.set_title(f"block {i + 1} input", fontsize=8)
        label, color = marks.get(i + 1, ("", "black"))
        ax_m.set_title(f"block {i + 1} mask" + (f"\n{label}" if label else ""), fontsize=8, color=color)
        if label:
            ax_m.set_axis_on()
            ax_m.set_xticks([])
            ax_m.set_yticks([])
            for spine in ax_m.spines.values():
                spine.set_color(color)
                spine.set_linewidth(3)
    what = "mean over channels" if result["channel"] is None else f"channel {result['channel']}"
    for row, im, label in ((1, im_m, f"attention mask\n({what})"), (2, im_f, "block input,\nchannel mean / max |.|")):
        fig.colorbar(im, cax=axes[row, 0].inset_axes([0.05, 0.55, 0.9, 0.1]), orientation="horizontal", label=label)
    fig.suptitle(title or "Attention masks per block (framed: highest and lowest mean mask)", fontsize=11)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.88, wspace=0.08, hspace=0.35)
    return _save(fig, path, dpi=80)


def plot_highpass(result: dict[str, Any], path: str | os.PathLike, title: str = "") -> Path:
    """Bars of the mean high-pass correlation per block (block input and LR image), with the spread over images."""
    plt = pyplot()
    rows = result["rows"]
    blocks = np.array([r["block"] for r in rows])
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for offset, key, color, label in ((-0.2, "corr", "tab:red", "high-pass of the block input"),
                                      (0.2, "image_corr", "tab:gray", "high-pass of the LR image (gray)")):
        ax.bar(blocks + offset, [r[f"{key}_mean"] for r in rows], width=0.4, yerr=[r[f"{key}_std"] for r in rows],
               capsize=2, color=color, alpha=0.85, label=label)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(blocks)
    ax.set(xlabel="block", ylabel="Pearson r with the attention mask", title=title or "Attention mask vs high-pass energy")
    ax.legend(fontsize=8, loc="upper left")
    fig.text(0.01, 0.01, f"high-pass energy: {result['filter']}; bars: mean over {len(result['images'])} images, "
             f"whiskers: std\nblock input: Spearman(depth, r) = {result['spearman_depth']:+.2f} (p = {result['spearman_p']:.2f}), "
             f"mean r of the first third {result['early_mean']:+.3f}, of the last third {result['late_mean']:+.3f}; "
             f"LR image: Spearman {result['image_spearman_depth']:+.2f}", fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return _save(fig, path)


def plot_ablation(result: dict[str, Any], path: str | os.PathLike, title: str = "") -> Path:
    """Change of PSNR and SSIM with pi_attn forced to 0 and to 1, per block and per group."""
    plt = pyplot()
    rows = result["rows"][1:]
    labels = list(dict.fromkeys(r["config"] for r in rows))
    singles = [label for label in labels if label.startswith("block ")]
    groups = [label for label in labels if not label.startswith("block ")]
    fig, axes = plt.subplots(2, 2, figsize=(12, 6.5), gridspec_kw={"width_ratios": [len(singles), len(groups) + 1]})
    for row, (key, unit) in enumerate((("d_psnr", "change of PSNR (dB)"), ("d_ssim", "change of SSIM"))):
        for col, names in enumerate((singles, groups)):
            ax = axes[row, col]
            x = np.arange(len(names))
            for offset, value, color, name in ((-0.2, 0.0, "tab:blue", "pi_attn = 0 (attention off)"),
                                               (0.2, 1.0, "tab:orange", "pi_attn = 1 (attention only)")):
                vals = [next(r[key] for r in rows if r["config"] == n and r["pi_attn"] == value) for n in names]
                ax.bar(x + offset, vals, width=0.4, color=color, label=name)
            ax.axhline(0, color="black", lw=0.8)
            ax.set_xticks(x)
            ax.set_xticklabels([n.replace("block ", "").replace(" third", "") for n in names], fontsize=8)
            ax.set_xlabel("block whose pi_attn is forced" if col == 0 else "thirds of the trunk / all blocks")
            ax.set_ylabel(unit)
            ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title or f"Attention dropout (unmodified: {result['psnr']:.3f} dB / {result['ssim']:.4f})", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def plot_branch_weights(result: dict[str, Any], path: str | os.PathLike, title: str = "") -> Path:
    """Box plot of pi_attn per block over the images."""
    plt = pyplot()
    table = np.array(result["pi_attn"])
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.boxplot(table, showmeans=True)
    ax.axhline(0.5, color="gray", lw=0.8, ls="--")
    ax.set(xlabel="block", ylabel="pi_attn (weight of the attention branch)",
           title=title or f"Branch weights over {table.shape[0]} images")
    ax.text(0.01, 0.02, "box: quartiles, line: median, triangle: mean", transform=ax.transAxes, fontsize=7)
    if result.get("inert"):
        ax.text(0.5, 0.9, f"ADMs inert: pi_attn within {INERT_MARGIN} of 0.5 in every block and image",
                transform=ax.transAxes, ha="center", color="tab:red", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_lam(result: dict[str, Any], path: str | os.PathLike, title: str = "") -> Path:
    """The output with its window, the attribution map over the input, and its share within each distance."""
    plt = pyplot()
    from matplotlib.patches import Rectangle

    x, y, size = result["window"]
    s = result["scale"]
    heat = result["map"] / (result["map"].max() or 1.0)
    gray = result["input"].astype(np.float64).mean(axis=2)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
    axes[0].imshow(result["output"])
    axes[0].add_patch(Rectangle((x - 0.5, y - 0.5), size, size, fill=False, color="red", lw=1.5))
    axes[0].set_title("output with the attributed window", fontsize=9)
    axes[1].imshow(gray, cmap="gray")
    im = axes[1].imshow(np.ma.masked_less(heat, 0.01), cmap="jet", alpha=0.7, vmin=0, vmax=1)
    axes[1].set_title(f"LAM over the input: DI = {result['diffusion_index']:.3f}\n"
                      f"50% / 90% of it within {result['radius_50']:.1f} / {result['radius_90']:.1f} px", fontsize=9)
    axes[1].add_patch(Rectangle((x / s - 0.5, y / s - 0.5), size / s, size / s, fill=False, color="white", lw=1))
    distance, share = attribution_profile(result["map"], result["centre"])
    axes[2].plot(distance, share, color="black")
    for radius, color in ((result["radius_50"], "tab:blue"), (result["radius_90"], "tab:red")):
        axes[2].axvline(radius, color=color, ls="--", lw=1, label=f"{radius:.1f} px")
    axes[2].set(xlim=(0, min(distance[-1], max(20.0, 3 * result["radius_90"]))), ylim=(0, 1.02),
                xlabel="distance from the window centre (input pixels)", ylabel="cumulative share")
    axes[2].set_title("share of |attribution| within a distance", fontsize=9)
    axes[2].legend(title="50% / 90% radius", fontsize=8)
    axes[2].grid(alpha=0.3)
    for ax in axes[:2]:
        ax.set_xlabel("x (pixels)")
        ax.set_ylabel("y (pixels)")
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.02, label="|attribution| / max (under 0.01 not drawn)")
    fig.suptitle(title or f"Local Attribution Map (blur path sigma {result['sigma']}, {result['steps']} steps)", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)
