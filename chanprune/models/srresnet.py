"""An MSRResNet-style super-resolution network (Wang et al.'s MSRResNet, the network FCP prunes):
residual blocks without BatchNorm on a trunk, pixel-shuffle upsampling and a global bilinear
skip. No classifier: the output is an image, ``scale`` times larger than the input."""

from __future__ import annotations

import torch
from torch import nn


class ResidualBlockNoBN(nn.Module):
    """x + conv2(relu(conv1(x))), 3×3 convs, no normalisation."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.conv1(x)))


class MSRResNet(nn.Module):
    """conv_first → ``blocks`` residual blocks → upconv (``width``·scale² channels) → pixel
    shuffle → hr_conv → conv_last, plus the bilinearly upsampled input."""

    def __init__(self, in_chans: int = 3, width: int = 32, blocks: int = 8, scale: int = 2):
        super().__init__()
        self.scale = scale
        self.conv_first = nn.Conv2d(in_chans, width, 3, padding=1)
        self.body = nn.Sequential(*(ResidualBlockNoBN(width) for _ in range(blocks)))
        self.upconv = nn.Conv2d(width, width * scale * scale, 3, padding=1)
        self.shuffle = nn.PixelShuffle(scale)
        self.hr_conv = nn.Conv2d(width, width, 3, padding=1)
        self.conv_last = nn.Conv2d(width, in_chans, 3, padding=1)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(self.act(self.conv_first(x)))
        out = self.act(self.shuffle(self.upconv(out)))
        out = self.conv_last(self.act(self.hr_conv(out)))
        base = nn.functional.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return out + base


def msrresnet_small() -> MSRResNet:
    """The bundled x2 model: 32 channels, 6 residual blocks (MSRResNet has 64 and 16), small
    enough to train on two CPU cores in about half an hour."""
    return MSRResNet(width=32, blocks=6, scale=2)
