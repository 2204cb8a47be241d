"""Training A2N: config, loop, validation, checkpoints, exact resume and data-parallel runs.

Read `train()` top to bottom: set-up, then one loop that samples a batch, steps the optimiser,
updates the EMA, logs, validates and saves. Every patch is a function of (seed, sample index) and
the learning rate a function of the step, so a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader

from a2n import A2NError
from a2n.data import PatchDataset, ScaleCycle, StepBatchSampler
from a2n.evaluation import evaluate_folder
from a2n.model import A2N, MultiScaleA2N, count_parameters
from a2n.weights import convert_pixel_range, describe, file_pixel_range, read_checkpoint, save_weights


class ConfigError(A2NError):
    """A config file or override with an unknown key or a value of the wrong type."""


class TrainingError(A2NError):
    """A run that cannot start or continue (missing checkpoint, non-finite loss)."""


@dataclass
class TrainConfig:
    """Every setting of a run; `configs/*.yaml` documents each one."""

    scale: int = 2
    scales: list[int] | None = None
    variant: str = "a2n"
    pixel_range: float = 255.0
    train_dirs: list[str] = field(default_factory=lambda: ["../shared/data/train/T91/HR", "../shared/data/train/BSD200/HR"])
    lr_dirs: list[str] | None = None
    cache_dir: str | None = "runs/cache"
    val_dir: str | None = "../shared/data/benchmark/Set5"
    out_dir: str = "runs/a2n_x2"
    init_weights: str | None = None
    fresh_adm: bool = False
    patch_size: int = 48
    batch_size: int = 16
    iterations: int = 10000
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup: int = 0
    restart_every: int = 0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    ema: float = 0.999
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False
    workers: int = 2
    seed: int = 0
    log_every: int = 20
    val_every: int = 500
    save_every: int = 100
    tensorboard: bool = True
    progress: bool = True
    recipe: str = ""


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """A config from a YAML file plus `key=value` overrides, checked against TrainConfig's fields."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config ({exc.strerror})") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a config is a mapping of key: value lines")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value")
        raw[key.strip()] = yaml.safe_load(value)
    return config_from_dict(raw, str(path or "overrides"))


def config_from_dict(raw: dict[str, Any], source: str = "config") -> TrainConfig:
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    defaults = TrainConfig()
    values = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{source}: unknown key {key!r}; known keys: {', '.join(fields)}")
        values[key] = _check_type(key, value, getattr(defaults, key), fields[key].type, source)
    cfg = TrainConfig(**values)
    for scale in cfg.scales or [cfg.scale]:
        if scale not in (2, 3, 4):
            raise ConfigError(f"{source}: scales must be 2, 3 or 4, got {scale}")
    if cfg.scales is not None and (not cfg.scales or len(set(cfg.scales)) != len(cfg.scales)):
        raise ConfigError(f"{source}: scales lists distinct scales, e.g. [2, 3, 4]")
    if cfg.variant not in ("a2n", "a2n-m", "additive"):
        raise ConfigError(f"{source}: variant must be a2n, a2n-m or additive, got {cfg.variant!r}")
    if cfg.precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ConfigError(f"{source}: precision must be auto, bf16, fp16 or fp32, got {cfg.precision!r}")
    for key in ("patch_size", "batch_size", "iterations", "pixel_range"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{source}: {key} must be positive")
    return cfg


def _check_type(key: str, value: Any, default: Any, annotation: str, source: str) -> Any:
    optional = "None" in str(annotation)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: {key} may not be empty")
    want = "list" if str(annotation).startswith("list") else type(default).__name__ if default is not None else "str"
    if want == "float" and isinstance(value, str):
        try:  # YAML 1.1 reads 5e-4 (no dot) as a string; a user who writes it means the number
            value = float(value)
        except ValueError:
            pass
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "list": isinstance(value, list),
    }[want]
    if not ok:
        raise ConfigError(f"{source}: {key} must be {want}, got {type(value).__name__} {value!r}")
    return float(value) if want == "float" else value


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine annealing from lr to min_lr, restarting every `restart_every` steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = step - cfg.warmup
    period = cfg.restart_every or max(cfg.iterations - cfg.warmup, 1)
    progress = (t % period) / period
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting on this device (None: plain fp32)."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.float16 if precision == "fp16" else torch.bfloat16
    if precision == "bf16" or (precision == "auto" and cpu_supports_bf16()):
        return torch.bfloat16
    return None


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, then rename: a kill never leaves a truncated checkpoint."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes files private; weights and checkpoints are ordinary files
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def init_from(model: A2N, path: str, fresh_adm: bool = False) -> tuple[list[str], list[str]]:
    """Load the tensors of a weights file that fit this model; returns (loaded, initialised) names.

    A file trained in another pixel range is converted to the model's first (exactly). With
    `fresh_adm` the attention-dropout modules keep their new initialisation.
    """
    state, metadata = read_checkpoint(path)
    state = convert_pixel_range(state, describe(state)["variant"], file_pixel_range(metadata), model.pixel_range)
    if fresh_adm:
        state = {k: v for k, v in state.items() if ".ADM." not in k}
    own = model.state_dict()
    fit = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(fit, strict=False)
    return sorted(fit), sorted(k for k in own if k not in fit)


def forward_backward(
    model: torch.nn.Module, lr_img: torch.Tensor, hr_img: torch.Tensor, amp_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler, *model_args: Any,
) -> torch.Tensor:
    """One L1 forward/backward under autocast (when amp_dtype is set); returns the loss."""
    with torch.autocast(lr_img.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        sr = model(lr_img, *model_args)
    loss = F.l1_loss(sr.float(), hr_img)
    scaler.scale(loss).backward()
    return loss


class Stop:
    """Remembers SIGINT/SIGTERM so the loop can save and exit between steps."""

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum


def _ignore_stop_signals(worker_id: int) -> None:
    """Data workers leave Ctrl-C/SIGTERM sent to the whole process group to the main process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) training as the config says; returns a summary (steps, best PSNR, paths)."""
    # --- processes and devices -------------------------------------------------------------
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world = 0, 1
    if distributed:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    main_process = rank == 0
    out = Path(cfg.out_dir)
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
    amp_dtype = autocast_dtype(cfg.precision, device)
    joint = cfg.scales is not None  # one trunk for several scales: step k trains scales[k % n]
    scales = list(cfg.scales) if joint else [cfg.scale]
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format

    # --- data ------------------------------------------------------------------------------
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        datasets = [PatchDataset(cfg.train_dirs, s, cfg.patch_size, cfg.seed, cfg.lr_dirs, cfg.cache_dir) for s in scales]
    dataset = datasets[0] if not joint else ScaleCycle(datasets, cfg.batch_size)
    if main_process:
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)

    # --- model, optimiser, EMA ---------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    def build() -> torch.nn.Module:
        if joint:
            return MultiScaleA2N(scales, cfg.variant, cfg.pixel_range).to(device, memory_format=memory_format)  # type: ignore[arg-type]
        return A2N(scale=cfg.scale, variant=cfg.variant, pixel_range=cfg.pixel_range).to(device, memory_format=memory_format)  # type: ignore[arg-type]

    def nets_of(container: torch.nn.Module) -> dict[int, A2N]:
        return {s: container.net(s) for s in scales} if joint else {cfg.scale: container}  # type: ignore[dict-item]

    model = build()
    if cfg.init_weights and not resume:
        for s, net in nets_of(model).items():  # a joint run loads every scale's network, the shared trunk last from the last scale
            path = cfg.init_weights.replace("{scale}", str(s))  # e.g. src/a2n/pretrained/a2n_x{scale}.safetensors
            loaded, fresh = init_from(net, path, cfg.fresh_adm)
            if main_process:
                print(f"x{s}: init from {path}: loaded {len(loaded)} tensors, initialised {len(fresh)}"
                      + (f" ({', '.join(fresh)})" if fresh else ""), file=sys.stderr)
    ema_model = build() if cfg.ema > 0 else None
    if ema_model is not None:
        ema_model.load_state_dict(model.state_dict())
        ema_model.requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    step, skipped_total = 0, len(datasets[0].skipped)
    best_psnr = {s: -math.inf for s in scales}
    last_psnr = {s: math.nan for s in scales}
    elapsed_before, cpu_before = 0.0, 0.0  # wall and CPU seconds of earlier sessions of this run, validation included

    last_path, best_path = out / "last.pt", out / "best.pt"
    if resume:
        if not last_path.is_file():
            raise TrainingError(f"{last_path}: no checkpoint to resume from; start without --resume")
        ckpt = torch.load(last_path, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        if ema_model is not None and ckpt.get("ema") is not None:
            ema_model.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        best = ckpt["best_psnr"]  # a number in single-scale runs, {scale: PSNR} in joint ones
        best_psnr = {int(k): v for k, v in best.items()} if isinstance(best, dict) else {cfg.scale: best}
        elapsed_before, cpu_before = float(ckpt.get("elapsed", 0.0)), float(ckpt.get("cpu", 0.0))
        torch.set_rng_state(ckpt["rng"]["torch"])
        if main_process:
            print(f"resumed from {last_path} at step {step}", file=sys.stderr)
    if main_process:
        (out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))

    ddp_model = model
    if distributed:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None, find_unused_parameters=joint)
    if cfg.compile:  # the training step only; validation and export use the plain modules
        ddp_model = torch.compile(ddp_model)  # type: ignore[assignment]
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and amp_dtype == torch.float16)

    loader = DataLoader(
        dataset,
        batch_sampler=StepBatchSampler(cfg.batch_size, step, rank, world),
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if cfg.workers > 0 else None,
        worker_init_fn=_ignore_stop_signals,
    )

    # --- logging -----------------------------------------------------------------------------
    log_file = open(out / "log.jsonl", "a") if main_process else None
    writer = None
    if main_process and cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            print("warning: tensorboard is not installed; no event files (pip install tensorboard)", file=sys.stderr)
    bar = None
    if main_process and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.iterations, initial=step, unit="it", dynamic_ncols=True, disable=None)

    def log(record: dict[str, Any]) -> None:
        if log_file is None:
            return
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
        if writer is not None:
            for k, v in record.items():
                if k not in ("step", "kind") and isinstance(v, (int, float)):
                    writer.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    def checkpoint() -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "ema": ema_model.state_dict() if ema_model is not None else None,
            "optimizer": optimizer.state_dict(),
            "step": step,
            "best_psnr": best_psnr if joint else best_psnr[cfg.scale],
            "rng": {"torch": torch.get_rng_state()},
            "elapsed": elapsed(),
            "cpu": cpu(),
            "config": dataclasses.asdict(cfg),
        }

    def validate(scale: int) -> float:
        net = nets_of(ema_model if ema_model is not None else model)[scale]
        net.eval()
        result = evaluate_folder(cfg.val_dir, scale, net)[-1]  # type: ignore[arg-type]
        net.train()
        return result.psnr

    def weights_path(kind: str, scale: int) -> Path:
        return out / (f"{kind}_x{scale}.safetensors" if joint else f"{kind}.safetensors")

    def export(path: Path, scale: int, psnr: float) -> None:
        net = nets_of(ema_model if ema_model is not None else model)[scale]
        recipe = cfg.recipe or (f"a2n train: {cfg.iterations} iterations, batch {cfg.batch_size}, LR patch {cfg.patch_size}"
                                + (f", one trunk for x{'/x'.join(map(str, scales))}" if joint else ""))
        save_weights(net, path, trained=recipe, step=step, val_psnr=round(psnr, 4), val_dir=str(cfg.val_dir))

    # --- the loop ----------------------------------------------------------------------------
    run_start, cpu_start = time.perf_counter(), time.process_time()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - run_start

    def cpu() -> float:
        """CPU seconds of this process (all its threads; data workers not included): the cost of the run."""
        return cpu_before + time.process_time() - cpu_start

    stop = Stop()
    model.train()
    window_start, window_loss, window_steps = time.perf_counter(), 0.0, 0
    status = "finished"
    for lr_img, hr_img in loader:
        if step >= cfg.iterations:
            break
        lr_now = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        lr_img = lr_img.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        hr_img = hr_img.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        optimizer.zero_grad(set_to_none=True)
        scale_args = (scales[step % len(scales)],) if joint else ()
        loss = forward_backward(ddp_model, lr_img, hr_img, amp_dtype, scaler, *scale_args)
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        loss_value = loss.detach()
        if distributed:
            dist.all_reduce(loss_value, op=dist.ReduceOp.AVG if device.type == "cuda" else dist.ReduceOp.SUM)
            if device.type != "cuda":
                loss_value /= world
        loss_value = loss_value.item()
        if not math.isfinite(loss_value):
            status = f"stopped: non-finite loss {loss_value} at step {step + 1}; the last checkpoint ({last_path}) is kept"
            break
        scaler.step(optimizer)
        scaler.update()
        if ema_model is not None:
            decay = min(cfg.ema, (1 + step) / (10 + step))  # short memory early: the EMA must not keep the random init
            with torch.no_grad():
                for e, p in zip(ema_model.parameters(), model.parameters()):
                    e.lerp_(p, 1.0 - decay)
        step += 1
        window_loss += loss_value
        window_steps += 1

        if main_process and (step % cfg.log_every == 0 or step == cfg.iterations):
            rate = window_steps / (time.perf_counter() - window_start)
            log({"kind": "train", "step": step, "time": round(elapsed(), 1), "cpu": round(cpu(), 1), "loss": window_loss / window_steps, "lr": lr_now,
                 "it_per_s": rate, "patches_per_s": rate * cfg.batch_size, "skipped_images": skipped_total})
            if bar is not None:
                bar.set_postfix(loss=f"{window_loss / window_steps:.4f}", lr=f"{lr_now:.2e}")
            window_start, window_loss, window_steps = time.perf_counter(), 0.0, 0
        if bar is not None:
            bar.update(1)
        if main_process and cfg.val_dir and (step % cfg.val_every == 0 or step == cfg.iterations):
            for s in scales:
                psnr = last_psnr[s] = validate(s)
                log({"kind": "val", "step": step, "time": round(elapsed(), 1), "cpu": round(cpu(), 1), "scale": s, "psnr": psnr})
                if psnr > best_psnr[s]:
                    best_psnr[s] = psnr
                    export(weights_path("best", s), s, psnr)
                    if not joint:
                        atomic_save(checkpoint(), best_path)
                if bar is not None:
                    bar.write(f"step {step}: x{s} validation PSNR {psnr:.3f} dB (best {best_psnr[s]:.3f})")
        if main_process and (step % cfg.save_every == 0 or step == cfg.iterations):
            atomic_save(checkpoint(), last_path)
        if stop.signal is not None:
            if main_process:
                atomic_save(checkpoint(), last_path)
            status = f"interrupted by signal {stop.signal} at step {step}; checkpoint saved to {last_path}"
            break

    replicas_identical = None
    if distributed:
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        replicas_identical = all(torch.equal(g, flat) for g in gathered)
        if main_process:
            log({"kind": "replicas", "step": step, "identical": replicas_identical})
    if main_process and status == "finished":
        atomic_save(checkpoint(), last_path)
        for s in scales:
            export(weights_path("last", s), s, last_psnr[s])
    if bar is not None:
        bar.close()
    if log_file is not None:
        log_file.close()
    if writer is not None:
        writer.close()
    if distributed:
        dist.destroy_process_group()
    if status.startswith("stopped"):
        raise TrainingError(status)
    summary = {"status": status, "step": step, "best_psnr": best_psnr if joint else best_psnr[cfg.scale], "out_dir": str(out),
               "parameters": count_parameters(model), "world_size": world, "replicas_identical": replicas_identical}
    if main_process:
        print(json.dumps(summary), file=sys.stderr)
    return summary


def plot_curves(run_dirs: str | os.PathLike | Sequence[str | os.PathLike], out_png: str | os.PathLike) -> Path:
    """Draw training loss (by iteration) and validation PSNR (by CPU hours) of one or more runs to a PNG.

    Runs logged before CPU time was recorded are drawn by iteration instead.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [run_dirs] if isinstance(run_dirs, (str, os.PathLike)) else list(run_dirs)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    by_cpu = True
    for run in runs:
        log_path = Path(run) / "log.jsonl"
        if not log_path.is_file():
            raise TrainingError(f"{log_path}: no training log; pass the out_dir of a run")
        records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
        train_rec = [r for r in records if r["kind"] == "train"]
        val_rec = [r for r in records if r["kind"] == "val"]
        by_cpu = by_cpu and all("cpu" in r for r in val_rec)
        name = Path(run).name
        ax1.plot([r["step"] for r in train_rec], [r["loss"] for r in train_rec], lw=1, label=name)
        named = {r["scale"] for r in val_rec if "scale" in r}
        only = next(iter(named)) if len(named) == 1 else None  # records written before "scale" was logged
        for scale in sorted(named or {None}, key=str):
            points = [r for r in val_rec if r.get("scale", only) == scale]
            x = [r["cpu"] / 3600 if by_cpu else r["step"] for r in points]
            ax2.plot(x, [r["psnr"] for r in points], marker="o", ms=3, label=name + (f" x{scale}" if scale else ""))
    ax1.set(xlabel="iteration", ylabel="L1 loss (0..1 pixels)", title="training loss", yscale="log")
    ax2.set(xlabel="CPU hours (training process, validation included)" if by_cpu else "iteration",
            ylabel="PSNR (dB, Y)", title="validation PSNR")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
