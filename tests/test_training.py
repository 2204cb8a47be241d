"""Training: smoke run, exact resume after SIGKILL, SIGTERM, NaN stop, bad input, torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from a2n.data import DataError, PatchDataset, StepBatchSampler, dihedral
from a2n.resize import imresize, modcrop
from a2n.training import ConfigError, TrainingError, config_from_dict, load_config, lr_at, train
from a2n.weights import read_checkpoint

from conftest import BENCHMARK, need

ROOT = Path(__file__).resolve().parents[1]


def make_images(folder: Path, n: int = 4, size: int = 48, seed: int = 0) -> Path:
    """Smooth random images (low-frequency noise upsampled), so SR has something to learn."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 256, (size // 6, size // 6, 3), dtype=np.uint8))
        small.resize((size, size), Image.BICUBIC).save(folder / f"img{i}.png")
    return folder


def base_config(tmp_path: Path, **extra) -> dict:
    cfg = dict(scale=2, train_dirs=[str(make_images(tmp_path / "hr"))], cache_dir=str(tmp_path / "cache"),
               val_dir=None, out_dir=str(tmp_path / "run"), patch_size=12, batch_size=4, iterations=8,
               lr=5e-4, warmup=2, ema=0.9, precision="fp32", workers=1, log_every=2, save_every=1,
               tensorboard=False, progress=False, seed=3)
    cfg.update(extra)
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


def a2n_cmd() -> list[str]:
    return [sys.executable, "-m", "a2n"]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", map_location="cpu", weights_only=True)["model"]


def test_smoke_config_end_to_end(tmp_path: Path) -> None:
    """configs/smoke.yaml as shipped, pointed at a temporary out_dir: files, logs, validation."""
    need(BENCHMARK / "Set5")
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [f"out_dir={tmp_path / 'smoke'}", f"cache_dir={tmp_path / 'c'}",
                                                         "iterations=6", "val_every=3", "tensorboard=true"])
    cwd = os.getcwd()
    os.chdir(ROOT)  # the config's relative paths resolve against the repository root
    try:
        summary = train(cfg)
    finally:
        os.chdir(cwd)
    run = tmp_path / "smoke"
    assert summary["step"] == 6 and summary["status"] == "finished"
    for name in ("last.pt", "best.pt", "best.safetensors", "last.safetensors", "config.yaml", "log.jsonl"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    vals = [r for r in records if r["kind"] == "val"]
    assert [v["step"] for v in vals] == [3, 6] and all(20 < v["psnr"] < 40 for v in vals)
    assert all(r["patches_per_s"] > 0 for r in records if r["kind"] == "train")
    from a2n.training import plot_curves

    png = plot_curves(run, tmp_path / "curves.png")
    assert Image.open(png).size[0] > 500


@pytest.mark.parametrize("extra", [{}, {"scales": [2, 4]}], ids=["single", "joint"])
def test_resume_after_sigkill_is_exact(tmp_path: Path, extra: dict) -> None:
    full = write_config(tmp_path / "full.yaml", base_config(tmp_path, out_dir=str(tmp_path / "full"), iterations=10, **extra))
    subprocess.run(a2n_cmd() + ["train", "--config", str(full)], check=True, capture_output=True, timeout=600)

    cut = write_config(tmp_path / "cut.yaml", base_config(tmp_path, out_dir=str(tmp_path / "cut"), iterations=10, **extra))
    proc = subprocess.Popen(a2n_cmd() + ["train", "--config", str(cut)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "cut" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if last.exists() and torch.load(last, weights_only=True)["step"] >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(last, weights_only=True)["step"]
    assert 3 <= killed_at < 10, f"the run ended before it could be killed (step {killed_at})"
    subprocess.run(a2n_cmd() + ["train", "--config", str(cut), "--resume"], check=True, capture_output=True, timeout=600)
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "cut")
    assert torch.load(last, weights_only=True)["step"] == 10
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"


def test_sigterm_saves_and_exits_cleanly(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", base_config(tmp_path, iterations=100000, save_every=100000))
    proc = subprocess.Popen(a2n_cmd() + ["train", "--config", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 2):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # the whole process group, data workers included, as a service manager does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "interrupted by signal" in err and "Traceback" not in err
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["step"] >= 4 and {"model", "ema", "optimizer", "rng", "config", "step"} <= set(ckpt)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    cfg = config_from_dict(base_config(tmp_path, iterations=3))
    train(cfg)
    last = tmp_path / "run" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["model"]["conv_first.weight"][0, 0, 0, 0] = float("nan")
    torch.save(ckpt, last)
    good = last.read_bytes()
    cfg.iterations = 6
    with pytest.raises(TrainingError, match="non-finite loss nan at step 4.*last checkpoint"):
        train(cfg, resume=True)
    assert last.read_bytes() == good


def test_bad_input(tmp_path: Path) -> None:
    hr = make_images(tmp_path / "hr", n=2)
    (hr / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(hr / "tiny.png")
    with pytest.warns(UserWarning) as record:
        ds = PatchDataset([hr], 2, 12)
    messages = " ".join(str(w.message) for w in record)
    assert "broken.png" in messages and "tiny.png" in messages and "smaller than the patch" in messages
    assert len(ds.images) == 2 and len(ds.skipped) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no training images"):
        PatchDataset([tmp_path / "empty"], 2, 12)
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        config_from_dict({"learning_rate": 1e-3})
    with pytest.raises(ConfigError, match="batch_size must be int"):
        load_config(None, ["batch_size=big"])
    with pytest.raises(ConfigError, match="ema must be float"):
        config_from_dict({"ema": "yes"})
    assert load_config(None, ["lr=5e-4"]).lr == 5e-4  # YAML 1.1 reads 5e-4 as a string


def test_skipped_images_are_counted_in_the_log(tmp_path: Path) -> None:
    cfg = base_config(tmp_path, iterations=2)
    (Path(cfg["train_dirs"][0]) / "broken.jpg").write_bytes(b"nope")
    train(config_from_dict(cfg))
    rec = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert rec["skipped_images"] == 1


def test_sampling_is_a_function_of_the_index(tmp_path: Path) -> None:
    ds = PatchDataset([make_images(tmp_path / "hr")], 3, 8, seed=5)
    a, b = ds[123], ds[123]
    assert torch.equal(a[0], b[0]) and a[0].shape == (3, 8, 8) and a[1].shape == (3, 24, 24)
    assert not torch.equal(ds[124][0], a[0])
    batches = [StepBatchSampler(8, 5, rank=r, world_size=2) for r in range(2)]
    first = [next(iter(s)) for s in batches]
    assert first == [[40, 41, 42, 43], [44, 45, 46, 47]]
    img = np.arange(2 * 3 * 1).reshape(2, 3, 1)
    assert len({dihedral(img, k).tobytes() + bytes(dihedral(img, k).shape) for k in range(8)}) == 8


def test_downscaled_copies_join_the_training_set(tmp_path: Path) -> None:
    hr = make_images(tmp_path / "hr", n=2, size=60)
    plain = PatchDataset([hr], 2, 12, cache_dir=tmp_path / "cache")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a copy smaller than a patch is left out quietly
        ds = PatchDataset([hr], 2, 12, cache_dir=tmp_path / "cache", downscale=[0.8, 0.3])
    assert len(plain.images) == 2 and len(ds.images) == 4 and ds.skipped == []  # 60 * 0.3 = 18 < 24: no copy
    full = np.asarray(Image.open(hr / "img0.png").convert("RGB"))
    small = modcrop(imresize(full, 0.8), 2)
    lr, hr_copy = ds.images[ds.names.index(f"{hr / 'img0.png'} x0.8")]
    assert hr_copy.shape == (48, 48, 3) and np.array_equal(hr_copy, small) and np.array_equal(lr, imresize(small, 0.5))
    again = PatchDataset([hr], 2, 12, cache_dir=tmp_path / "cache", downscale=[0.8])  # from the cache: the same arrays
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(again.images, ds.images[:3]))
    with pytest.raises(ConfigError, match="downscale lists factors between 0 and 1"):
        config_from_dict({"downscale": [1.5]})
    cfg = config_from_dict(base_config(tmp_path, iterations=1, downscale=[0.8], out_dir=str(tmp_path / "ds")))
    train(cfg)
    assert "HR copies downscaled by 0.8" in read_checkpoint(tmp_path / "ds" / "last.safetensors")[1]["trained"]


def test_cosine_schedule() -> None:
    cfg = config_from_dict({"lr": 1e-3, "min_lr": 0.0, "warmup": 10, "iterations": 110, "restart_every": 50})
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3) and lr_at(35, cfg) == pytest.approx(5e-4)
    assert lr_at(60, cfg) == pytest.approx(1e-3)  # warm restart


def test_init_from_x2_for_x4(tmp_path: Path, capsys) -> None:
    train(config_from_dict(base_config(tmp_path, iterations=2)))
    cfg = base_config(tmp_path, scale=4, iterations=1, out_dir=str(tmp_path / "x4"), init_weights=str(tmp_path / "run" / "last.safetensors"), patch_size=8)
    train(config_from_dict(cfg))
    err = capsys.readouterr().err
    assert "loaded 172 tensors, initialised 6" in err and "upconv2.weight" in err


def test_torchrun_two_processes_match_one(tmp_path: Path) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this Python")
    cfg = base_config(tmp_path, iterations=4, batch_size=4, ema=0.0, workers=0)
    single = write_config(tmp_path / "one.yaml", {**cfg, "out_dir": str(tmp_path / "one")})
    double = write_config(tmp_path / "two.yaml", {**cfg, "out_dir": str(tmp_path / "two")})
    subprocess.run(a2n_cmd() + ["train", "--config", str(single)], check=True, capture_output=True, timeout=600)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "a2n", "train", "--config", str(double)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert {"kind": "replicas", "step": 4, "identical": True} in records
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < 1e-4, diff  # float rounding of the all-reduce, amplified by Adam; a wrong shard or mean moves weights ~1e-3


def tiny_benchmark(root: Path, scales: tuple[int, ...]) -> Path:
    """HR/ and LR_bicubic/X<s>/ folders of three smooth 24x24 images, for validation in tests."""
    from a2n import io
    from a2n.resize import imresize

    for i, path in enumerate(sorted(make_images(root / "src", n=3, size=24, seed=5).glob("*.png"))):
        hr = np.asarray(Image.open(path).convert("RGB"))
        io.write_png(root / "HR" / f"img{i}.png", hr)
        for s in scales:
            io.write_png(root / "LR_bicubic" / f"X{s}" / f"img{i}x{s}.png", imresize(hr, 1.0 / s))
    return root


def test_pixel_range_defaults_to_the_official_255(tmp_path: Path) -> None:
    from a2n.weights import build_model, read_checkpoint

    assert config_from_dict({}).pixel_range == 255.0 and load_config(ROOT / "configs" / "a2n_x2.yaml").pixel_range == 255.0
    train(config_from_dict(base_config(tmp_path, iterations=2)))
    _, meta = read_checkpoint(tmp_path / "run" / "last.safetensors")
    assert meta["pixel_range"] == "255.0" and build_model(2, "a2n", tmp_path / "run" / "last.pt").pixel_range == 255.0
    with pytest.raises(ConfigError, match="pixel_range must be positive"):
        config_from_dict({"pixel_range": 0})


def test_joint_run_shares_one_trunk_and_exports_each_scale(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """scales: [2, 3] trains one trunk with a reconstruction per scale; each file is a plain A2N for its scale."""
    from a2n.evaluation import evaluate_folder
    from a2n.weights import build_model, read_checkpoint

    bench = tiny_benchmark(tmp_path / "bench", (2, 3))
    summary = train(config_from_dict(base_config(tmp_path, scales=[2, 3], iterations=4, val_every=2, val_dir=str(bench))))
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    vals = [(r["step"], r["scale"]) for r in records if r["kind"] == "val"]
    assert vals == [(2, 2), (2, 3), (4, 2), (4, 3)] and all(r["cpu"] > 0 for r in records if r["kind"] == "val")
    x2, _ = read_checkpoint(run / "last_x2.safetensors")
    x3, _ = read_checkpoint(run / "last_x3.safetensors")
    trunk = [k for k in x2 if k.startswith(("conv_first", "AAB_trunk", "trunk_conv"))]
    assert len(trunk) == 164 and all(torch.equal(x2[k], x3[k]) for k in trunk)
    assert not torch.equal(x2["upconv1.weight"], x3["upconv1.weight"])
    for s in (2, 3):
        model = build_model(s, "a2n", run / f"best_x{s}.safetensors")
        best = max(r["psnr"] for r in records if r["kind"] == "val" and r["scale"] == s)
        assert summary["best_psnr"][s] == pytest.approx(best)
        assert evaluate_folder(bench, s, model)[-1].psnr == pytest.approx(best, abs=1e-6)
    restart = base_config(tmp_path, scales=[2, 3], iterations=1, out_dir=str(tmp_path / "again"),
                          init_weights=str(run / "last_x{scale}.safetensors"))
    capsys.readouterr()
    train(config_from_dict(restart))  # a warm restart from one file per scale
    err = capsys.readouterr().err
    assert "last_x2.safetensors: loaded 172 tensors, initialised 0" in err
    assert "last_x3.safetensors: loaded 172 tensors, initialised 0" in err
    with pytest.raises(ConfigError, match="distinct scales"):
        config_from_dict({"scales": [2, 2]})
    with pytest.raises(ConfigError, match="scales must be 2, 3 or 4"):
        config_from_dict({"scales": [2, 5]})


def test_init_from_a_0_1_file_converts_it(tmp_path: Path) -> None:
    """init_weights from a file trained on 0..1 starts a 0..255 run from the same network (outputs equal)."""
    from a2n.model import A2N
    from a2n.training import init_from
    from a2n.weights import save_weights

    torch.manual_seed(2)
    old = A2N(2)
    save_weights(old, tmp_path / "old.safetensors")
    new = A2N(2, pixel_range=255.0)
    loaded, fresh = init_from(new, str(tmp_path / "old.safetensors"))
    assert len(loaded) == 172 and not fresh
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert (old.eval()(x) - new.eval()(x)).abs().max() < 1e-5
    again = A2N(2, pixel_range=255.0)
    loaded, fresh = init_from(again, str(tmp_path / "old.safetensors"), fresh_adm=True)
    assert len(fresh) == 32 and all(".ADM." in k for k in fresh)


@pytest.mark.slow
def test_default_training_wakes_the_adms(tmp_path: Path) -> None:
    """The regression test for the 0..1 mistake. A short real run at the default pixel range (255) moves
    pi_attn away from where the initialisation put it and leaves it spread over images x blocks; the same
    run on 0..1 leaves every ADM at 0.5, untouched by training."""
    from a2n.analysis import branch_weights, load_pairs
    from a2n.model import A2N
    from a2n.weights import build_model

    need(BENCHMARK / "Set5")
    t91 = need(ROOT.parent / "shared" / "data" / "train" / "T91" / "HR")
    pairs = load_pairs(BENCHMARK / "Set5", 2)
    moved, state = {}, {}
    for pixel_range in (None, 1.0):
        run = tmp_path / f"run_{pixel_range}"
        cfg = dict(train_dirs=[str(t91)], cache_dir=str(tmp_path / "cache"), val_dir=None, out_dir=str(run), patch_size=16,
                   batch_size=8, iterations=ADM_STEPS, lr=8e-4, warmup=20, ema=0.0, workers=0, save_every=ADM_STEPS,
                   tensorboard=False, progress=False, seed=0)
        if pixel_range is not None:
            cfg["pixel_range"] = pixel_range
        cfg = config_from_dict(cfg)
        torch.manual_seed(cfg.seed)  # the run's own initialisation, for comparison
        start = np.array(branch_weights(A2N(2, pixel_range=cfg.pixel_range).eval(), pairs)["pi_attn"])
        train(cfg)
        state[pixel_range] = branch_weights(build_model(2, "a2n", run / "last.safetensors"), pairs)
        moved[pixel_range] = float(np.abs(np.array(state[pixel_range]["pi_attn"]) - start).mean())
    print(f"pi_attn std {state[None]['pi_attn_std']:.4f} / {state[1.0]['pi_attn_std']:.4f}, "
          f"mean |change| from init {moved[None]:.4f} / {moved[1.0]:.5f} (255 / 1)")
    assert not state[None]["inert"] and state[None]["pi_attn_std"] > ADM_MIN_STD and moved[None] > ADM_MIN_MOVE
    assert state[1.0]["inert"] and moved[1.0] < moved[None] / 10


ADM_STEPS = 100  # with LR patch 16: a minute on 2 cores (150 steps at patch 24 took 2.5, the suite's longest)
ADM_MIN_STD = 0.02
ADM_MIN_MOVE = 0.01


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_loads_and_trains_at_255(name: str) -> None:
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.pixel_range == 255.0
    if name == "a2n_joint.yaml":
        assert cfg.scales == [2, 3, 4]


def budget_config(tmp_path: Path, seconds: float, **extra) -> dict:
    """A tiny run with a time budget of `seconds`; iterations only sets the warm-up's share (2/8 of the budget).
    Its tests run torch on one thread: two threads beside another busy test worker on two cores made one tiny
    step take 4.9 s (an AMX Xeon, stop 33), and these tests time steps against the budget."""
    return base_config(tmp_path, time_budget_hours=seconds / 3600, iterations=8, warmup=2, min_lr=1e-6, workers=0,
                       log_every=1, save_every=1000, **extra)


def log_records(run: Path, kind: str = "train") -> list[dict]:
    """The records of one kind in a run's log.jsonl."""
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


def assert_lr_follows_the_clock(records: list[dict], cfg, since: float = 0.0) -> None:
    """Each logged lr was set between the previous record's time and its own (one step, log_every=1), so once
    the cosine runs (lr falling with time) it lies between the schedule at those two times (0.05 s: rounding)."""
    from a2n.training import lr_at_time

    warm_end = cfg.time_budget_hours * 3600 * cfg.warmup / cfg.iterations
    before = since
    for r in records:
        if before - 0.05 > warm_end:
            assert lr_at_time(r["time"] + 0.05, cfg) <= r["lr"] <= lr_at_time(before - 0.05, cfg), (before, r)
        before = r["time"]


def test_time_budget_ends_on_time_with_best_and_last_files(tmp_path: Path, one_thread: None) -> None:
    """A 5-second budget: the lr follows elapsed time over the budget down to about min_lr, the run stops once
    the budget is spent (validation counted) and writes best and last files."""
    from a2n.training import lr_at_time

    bench = tiny_benchmark(tmp_path / "bench", (2,))
    cfg = config_from_dict(budget_config(tmp_path, 5.0, val_dir=str(bench), val_every=4))
    summary = train(cfg)
    run = tmp_path / "run"
    assert summary["status"] == "finished" and summary["step"] >= 3
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert 5.0 <= ckpt["elapsed"] < 5.0 + 10, ckpt["elapsed"]  # one step, a validation and the saves past it, on a loaded CPU
    for name in ("best.pt", "best.safetensors", "last.safetensors", "config.yaml"):
        assert (run / name).is_file(), name
    records = log_records(run)
    assert [r["step"] for r in records] == list(range(1, summary["step"] + 1))
    assert_lr_follows_the_clock(records, cfg)
    longest = max(b["time"] - a["time"] for a, b in zip(records, records[1:]))  # a step, with a validation at times
    after = ckpt["elapsed"] - records[-1]["time"]  # the last step's validation, which may take the clock past the budget
    assert records[-1]["lr"] <= lr_at_time(5.0 - longest - after - 0.1, cfg), (longest, after, records[-1])  # it began near the end
    assert lr_at_time(5.0, cfg) == cfg.min_lr
    vals = [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["kind"] == "val"]
    assert vals[-1]["step"] == summary["step"]  # the last step is validated, whatever val_every says


def test_time_budget_resume_restores_elapsed_time(tmp_path: Path, one_thread: None) -> None:
    """SIGTERM part-way through a budget, then --resume: the clock goes on from the checkpoint's elapsed time,
    the lr from the schedule at that time, and the run ends when the same budget is spent."""
    import threading

    cfg = config_from_dict(budget_config(tmp_path, 8.0))
    log_path = tmp_path / "run" / "log.jsonl"

    def interrupt_after_two_steps() -> None:  # only once the loop runs, so the run's own handler catches it
        deadline = time.time() + 120
        while time.time() < deadline and not (log_path.exists() and log_path.read_text().count("\n") >= 2):
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    handler = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=interrupt_after_two_steps, daemon=True).start()
    first = train(cfg)
    assert first["status"].startswith("interrupted by signal") and signal.getsignal(signal.SIGTERM) is handler
    cut = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert cut["step"] == first["step"] and 0 < cut["elapsed"] < 8.0
    second = train(cfg, resume=True)
    assert second["status"] == "finished" and second["step"] > cut["step"]
    after = [r for r in log_records(tmp_path / "run") if r["step"] > cut["step"]]
    assert after[0]["step"] == cut["step"] + 1 and after[0]["time"] >= cut["elapsed"] - 0.05
    assert_lr_follows_the_clock(after, cfg, since=cut["elapsed"])
    end = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert 8.0 <= end["elapsed"] < 8.0 + 10 and second["elapsed"] >= 8.0


def test_time_budget_schedule_and_config() -> None:
    from a2n.training import lr_at_time

    cfg = load_config(None, ["time_budget_hours=1", "iterations=100", "warmup=10", "lr=1e-3", "min_lr=0"])
    assert cfg.time_budget_hours == 1.0 and isinstance(cfg.time_budget_hours, float)
    assert lr_at_time(0, cfg) == 0 and lr_at_time(180, cfg) == pytest.approx(5e-4)  # half-way up the warm-up (10% of 1 h)
    assert lr_at_time(360, cfg) == pytest.approx(1e-3) and lr_at_time(360 + 1620, cfg) == pytest.approx(5e-4)
    assert lr_at_time(3600, cfg) == 0 and lr_at_time(7200, cfg) == 0
    assert config_from_dict({}).time_budget_hours is None and load_config(ROOT / "configs" / "a2n_joint.yaml").time_budget_hours is None
    with pytest.raises(ConfigError, match="time_budget_hours must be positive"):
        config_from_dict({"time_budget_hours": 0})
    with pytest.raises(ConfigError, match="time_budget_hours must be float"):
        config_from_dict({"time_budget_hours": "soon"})
    with pytest.raises(ConfigError, match="restart_every counts steps"):
        config_from_dict({"time_budget_hours": 1, "restart_every": 100})
    with pytest.raises(ConfigError, match="warmup 100 >= iterations 100"):
        config_from_dict({"time_budget_hours": 1, "warmup": 100, "iterations": 100})


def test_gpu_recipe_runs_on_cpu_with_a_tiny_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """scripts/train_gpu.py with configs/a2n_joint_gpu.yaml made tiny, on CPU for 3 seconds: best and last
    files at x2/x3/x4 and the Set5 table (here a tiny benchmark) with the gain over the shipped files."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_gpu", ROOT / "scripts" / "train_gpu.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    bench = tiny_benchmark(tmp_path / "bench", (2, 3, 4))
    run = tmp_path / "gpu"
    overrides = [f"train_dirs=[{make_images(tmp_path / 'hr')}]", f"cache_dir={tmp_path / 'cache'}", f"val_dir={bench}",
                 f"out_dir={run}", "patch_size=12", "batch_size=4", "workers=1", "precision=fp32", "val_every=3",
                 "tensorboard=false"]
    cwd = os.getcwd()
    os.chdir(ROOT)  # init_weights (the shipped files) is relative to the repository root
    try:
        status = script.main(["--device", "cpu", "--minutes", "0.05", "--set5", str(bench), *overrides])
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert status == 0, out
    for s in (2, 3, 4):
        assert (run / f"best_x{s}.safetensors").is_file() and (run / f"last_x{s}.safetensors").is_file()
    table = json.loads((run / "set5.json").read_text())
    assert [r["scale"] for r in table["rows"]] == [2, 3, 4] and table["device"] == "cpu"
    assert all(r["gain"] == pytest.approx(r["trained"] - r["shipped"]) and r["shipped"] > 25 for r in table["rows"])
    assert "scale  shipped  trained    gain" in out and out.count("\n   x") == 3
    assert torch.load(run / "last.pt", weights_only=True)["config"]["time_budget_hours"] == pytest.approx(0.05 / 60)
    assert script.main(["--device", "cpu", "--minutes", "1", "val_dir=null"]) == 2
    assert "val_dir is null" in capsys.readouterr().err


@pytest.mark.parametrize("native", ["1", "0"])
def test_precision_auto_is_timed_where_bf16_is_native_and_kept_on_resume(tmp_path: Path, monkeypatch, native: str) -> None:
    """Native bf16 is no promise of speed (0.75-0.8x fp32 on a Xeon without AMX): auto times both and takes the faster,
    logs the figures, records its choice in last.pt, and a resumed run takes the recorded choice without timing."""
    monkeypatch.setenv("A2N_NATIVE_BF16", native)  # the logic of either kind of CPU, on this one
    cfg = base_config(tmp_path, precision="auto", iterations=3, workers=0)
    train(config_from_dict(cfg))
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    timed = log_records(tmp_path / "run", kind="precision")
    if native == "0":
        assert timed == [] and ckpt["amp"] == "fp32"
    else:
        assert len(timed) == 1 and timed[0]["fp32"] > 0 and timed[0]["bf16"] > 0
        assert timed[0]["chosen"] == max(("fp32", "bf16"), key=lambda k: timed[0][k]) == ckpt["amp"]
    cfg["iterations"] = 5
    summary = train(config_from_dict(cfg), resume=True)
    assert summary["step"] == 5 and torch.load(tmp_path / "run" / "last.pt", weights_only=True)["amp"] == ckpt["amp"]
    assert len(log_records(tmp_path / "run", kind="precision")) == len(timed)
