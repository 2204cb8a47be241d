"""Training A2N: config, loop, validation, checkpoints, exact resume and data-parallel runs.

Read `train()` top to bottom: set-up, then one loop that samples a batch, steps the optimiser,
updates the EMA, logs, validates and saves; each piece is a small function below it, in the order
it is called. Every patch is a function of (seed, sample index) and the learning rate a function
of the step, so a resumed run continues exactly. With `time_budget_hours` the learning rate is a
function of elapsed wall time instead, and the run ends when the budget is spent.
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
from torch.utils.data import DataLoader, Dataset

from a2n import A2NError
from a2n.backends.cpu import native_bf16
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
    downscale: list[float] = field(default_factory=list)
    val_dir: str | None = "../shared/data/benchmark/Set5"
    out_dir: str = "runs/a2n_x2"
    init_weights: str | None = None
    fresh_adm: bool = False
    patch_size: int = 48
    batch_size: int = 16
    iterations: int = 10000
    time_budget_hours: float | None = None
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
    """A checked TrainConfig from a mapping (a parsed YAML file); `source` names it in error messages."""
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
    if not all(isinstance(f, (int, float)) and 0 < f < 1 for f in cfg.downscale):
        raise ConfigError(f"{source}: downscale lists factors between 0 and 1, e.g. [0.9, 0.8, 0.7, 0.6]")
    for key in ("patch_size", "batch_size", "iterations", "pixel_range"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{source}: {key} must be positive")
    if cfg.time_budget_hours is not None:
        if cfg.time_budget_hours <= 0:
            raise ConfigError(f"{source}: time_budget_hours must be positive (or null for a step-count run)")
        if cfg.restart_every:
            raise ConfigError(f"{source}: restart_every counts steps, and a time budget lays one cosine over the budget; "
                              "set restart_every: 0")
        if cfg.warmup >= cfg.iterations:
            raise ConfigError(f"{source}: with a time budget the warm-up takes warmup/iterations of it; "
                              f"warmup {cfg.warmup} >= iterations {cfg.iterations} leaves no time for the cosine")
    return cfg


def _check_type(key: str, value: Any, default: Any, annotation: str, source: str) -> Any:
    optional = "None" in str(annotation)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: {key} may not be empty")
    if str(annotation).startswith("list"):
        want = "list"
    else:  # the type named first in the annotation: "float | None" wants a float
        want = type(default).__name__ if default is not None else str(annotation).split("|")[0].strip()
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


def lr_at_time(elapsed: float, cfg: TrainConfig) -> float:
    """The schedule of a time-budget run, by elapsed wall seconds: a linear warm-up over the first
    warmup/iterations of the budget, then one cosine from lr to min_lr at the end of the budget."""
    assert cfg.time_budget_hours is not None, "lr_at_time is the schedule of runs with a time budget"
    progress = min(max(elapsed / (cfg.time_budget_hours * 3600), 0.0), 1.0)
    warm = cfg.warmup / cfg.iterations
    if progress < warm:
        return cfg.lr * progress / warm
    cosine = (progress - warm) / (1 - warm)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * cosine))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting on this device (None: plain fp32).

    On a CPU with native bf16, "auto" is decided by timing (`time_precisions`), not here: this
    returns bf16 for it, the candidate that the timing checks against fp32.
    """
    if precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.float16 if precision == "fp16" else torch.bfloat16
    if precision == "bf16" or (precision == "auto" and native_bf16()):
        return torch.bfloat16
    return None


def amp_name(dtype: torch.dtype | None) -> str:
    """How logs and checkpoints name an autocast dtype: fp32 (none), bf16 or fp16."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def time_precisions(run: Run, steps: int = 2) -> dict[str, float]:
    """Patches/s of this run's forward/backward in fp32 and in bf16 autocast, on a batch of noise.

    Native bf16 is no promise of speed: bf16 autocast trains 1.8x faster than fp32 on a Zen 5 EPYC
    but 0.75-0.8x on a Xeon with AVX512-BF16 and no AMX. Each process times its own share of a batch at
    the first scale (under torchrun all at once, as they will train, and the figures are summed so
    that every process decides alike). The noise comes from a private generator and the gradients
    are dropped, so the run's RNG and weights are as they were.
    """
    cfg, procs = run.cfg, run.procs
    scale = run.scales[0]
    share = max(cfg.batch_size // procs.world, 1)
    noise = torch.Generator().manual_seed(0)
    lr_img = torch.rand(share, 3, cfg.patch_size, cfg.patch_size, generator=noise) * cfg.pixel_range
    hr_img = torch.rand(share, 3, cfg.patch_size * scale, cfg.patch_size * scale, generator=noise) * cfg.pixel_range
    lr_img = lr_img.to(procs.device).contiguous(memory_format=run.memory_format)
    hr_img = hr_img.to(procs.device).contiguous(memory_format=run.memory_format)
    scale_args = (scale,) if run.joint else ()
    seconds = []
    for dtype in (None, torch.bfloat16):
        forward_backward(run.model, lr_img, hr_img, dtype, run.scaler, *scale_args)  # warm-up: kernels chosen, memory taken
        start = time.perf_counter()
        for _ in range(steps):
            forward_backward(run.model, lr_img, hr_img, dtype, run.scaler, *scale_args)
        seconds.append(time.perf_counter() - start)
    run.model.zero_grad(set_to_none=True)
    patches = torch.tensor([share * steps / t for t in seconds], dtype=torch.float64)
    if procs.distributed:
        dist.all_reduce(patches)  # the processes' rates summed: the run's rate
    return {"fp32": float(patches[0]), "bf16": float(patches[1])}


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
    """Remembers SIGINT/SIGTERM so the loop can save and exit between steps; `restore()` puts the old handlers back."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def restore(self) -> None:
        """Hand SIGINT/SIGTERM back to whoever handled them before the run (the shell's Ctrl-C, pytest)."""
        for sig, handler in self._previous.items():
            if handler is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(sig, handler)


def _ignore_stop_signals(worker_id: int) -> None:
    """Data workers leave Ctrl-C/SIGTERM sent to the whole process group to the main process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# --- the training loop: train() first, then each piece it calls, in the order it calls them -------


def train(cfg: TrainConfig, resume: bool = False, device: str | None = None) -> dict[str, Any]:
    """Run (or resume) training as the config says; returns a summary (steps, best PSNR, paths).

    device: "cuda" or "cpu" (default: CUDA when torch sees a GPU); under torchrun each process
    takes the GPU of its LOCAL_RANK.
    """
    procs = init_processes(device)
    dataset, skipped_images = load_data(cfg, procs)
    run = start_run(cfg, procs, resume, skipped_images)
    loader = make_loader(dataset, cfg, run.step, procs)
    logs = open_logs(run)
    if run.precision_rates:
        log_precision(run, logs)

    stop = Stop()
    status = "finished"
    run.start_clock()
    logs.window_start = run.started
    run.model.train()
    for lr_img, hr_img in loader:
        now = clock(run)
        if run_over(run, now):
            break
        lr_now = learning_rate(run, now)
        loss = train_step(run, lr_img, hr_img, lr_now)
        if not math.isfinite(loss):
            status = f"stopped: non-finite loss {loss} at step {run.step + 1}; the last checkpoint ({run.last_path}) is kept"
            break
        done = run_over(run, clock(run))
        logs.add(loss)
        if procs.main and (run.step % cfg.log_every == 0 or done):
            log_train(run, logs, lr_now)
        if logs.bar is not None:
            logs.bar.update(1)
        if procs.main and cfg.val_dir and (run.step % cfg.val_every == 0 or done):
            validate(run, logs)
        if procs.main and (run.step % cfg.save_every == 0 or done):
            atomic_save(checkpoint(run), run.last_path)
        if stop.signal is not None:
            if procs.main:
                atomic_save(checkpoint(run), run.last_path)
            status = f"interrupted by signal {stop.signal} at step {run.step}; checkpoint saved to {run.last_path}"
            break
        if done:
            break
    stop.restore()
    return finish(run, logs, status)


@dataclass
class Processes:
    """Where this process sits in a run; rank 0 is the main process, the one that logs and saves."""

    distributed: bool
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        """True in the process that writes logs, checkpoints and weights."""
        return self.rank == 0


def init_processes(device: str | None = None) -> Processes:
    """Join torchrun's process group when started by torchrun, and pick this process's device."""
    if device not in (None, "cuda", "cpu"):
        raise TrainingError(f"device must be cuda or cpu, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device cuda: torch {torch.__version__} sees no CUDA GPU; use device cpu or a CUDA build of torch")
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world = 0, 1
    if distributed:
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    return Processes(distributed, rank, world, local_rank, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


def load_data(cfg: TrainConfig, procs: Processes) -> tuple[Dataset, int]:
    """The training patches (one dataset per scale, cycled step by step in joint runs) and the number of skipped images."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        datasets = [PatchDataset(cfg.train_dirs, s, cfg.patch_size, cfg.seed, cfg.lr_dirs, cfg.cache_dir,
                                 downscale=cfg.downscale) for s in run_scales(cfg)]
    if procs.main:
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
    dataset = datasets[0] if cfg.scales is None else ScaleCycle(datasets, cfg.batch_size)
    return dataset, len(datasets[0].skipped)


def run_scales(cfg: TrainConfig) -> list[int]:
    """The scales a run trains: `scales` in joint runs (one trunk, step k trains scales[k % n]), else [scale]."""
    return list(cfg.scales) if cfg.scales is not None else [cfg.scale]


@dataclass
class Run:
    """The model, optimiser and counters one run carries from step to step; last.pt keeps them (`checkpoint`)."""

    cfg: TrainConfig
    procs: Processes
    out: Path
    model: torch.nn.Module
    ema_model: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    step_model: torch.nn.Module  # the model as the step calls it: wrapped in DDP and/or compiled when asked
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None  # None: fp32
    memory_format: torch.memory_format
    skipped_images: int
    step: int = 0
    best_psnr: dict[int, float] = field(default_factory=dict)
    last_psnr: dict[int, float] = field(default_factory=dict)
    elapsed_before: float = 0.0  # wall and CPU seconds of earlier sessions of this run, validation included
    cpu_before: float = 0.0
    started: float = 0.0
    cpu_started: float = 0.0
    precision_rates: dict[str, float] = field(default_factory=dict)  # patches/s timed for precision auto, when it was
    amp_restored: bool = False  # precision auto took last.pt's choice, so a resumed run computes as it did

    @property
    def joint(self) -> bool:
        """True when one trunk trains several scales (`scales` is set)."""
        return self.cfg.scales is not None

    @property
    def scales(self) -> list[int]:
        """The scales this run trains."""
        return run_scales(self.cfg)

    @property
    def last_path(self) -> Path:
        """The checkpoint that --resume continues from."""
        return self.out / "last.pt"

    def nets(self, container: torch.nn.Module) -> dict[int, A2N]:
        """The plain A2N of each scale inside a model (the model itself in single-scale runs)."""
        if not self.joint:
            return {self.cfg.scale: container}  # type: ignore[dict-item]
        return {s: container.net(s) for s in self.scales}  # type: ignore[operator]

    def start_clock(self) -> None:
        """Start counting this session's wall and CPU seconds (added to those of earlier sessions)."""
        self.started, self.cpu_started = time.perf_counter(), time.process_time()

    def elapsed(self) -> float:
        """Wall seconds of the run, earlier sessions included: what a time budget counts."""
        return self.elapsed_before + time.perf_counter() - self.started

    def cpu(self) -> float:
        """CPU seconds of this process (all its threads; data workers not included): the cost of the run."""
        return self.cpu_before + time.process_time() - self.cpu_started


def new_model(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """A freshly initialised A2N (or one trunk with a reconstruction per scale) on the device."""
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    if cfg.scales is not None:
        model: torch.nn.Module = MultiScaleA2N(cfg.scales, cfg.variant, cfg.pixel_range)  # type: ignore[arg-type]
    else:
        model = A2N(scale=cfg.scale, variant=cfg.variant, pixel_range=cfg.pixel_range)  # type: ignore[arg-type]
    return model.to(device, memory_format=memory_format)  # type: ignore[call-arg]


def start_run(cfg: TrainConfig, procs: Processes, resume: bool, skipped_images: int) -> Run:
    """Model, EMA and optimiser, warm-started from `init_weights` or restored from last.pt; the step's wrappers."""
    out = Path(cfg.out_dir)
    if procs.main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = new_model(cfg, procs.device)
    ema_model = new_model(cfg, procs.device) if cfg.ema > 0 else None
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    amp_dtype = autocast_dtype(cfg.precision, procs.device)
    run = Run(
        cfg, procs, out, model, ema_model, optimizer, step_model=model,
        scaler=torch.amp.GradScaler("cuda", enabled=procs.device.type == "cuda" and amp_dtype == torch.float16),
        amp_dtype=amp_dtype, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format,
        skipped_images=skipped_images,
        best_psnr={s: -math.inf for s in run_scales(cfg)}, last_psnr={s: math.nan for s in run_scales(cfg)},
    )
    if cfg.init_weights and not resume:
        warm_start(run)
    if ema_model is not None:
        ema_model.load_state_dict(model.state_dict())
        ema_model.requires_grad_(False)
    if resume:
        restore(run)
    if cfg.precision == "auto" and procs.device.type == "cpu" and run.amp_dtype is not None and not run.amp_restored:
        run.precision_rates = time_precisions(run)
        if run.precision_rates["fp32"] >= run.precision_rates["bf16"]:
            run.amp_dtype = None
    if procs.main:
        (out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    if procs.distributed:
        run.step_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[procs.local_rank] if procs.device.type == "cuda" else None, find_unused_parameters=run.joint)
    if cfg.compile:  # the training step only; validation and export use the plain modules
        run.step_model = torch.compile(run.step_model)  # type: ignore[assignment]
    return run


def warm_start(run: Run) -> None:
    """Load `init_weights` into every scale's network; in joint runs the shared trunk ends up from the last scale."""
    assert run.cfg.init_weights is not None
    for s, net in run.nets(run.model).items():
        path = run.cfg.init_weights.replace("{scale}", str(s))  # e.g. src/a2n/pretrained/a2n_x{scale}.safetensors
        loaded, fresh = init_from(net, path, run.cfg.fresh_adm)
        if run.procs.main:
            print(f"x{s}: init from {path}: loaded {len(loaded)} tensors, initialised {len(fresh)}"
                  + (f" ({', '.join(fresh)})" if fresh else ""), file=sys.stderr)


def restore(run: Run) -> None:
    """Continue from last.pt: weights, EMA, optimiser, step, best PSNR, elapsed time and the torch RNG."""
    if not run.last_path.is_file():
        raise TrainingError(f"{run.last_path}: no checkpoint to resume from; start without --resume")
    ckpt = torch.load(run.last_path, map_location=run.procs.device, weights_only=True)
    run.model.load_state_dict(ckpt["model"])
    if run.ema_model is not None and ckpt.get("ema") is not None:
        run.ema_model.load_state_dict(ckpt["ema"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.step = ckpt["step"]
    best = ckpt["best_psnr"]  # a number in single-scale runs, {scale: PSNR} in joint ones
    run.best_psnr = {int(k): v for k, v in best.items()} if isinstance(best, dict) else {run.cfg.scale: best}
    run.elapsed_before, run.cpu_before = float(ckpt.get("elapsed", 0.0)), float(ckpt.get("cpu", 0.0))
    torch.set_rng_state(ckpt["rng"]["torch"])
    if run.cfg.precision == "auto" and run.amp_dtype is not None and ckpt.get("amp") in ("fp32", "bf16"):
        run.amp_dtype = torch.bfloat16 if ckpt["amp"] == "bf16" else None  # (auto means fp32 where bf16 is not native)
        run.amp_restored = True
    if run.procs.main:
        print(f"resumed from {run.last_path} at step {run.step}", file=sys.stderr)


def make_loader(dataset: Dataset, cfg: TrainConfig, step: int, procs: Processes) -> DataLoader:
    """Batches from `step` on, this process's share of each global batch, cut by `workers` processes."""
    return DataLoader(
        dataset,
        batch_sampler=StepBatchSampler(cfg.batch_size, step, procs.rank, procs.world),
        num_workers=cfg.workers,
        pin_memory=procs.device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if cfg.workers > 0 else None,
        worker_init_fn=_ignore_stop_signals,
    )


@dataclass
class Logs:
    """log.jsonl, tensorboard and the progress bar (main process only), and the loss since the last train record."""

    file: Any = None
    writer: Any = None
    bar: Any = None
    window_start: float = field(default_factory=time.perf_counter)
    window_loss: float = 0.0
    window_steps: int = 0

    def add(self, loss: float) -> None:
        """Count one step's loss towards the next train record."""
        self.window_loss += loss
        self.window_steps += 1


def open_logs(run: Run) -> Logs:
    """Append to <out_dir>/log.jsonl, open tensorboard and the progress bar as the config asks (main process only)."""
    if not run.procs.main:
        return Logs()
    logs = Logs(file=open(run.out / "log.jsonl", "a"))
    if run.cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter

            logs.writer = SummaryWriter(str(run.out / "tensorboard"))
        except ImportError:
            print("warning: tensorboard is not installed; no event files (pip install tensorboard)", file=sys.stderr)
    if run.cfg.progress:
        from tqdm import tqdm

        total = None if run.cfg.time_budget_hours is not None else run.cfg.iterations  # a budget run ends on time, not on a step
        logs.bar = tqdm(total=total, initial=run.step, unit="it", dynamic_ncols=True, disable=None)
    return logs


def clock(run: Run) -> float:
    """Elapsed seconds of the run; with a time budget under torchrun, rank 0's, so every process takes the same lr and stops together."""
    now = run.elapsed()
    if run.procs.distributed and run.cfg.time_budget_hours is not None:
        shared = torch.tensor([now], dtype=torch.float64, device=run.procs.device)
        dist.broadcast(shared, 0)
        now = float(shared.item())
    return now


def run_over(run: Run, elapsed: float) -> bool:
    """True once the time budget is spent (budget runs) or `iterations` steps are done (step-count runs)."""
    if run.cfg.time_budget_hours is not None:
        return elapsed >= run.cfg.time_budget_hours * 3600
    return run.step >= run.cfg.iterations


def learning_rate(run: Run, elapsed: float) -> float:
    """The learning rate of the next step: by elapsed time in budget runs, by the step otherwise."""
    if run.cfg.time_budget_hours is not None:
        return lr_at_time(elapsed, run.cfg)
    return lr_at(run.step, run.cfg)


def train_step(run: Run, lr_img: torch.Tensor, hr_img: torch.Tensor, lr_now: float) -> float:
    """One optimiser step on one batch, then the EMA; returns the loss (averaged over processes).

    A non-finite loss is returned before the optimiser steps, so the weights stay those of the last good step.
    """
    for group in run.optimizer.param_groups:
        group["lr"] = lr_now
    lr_img = lr_img.to(run.procs.device, non_blocking=True).contiguous(memory_format=run.memory_format)
    hr_img = hr_img.to(run.procs.device, non_blocking=True).contiguous(memory_format=run.memory_format)
    run.optimizer.zero_grad(set_to_none=True)
    scale_args = (run.scales[run.step % len(run.scales)],) if run.joint else ()
    loss = forward_backward(run.step_model, lr_img, hr_img, run.amp_dtype, run.scaler, *scale_args)
    if run.cfg.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip)
    loss_value = loss.detach()
    if run.procs.distributed:
        on_cuda = run.procs.device.type == "cuda"
        dist.all_reduce(loss_value, op=dist.ReduceOp.AVG if on_cuda else dist.ReduceOp.SUM)  # gloo has no AVG
        if not on_cuda:
            loss_value /= run.procs.world
    value = loss_value.item()
    if not math.isfinite(value):
        return value
    run.scaler.step(run.optimizer)
    run.scaler.update()
    update_ema(run)
    run.step += 1
    return value


def update_ema(run: Run) -> None:
    """Move the EMA weights towards the model's; short memory early, so the EMA does not keep the random init."""
    if run.ema_model is None:
        return
    decay = min(run.cfg.ema, (1 + run.step) / (10 + run.step))
    with torch.no_grad():
        for e, p in zip(run.ema_model.parameters(), run.model.parameters()):
            e.lerp_(p, 1.0 - decay)


def log(logs: Logs, record: dict[str, Any]) -> None:
    """One line of log.jsonl, and its numbers as tensorboard scalars under <kind>/<key>."""
    if logs.file is None:
        return
    logs.file.write(json.dumps(record) + "\n")
    logs.file.flush()
    if logs.writer is not None:
        for k, v in record.items():
            if k not in ("step", "kind") and isinstance(v, (int, float)):
                logs.writer.add_scalar(f"{record['kind']}/{k}", v, record["step"])


def log_precision(run: Run, logs: Logs) -> None:
    """Say which precision `auto` took from its timing, and the figures (main process)."""
    chosen = amp_name(run.amp_dtype)
    log(logs, {"kind": "precision", "step": run.step, **run.precision_rates, "chosen": chosen})
    if run.procs.main:
        rates = ", ".join(f"{k} {v:.1f}" for k, v in run.precision_rates.items())
        print(f"precision auto: {chosen} (patches/s timed: {rates})", file=sys.stderr)


def log_train(run: Run, logs: Logs, lr_now: float) -> None:
    """A train record: mean loss and speed since the last one, the learning rate, elapsed wall and CPU time."""
    loss = logs.window_loss / logs.window_steps
    rate = logs.window_steps / (time.perf_counter() - logs.window_start)
    log(logs, {"kind": "train", "step": run.step, "time": round(run.elapsed(), 1), "cpu": round(run.cpu(), 1), "loss": loss,
               "lr": lr_now, "it_per_s": rate, "patches_per_s": rate * run.cfg.batch_size, "skipped_images": run.skipped_images})
    if logs.bar is not None:
        logs.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr_now:.2e}")
    logs.window_start, logs.window_loss, logs.window_steps = time.perf_counter(), 0.0, 0


def validate(run: Run, logs: Logs) -> None:
    """Score each scale's EMA (or plain) network on `val_dir`; keep every new best as best[_x<S>].safetensors."""
    for s, net in run.nets(run.ema_model if run.ema_model is not None else run.model).items():
        net.eval()
        psnr = run.last_psnr[s] = evaluate_folder(run.cfg.val_dir, s, net)[-1].psnr  # type: ignore[arg-type]
        net.train()
        log(logs, {"kind": "val", "step": run.step, "time": round(run.elapsed(), 1), "cpu": round(run.cpu(), 1), "scale": s, "psnr": psnr})
        if psnr > run.best_psnr[s]:
            run.best_psnr[s] = psnr
            export(run, "best", s, psnr)
            if not run.joint:
                atomic_save(checkpoint(run), run.out / "best.pt")
        if logs.bar is not None:
            logs.bar.write(f"step {run.step}: x{s} validation PSNR {psnr:.3f} dB (best {run.best_psnr[s]:.3f})")


def checkpoint(run: Run) -> dict[str, Any]:
    """Everything --resume needs, as one plain dict (the config included)."""
    return {
        "model": run.model.state_dict(),
        "ema": run.ema_model.state_dict() if run.ema_model is not None else None,
        "optimizer": run.optimizer.state_dict(),
        "step": run.step,
        "best_psnr": run.best_psnr if run.joint else run.best_psnr[run.cfg.scale],
        "rng": {"torch": torch.get_rng_state()},
        "elapsed": run.elapsed(),
        "cpu": run.cpu(),
        "amp": amp_name(run.amp_dtype),
        "config": dataclasses.asdict(run.cfg),
    }


def export(run: Run, kind: str, scale: int, psnr: float) -> None:
    """Write one scale's EMA (or plain) network as <kind>[_x<scale>].safetensors, with how it was trained."""
    cfg = run.cfg
    name = f"{kind}_x{scale}.safetensors" if run.joint else f"{kind}.safetensors"
    net = run.nets(run.ema_model if run.ema_model is not None else run.model)[scale]
    length = f"{cfg.time_budget_hours:g} h time budget" if cfg.time_budget_hours is not None else f"{cfg.iterations} iterations"
    recipe = cfg.recipe or (f"a2n train: {length}, batch {cfg.batch_size}, LR patch {cfg.patch_size}"
                            + (f", one trunk for x{'/x'.join(map(str, run.scales))}" if run.joint else "")
                            + (f", HR copies downscaled by {', '.join(f'{f:g}' for f in cfg.downscale)}" if cfg.downscale else ""))
    save_weights(net, run.out / name, trained=recipe, step=run.step, val_psnr=round(psnr, 4), val_dir=str(cfg.val_dir))


def check_replicas(run: Run, logs: Logs) -> bool | None:
    """Under torchrun, whether every process ended with the same weights (logged); None in single-process runs."""
    if not run.procs.distributed:
        return None
    flat = torch.cat([p.detach().flatten() for p in run.model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(run.procs.world)]
    dist.all_gather(gathered, flat)
    identical = all(torch.equal(g, flat) for g in gathered)
    if run.procs.main:
        log(logs, {"kind": "replicas", "step": run.step, "identical": identical})
    return identical


def finish(run: Run, logs: Logs, status: str) -> dict[str, Any]:
    """Write last.pt and the last files of a finished run, close the logs and the process group; the summary."""
    replicas_identical = check_replicas(run, logs)
    if run.procs.main and status == "finished":
        atomic_save(checkpoint(run), run.last_path)
        for s in run.scales:
            export(run, "last", s, run.last_psnr[s])
    elapsed = run.elapsed()
    for closable in (logs.bar, logs.file, logs.writer):
        if closable is not None:
            closable.close()
    if run.procs.distributed:
        dist.destroy_process_group()
    if status.startswith("stopped"):
        raise TrainingError(status)
    summary = {"status": status, "step": run.step, "best_psnr": run.best_psnr if run.joint else run.best_psnr[run.cfg.scale],
               "out_dir": str(run.out), "parameters": count_parameters(run.model), "world_size": run.procs.world,
               "replicas_identical": replicas_identical, "elapsed": round(elapsed, 1)}
    if run.procs.main:
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
