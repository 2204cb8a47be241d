"""The model: official structure (parameters, MACs, strict loading), variants, and the analysis hooks."""

from __future__ import annotations

import pytest
import torch

from a2n.model import A2N, count_macs, count_parameters
from a2n.weights import load_weights, read_checkpoint

from conftest import OFFICIAL, need


@pytest.mark.parametrize(
    "scale,variant,params,gmacs",
    [(2, "a2n", 1_036_443, 247.5), (3, "a2n", 1_036_443, 117.5), (4, "a2n", 1_047_459, 72.4),
     (2, "a2n-m", 831_643, 200.3), (3, "a2n-m", 831_643, 96.6), (4, "a2n-m", 842_659, 60.6)],
)
def test_paper_parameters_and_macs(scale: int, variant: str, params: int, gmacs: float) -> None:
    model = A2N(scale, variant)
    assert count_parameters(model) == params
    assert round(count_macs(model, 720 // scale, 1280 // scale) / 1e9, 1) == gmacs


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("variant", ["a2n", "a2n-m", "additive"])
def test_output_shape(scale: int, variant: str) -> None:
    model = A2N(scale, variant).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 9, 13))
    assert out.shape == (2, 3, 9 * scale, 13 * scale)


@pytest.mark.parametrize("name,scale", [("aan_x2.pt", 2), ("aan_x3.pt", 3)])
def test_official_weights_load_strictly(name: str, scale: int) -> None:
    path = need(OFFICIAL / name)
    state, meta = read_checkpoint(path)
    assert len(state) == 172 and meta == {}
    model = A2N(scale)
    assert str(model.load_state_dict(state, strict=True)) == "<All keys matched successfully>"


def test_official_pixel_range_is_scaled_around() -> None:
    """Official weights work on 0..255: our model takes 0..1 and matches the 0..255 forward."""
    model = A2N(2).eval()
    load_weights(model, need(OFFICIAL / "aan_x2.pt"))
    assert model.pixel_range == 255.0
    x = torch.rand(1, 3, 16, 16)
    raw = A2N(2).eval()
    raw.load_state_dict(model.state_dict())
    with torch.no_grad():
        ours = model(x)
        official = raw(x * 255) / 255  # pixel_range 1: the plain official 0..255 network
    assert torch.allclose(ours, official, atol=1e-5)
    assert 0.0 < float(ours.mean()) < 1.0


def test_force_attention_and_hooks() -> None:
    torch.manual_seed(0)
    model = A2N(2).eval()
    block = model.AAB_trunk[3]
    pis, masks = [], []
    h1 = block.branch_weights.register_forward_hook(lambda m, i, o: pis.append(o))
    h2 = block.attention.sigmoid.register_forward_hook(lambda m, i, o: masks.append(o))
    x = torch.rand(2, 3, 12, 10)
    with torch.no_grad():
        base = model(x)
        assert pis[0].shape == (2, 2) and torch.allclose(pis[0].sum(1), torch.ones(2))
        assert masks[0].shape == (2, 40, 12, 10) and 0 < float(masks[0].min()) and float(masks[0].max()) < 1
        block.branch_weights.force_attn = 0.0
        off = model(x)
        assert torch.equal(pis[-1], torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
        block.branch_weights.force_attn = 1.0
        on = model(x)
        block.branch_weights.force_attn = None
        again = model(x)
    h1.remove()
    h2.remove()
    assert torch.equal(base, again)
    assert (off - base).abs().max() > 1e-6 and (on - base).abs().max() > 1e-6
