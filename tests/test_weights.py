"""Weights files: official wrappers and prefixes, our safetensors with metadata, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from a2n.model import A2N
from a2n.weights import WeightsError, build_model, load_weights, read_checkpoint, save_weights


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return A2N(2).state_dict()


@pytest.mark.parametrize("wrapper", [None, "params", "params_ema", "state_dict", "model"])
@pytest.mark.parametrize("prefix", ["", "module."])
@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_official_wrappers(tmp_path: Path, state, wrapper, prefix, suffix) -> None:
    sd = {prefix + k: v for k, v in state.items()}
    obj = sd if wrapper is None else {wrapper: sd, "iter": 5}
    path = tmp_path / f"ckpt_x2{suffix}"
    torch.save(obj, path)
    model = A2N(2)
    load_weights(model, path)
    assert model.pixel_range == 255.0
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_safetensors_roundtrip_with_metadata(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = A2N(3, "a2n-m")
    path = tmp_path / "mine.safetensors"
    save_weights(model, path, trained="unit test", step=7)
    loaded = A2N(3, "a2n-m")
    meta = load_weights(loaded, path)
    assert meta["scale"] == "3" and meta["variant"] == "a2n-m" and meta["trained"] == "unit test" and meta["step"] == "7"
    assert loaded.pixel_range == 1.0
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert not list(tmp_path.glob("*.tmp"))


def test_mismatches_name_the_file(tmp_path: Path, state) -> None:
    x2 = tmp_path / "w_x2.pt"
    torch.save(state, x2)
    with pytest.raises(WeightsError, match=r"w_x2\.pt.*x2 or x3.*x4"):
        load_weights(A2N(4), x2)
    with pytest.raises(WeightsError, match=r"w_x2\.pt.*x2.*--scale 2"):
        load_weights(A2N(3), x2)
    with pytest.raises(WeightsError, match=r"w_x2\.pt.*holds a2n weights.*a2n-m"):
        load_weights(A2N(2, "a2n-m"), x2)
    mine = tmp_path / "m.safetensors"
    save_weights(A2N(4), mine)
    with pytest.raises(WeightsError, match=r"m\.safetensors.*x4.*x2"):
        load_weights(A2N(2), mine)


def test_broken_files(tmp_path: Path, state) -> None:
    good = tmp_path / "good.pt"
    torch.save(state, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(WeightsError, match="truncated.pt.*truncated"):
        read_checkpoint(truncated)
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(WeightsError, match="notes.pth"):
        read_checkpoint(text)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(WeightsError, match="empty.safetensors.*empty"):
        read_checkpoint(empty)
    bad_st = tmp_path / "bad.safetensors"
    save_weights(A2N(2), bad_st)
    bad_st.write_bytes(bad_st.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="bad.safetensors"):
        read_checkpoint(bad_st)
    other = tmp_path / "other.pt"
    torch.save({"foo": {"bar": 1}}, other)
    with pytest.raises(WeightsError, match="other.pt.*no state dict"):
        read_checkpoint(other)
    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in state.items() if "AAB_trunk.15" not in k}, partial)
    with pytest.raises(WeightsError, match="partial.pt.*missing keys"):
        load_weights(A2N(2), partial)
    with pytest.raises(WeightsError, match="missing.pt: no such"):
        build_model(2, "a2n", tmp_path / "missing.pt")


def test_training_checkpoint_loads_ema_on_0_1(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model, ema = A2N(4), A2N(4)
    path = tmp_path / "last.pt"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "step": 9, "config": {"scale": 4, "variant": "a2n"}}, path)
    loaded = A2N(4)
    meta = load_weights(loaded, path)
    assert loaded.pixel_range == 1.0 and meta["step"] == "9"
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ema.state_dict().items())
