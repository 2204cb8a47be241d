"""A2N: Attention in Attention Network (Chen, Gu, Zhang, arXiv 2104.09497).

Module names follow the authors' official code so that their checkpoints load with strict key
matching. The network always takes and returns images in 0..1; ``pixel_range`` scales around the
trunk for weights that were trained on 0..255 (the official ones).
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Variant = Literal["a2n", "a2n-m", "additive"]
VARIANTS: tuple[str, ...] = ("a2n", "a2n-m", "additive")
SCALES: tuple[int, ...] = (2, 3, 4)


class BranchWeights(nn.Module):
    """Softmax with temperature over the ADM logits: returns (pi_attn, pi_non_attn) per image.

    Setting ``force_attn`` to a number fixes pi_attn to it (and pi_non_attn to 1 - it): the
    paper's attention dropout. Forward hooks on this module read the weights.
    """

    def __init__(self, temperature: float = 30.0) -> None:
        super().__init__()
        self.temperature = temperature
        self.force_attn: float | None = None

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        pi = F.softmax(logits / self.temperature, dim=1)
        if self.force_attn is not None:
            attn = torch.full_like(pi[:, :1], float(self.force_attn))
            pi = torch.cat([attn, 1.0 - attn], dim=1)
        return pi


class AttentionBranch(nn.Module):
    """Official attention branch: k4(k3(x) * sigmoid(k2(lrelu(k1(x)))))."""

    def __init__(self, nf: int) -> None:
        super().__init__()
        self.k1 = nn.Conv2d(nf, nf, 3, padding=1, bias=False)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)
        self.k2 = nn.Conv2d(nf, nf, 1)
        self.sigmoid = nn.Sigmoid()  # forward hooks here read the attention mask
        self.k3 = nn.Conv2d(nf, nf, 3, padding=1, bias=False)
        self.k4 = nn.Conv2d(nf, nf, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.sigmoid(self.k2(self.lrelu(self.k1(x))))
        return self.k4(self.k3(x) * mask)


class AdditiveAttentionBranch(nn.Module):
    """The seed article's branch: conv_attention(attention1(x) + sigmoid(attention2(x)))."""

    def __init__(self, nf: int) -> None:
        super().__init__()
        self.attention1 = nn.Conv2d(nf, nf, 3, padding=1, bias=False)
        self.attention2 = nn.Sequential(
            nn.Conv2d(nf, nf, 3, padding=1, bias=False),
            nn.Conv2d(nf, nf, 1, bias=False),
        )
        self.sigmoid = nn.Sigmoid()  # forward hooks here read the attention mask
        self.conv_attention = nn.Conv2d(nf, nf, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_attention(self.attention1(x) + self.sigmoid(self.attention2(x)))


class AAB(nn.Module):
    """Attention in Attention Block: an attention and a non-attention branch mixed by the ADM."""

    def __init__(self, nf: int, variant: Variant = "a2n", reduction: int = 4, temperature: float = 30.0) -> None:
        super().__init__()
        self.conv_first = nn.Conv2d(nf, nf, 1, bias=False)
        self.conv_last = nn.Conv2d(nf, nf, 1, bias=False)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)
        self.ADM = nn.Sequential(
            nn.Linear(nf, nf // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(nf // reduction, 2, bias=False),
        )
        self.branch_weights = BranchWeights(temperature)
        self.attention: nn.Module = AdditiveAttentionBranch(nf) if variant == "additive" else AttentionBranch(nf)
        kernel = 1 if variant == "a2n-m" else 3
        self.non_attention = nn.Conv2d(nf, nf, kernel, padding=kernel // 2, bias=False)

    def entry(self, x: torch.Tensor) -> torch.Tensor:
        """The block's pointwise first step; its spatial mean drives the ADM."""
        return self.lrelu(self.conv_first(x))

    def branches(self, y: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """The two branches on y = entry(x), weighted by the ADM given the spatial mean of y: conv_last's input."""
        pi = self.branch_weights(self.ADM(pooled))
        n = pi.shape[0]
        return self.lrelu(self.attention(y) * pi[:, 0].view(n, 1, 1, 1) + self.non_attention(y) * pi[:, 1].view(n, 1, 1, 1))

    def mix(self, x: torch.Tensor, y: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """The rest of the block, given its input x, y = entry(x) and the spatial mean of y."""
        return self.conv_last(self.branches(y, pooled)) + x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.entry(x)
        return self.mix(x, y, y.mean(dim=(2, 3)))


class PA(nn.Module):
    """Pixel attention of the reconstruction stage: x * sigmoid(conv1x1(x))."""

    def __init__(self, nf: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(nf, nf, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv(x))


class A2N(nn.Module):
    """The full network: shallow conv, 16 AABs, trunk conv, nearest-upsampling reconstruction."""

    def __init__(
        self,
        scale: int = 4,
        variant: Variant = "a2n",
        nf: int = 40,
        unf: int = 24,
        nb: int = 16,
        in_nc: int = 3,
        out_nc: int = 3,
        pixel_range: float = 1.0,
    ) -> None:
        super().__init__()
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.scale = scale
        self.variant = variant
        self.pixel_range = pixel_range
        self.conv_first = nn.Conv2d(in_nc, nf, 3, padding=1)
        self.AAB_trunk = nn.Sequential(*[AAB(nf, variant) for _ in range(nb)])
        self.trunk_conv = nn.Conv2d(nf, nf, 3, padding=1)
        self.upconv1 = nn.Conv2d(nf, unf, 3, padding=1)
        self.att1 = PA(unf)
        self.HRconv1 = nn.Conv2d(unf, unf, 3, padding=1)
        if scale == 4:
            self.upconv2 = nn.Conv2d(unf, unf, 3, padding=1)
            self.att2 = PA(unf)
            self.HRconv2 = nn.Conv2d(unf, unf, 3, padding=1)
        self.conv_last = nn.Conv2d(unf, out_nc, 3, padding=1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

    @property
    def blocks(self) -> list[AAB]:
        return list(self.AAB_trunk)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Shallow features of an image in 0..1."""
        return self.conv_first(x * self.pixel_range if self.pixel_range != 1.0 else x)

    def reconstruct(self, fea: torch.Tensor) -> torch.Tensor:
        """Trunk features (after the global skip) to the residual image, in the model's range."""
        if self.scale == 4:
            fea = self.upconv1(F.interpolate(fea, scale_factor=2, mode="nearest"))
            fea = self.lrelu(self.att1(fea))
            fea = self.lrelu(self.HRconv1(fea))
            fea = self.upconv2(F.interpolate(fea, scale_factor=2, mode="nearest"))
            fea = self.lrelu(self.att2(fea))
            fea = self.lrelu(self.HRconv2(fea))
        else:
            fea = self.upconv1(F.interpolate(fea, scale_factor=self.scale, mode="nearest"))
            fea = self.lrelu(self.att1(fea))
            fea = self.lrelu(self.HRconv1(fea))
        return self.conv_last(fea)

    def tail(self, x: torch.Tensor, fea: torch.Tensor, trunk: torch.Tensor) -> torch.Tensor:
        """The output image in 0..1 from the input x, its shallow features and the AAB trunk's output."""
        out = self.reconstruct(fea + self.trunk_conv(trunk))
        if self.pixel_range != 1.0:
            out = out / self.pixel_range
        return out + F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fea = self.head(x)
        return self.tail(x, fea, self.AAB_trunk(fea))


def pixelwise(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A bias-free 1x1 conv on channels-last features (N x H x W x C), as a matmul over the pixels."""
    n, h, w, c = x.shape
    out = torch.matmul(x.reshape(n, h * w, c), conv.weight.view(conv.out_channels, c).t())
    return out.view(n, h, w, conv.out_channels)


def entry_sum(block: AAB, fea: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """block.entry of channels-last features (N x H x W x C) summed over the pixels that rows (H) and cols (W),
    0/1 masks, select: N x C.

    The tiled path sums each block's entry over whole tiles this way inside the previous stage's
    graph, on features that are still in cache, rather than in a separate pass; by two matmuls (cols along each
    row, then rows), which cost a block stage two-thirds of what masking the map and summing it did."""
    y = block.lrelu(pixelwise(fea, block.conv_first))
    n, h, w, c = y.shape
    per_row = torch.matmul(cols.view(1, 1, 1, w), y).view(n, h, c)
    return torch.matmul(rows.view(1, 1, h), per_row).view(n, c)


# The stages of exact tiled inference (a2n.tiling), as modules to export. Their feature maps are
# channels-last (N x H x W x C), the layout of CPU runtimes' convolutions, and each block ends in
# matmuls over the pixels rather than 1x1 convs, so that its output stays channels-last: OpenVINO
# then writes it out without the transpose and reorder it adds after a conv (7% of a block).


class HeadStage(nn.Module):
    """Shallow features of an image part (channels-last) and the first block's entry summed over rows x cols."""

    def __init__(self, model: A2N) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fea = self.model.head(x).permute(0, 2, 3, 1)
        return fea, entry_sum(self.model.blocks[0], fea, rows, cols)


class BlockStage(nn.Module):
    """One AAB on a channels-last feature part, given the pooled mean of its entry features over the whole
    image, and the next block's entry summed over rows x cols of the result (none after the last block)."""

    def __init__(self, block: AAB, following: AAB | None = None) -> None:
        super().__init__()
        self.block = block
        self.following = following

    def forward(self, part: torch.Tensor, pooled: torch.Tensor, rows: torch.Tensor | None = None,
                cols: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = part.permute(0, 3, 1, 2)
        mixed = self.block.branches(self.block.entry(x), pooled).permute(0, 2, 3, 1)
        out = pixelwise(mixed, self.block.conv_last) + part
        if self.following is None:
            return out
        return out, entry_sum(self.following, out, rows, cols)


class TailStage(nn.Module):
    """The output part in 0..1 from an image part and the trunk's features over it (channels-last)."""

    def __init__(self, model: A2N) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, trunk: torch.Tensor) -> torch.Tensor:
        return self.model.tail(x, self.model.head(x), trunk.permute(0, 3, 1, 2))


class MultiScaleA2N(nn.Module):
    """A2N networks for several scales that share one trunk (head, AABs, trunk conv).

    Each scale keeps its own reconstruction, so `net(s)` is a plain A2N for scale s whose state
    dict is exactly that of a single-scale model: the joint training of multi-scale SR models.
    """

    def __init__(self, scales: tuple[int, ...] | list[int], variant: Variant = "a2n", pixel_range: float = 1.0) -> None:
        super().__init__()
        nets = [A2N(scale=s, variant=variant, pixel_range=pixel_range) for s in scales]
        for other in nets[1:]:
            other.conv_first, other.AAB_trunk, other.trunk_conv = nets[0].conv_first, nets[0].AAB_trunk, nets[0].trunk_conv
        self.scales = tuple(scales)
        self.nets = nn.ModuleDict({f"x{s}": n for s, n in zip(scales, nets)})

    def net(self, scale: int) -> A2N:
        return self.nets[f"x{scale}"]  # type: ignore[return-value]

    def forward(self, x: torch.Tensor, scale: int) -> torch.Tensor:
        return self.net(scale)(x)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, height: int, width: int) -> int:
    """Multiply-accumulates of convolutions and linear layers for one LR image of this size."""
    total = 0

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += output.numel() * k
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features

    shadow = copy.deepcopy(model).to("meta")  # shapes only: no memory, no arithmetic
    for m in shadow.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        shadow(torch.zeros(1, 3, height, width, device="meta"))
    return total

