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


def _outputs(model: A2N, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.eval()(torch.rand(1, 3, 20, 24))


@pytest.mark.parametrize("scale", [2, 4])
def test_convert_pixel_range_keeps_the_outputs(tmp_path: Path, scale: int) -> None:
    """0..1 -> 0..255 -> 0..1 rewrites the tensors (biases x255, sigmoid/ADM feeds /255) and keeps every output."""
    from a2n.weights import convert_file

    torch.manual_seed(scale)
    model = A2N(scale)
    for block in model.blocks:  # ADM logits big enough that a wrong rescale would move pi_attn
        block.ADM[0].weight.data.mul_(40)
    src = tmp_path / f"w_x{scale}.safetensors"
    save_weights(model, src, trained="test")
    to255 = convert_file(src, tmp_path / "w255.safetensors", 255.0)
    back = convert_file(tmp_path / "w255.safetensors", tmp_path / "w1.safetensors", 1.0)
    loaded = build_model(scale, "a2n", tmp_path / "w255.safetensors")
    assert loaded.pixel_range == 255.0 and to_255_changed(model, loaded)
    _, meta = read_checkpoint(tmp_path / "w255.safetensors")
    assert meta["trained"] == "test" and "pixel range 1" in meta["converted_from"]
    ref = _outputs(model)
    for other in (to255, loaded, back):
        assert (_outputs(other) - ref).abs().max() < 1e-5


def to_255_changed(a: A2N, b: A2N) -> bool:
    """The converted file really holds other numbers: biases x255, the 1x1 sigmoid feeds /255."""
    sa, sb = a.state_dict(), b.state_dict()
    return (torch.allclose(sb["conv_first.bias"], sa["conv_first.bias"] * 255)
            and torch.allclose(sb["att1.conv.weight"], sa["att1.conv.weight"] / 255)
            and torch.equal(sb["att1.conv.bias"], sa["att1.conv.bias"])
            and torch.allclose(sb["AAB_trunk.3.ADM.0.weight"], sa["AAB_trunk.3.ADM.0.weight"] / 255))


def test_convert_official_weights_to_0_1(tmp_path: Path) -> None:
    from conftest import OFFICIAL, need
    from a2n.weights import convert_file

    official = build_model(2, "a2n", need(OFFICIAL / "aan_x2.pt"))
    converted = convert_file(OFFICIAL / "aan_x2.pt", tmp_path / "aan_x2_01.safetensors", 1.0)
    assert converted.pixel_range == 1.0
    assert (_outputs(converted) - _outputs(official)).abs().max() < 1e-5


def test_convert_cli_and_its_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from a2n.cli import main

    torch.manual_seed(0)
    save_weights(A2N(3), tmp_path / "w.safetensors")
    assert main(["convert", str(tmp_path / "w.safetensors"), "-o", str(tmp_path / "c.safetensors")]) == 0
    assert "a2n x3 for pixels in 0..255" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "w.safetensors"), "-o", str(tmp_path / "c.safetensors")]) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    torch.save(A2N(2).state_dict(), tmp_path / "anonymous.pt")
    assert main(["convert", str(tmp_path / "anonymous.pt"), "-o", str(tmp_path / "d.safetensors"), "--pixel-range", "1"]) == 1
    assert "pass --scale" in capsys.readouterr().err
    save_weights(A2N(2, variant="additive"), tmp_path / "add_x2.safetensors")
    assert main(["convert", str(tmp_path / "add_x2.safetensors"), "-o", str(tmp_path / "e.safetensors")]) == 1
    assert "cannot be converted between pixel ranges exactly" in capsys.readouterr().err
