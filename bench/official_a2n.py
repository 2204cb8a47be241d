"""The official A2N forward, restated plainly for the speed baseline: eager fp32, NCHW, same parameter names.

Written from the structure of the authors' network (an AAB with average pooling, ADM, softmax
over two branches; PA in the reconstruction), so our state dicts load into it strictly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PA(nn.Module):
    def __init__(self, nf: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(nf, nf, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv(x))


class AttentionBranch(nn.Module):
    def __init__(self, nf: int) -> None:
        super().__init__()
        self.k1 = nn.Conv2d(nf, nf, 3, padding=1, bias=False)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)
        self.k2 = nn.Conv2d(nf, nf, 1)
        self.sigmoid = nn.Sigmoid()
        self.k3 = nn.Conv2d(nf, nf, 3, padding=1, bias=False)
        self.k4 = nn.Conv2d(nf, nf, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.sigmoid(self.k2(self.lrelu(self.k1(x))))
        return self.k4(torch.mul(self.k3(x), y))


class AAB(nn.Module):
    def __init__(self, nf: int, reduction: int = 4, t: float = 30.0) -> None:
        super().__init__()
        self.t = t
        self.conv_first = nn.Conv2d(nf, nf, 1, bias=False)
        self.conv_last = nn.Conv2d(nf, nf, 1, bias=False)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.ADM = nn.Sequential(nn.Linear(nf, nf // reduction, bias=False), nn.ReLU(inplace=True), nn.Linear(nf // reduction, 2, bias=False))
        self.attention = AttentionBranch(nf)
        self.non_attention = nn.Conv2d(nf, nf, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        n, c = x.shape[:2]
        x = self.lrelu(self.conv_first(x))
        weights = F.softmax(self.ADM(self.avg_pool(x).view(n, c)) / self.t, dim=1)
        x = self.attention(x) * weights[:, 0].view(n, 1, 1, 1) + self.non_attention(x) * weights[:, 1].view(n, 1, 1, 1)
        out = self.conv_last(self.lrelu(x))
        out += residual
        return out


class AAN(nn.Module):
    def __init__(self, scale: int = 4, in_nc: int = 3, out_nc: int = 3, nf: int = 40, unf: int = 24, nb: int = 16) -> None:
        super().__init__()
        self.scale = scale
        self.conv_first = nn.Conv2d(in_nc, nf, 3, padding=1)
        self.AAB_trunk = nn.Sequential(*[AAB(nf) for _ in range(nb)])
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fea = self.conv_first(x)
        fea = fea + self.trunk_conv(self.AAB_trunk(fea))
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
        out = self.conv_last(fea)
        return out + F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)


def forward_chop(net: nn.Module, x: torch.Tensor, scale: int, shave: int = 10, min_size: int = 160000) -> torch.Tensor:
    """How the official test code runs big images: four overlapping quadrants (shave pixels of
    overlap), split again until a quadrant has under min_size pixels, each run on its own.

    Not exact for A2N: each quadrant's ADMs pool over that quadrant only.
    """
    _, _, h, w = x.shape
    h_size, w_size = h // 2 + shave, w // 2 + shave
    parts = [x[:, :, :h_size, :w_size], x[:, :, :h_size, w - w_size:], x[:, :, h - h_size:, :w_size], x[:, :, h - h_size:, w - w_size:]]
    if h_size * w_size < min_size:
        outs = [net(p) for p in parts]
    else:
        outs = [forward_chop(net, p, scale, shave, min_size) for p in parts]
    h, w, h_half, w_half, h_size, w_size = (scale * v for v in (h, w, h // 2, w // 2, h_size, w_size))
    out = x.new_empty(1, outs[0].shape[1], h, w)
    out[:, :, :h_half, :w_half] = outs[0][:, :, :h_half, :w_half]
    out[:, :, :h_half, w_half:] = outs[1][:, :, :h_half, w_size - w + w_half:]
    out[:, :, h_half:, :w_half] = outs[2][:, :, h_size - h + h_half:, :w_half]
    out[:, :, h_half:, w_half:] = outs[3][:, :, h_size - h + h_half:, w_size - w + w_half:]
    return out
