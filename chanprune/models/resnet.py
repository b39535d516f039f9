"""CIFAR-style ResNets for 32x32 inputs: ResNet-20/56 (basic blocks) and a slim ResNet-50 (bottlenecks).

Module names follow torchvision (conv1/bn1, layer1..layerN, block.conv1/bn1/.../downsample, avgpool,
fc) so that layer names in pruning reports read like the paper's. Every residual branch ends in
``bn -> add``: the pruner recognises that pattern, and nothing may sit between the two.
Downsampling shortcuts are 1x1 conv + BN (option B of the ResNet paper), never zero padding.
"""

from __future__ import annotations

from typing import Sequence, Type

import torch
from torch import nn


def downsample(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    """The projection shortcut: 1x1 conv (no bias) + BN, children "0" and "1" as in torchvision."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; the second BN feeds the shortcut add directly."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, act_layer: Type[nn.Module] = nn.ReLU):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = act_layer(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample(inplanes, planes, stride) if stride != 1 or inplanes != planes else None
        self.relu2 = act_layer(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu2(out)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (carries the stride) -> 1x1 expand (x4), BN after each; bn3 feeds the add.

    The middle layer is built by :meth:`make_mid` and run by :meth:`forward_mid`, so variants (the
    separable bottleneck of Xception-50) override those two and reuse everything else.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, act_layer: Type[nn.Module] = nn.ReLU):
        super().__init__()
        width = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = act_layer(inplace=True)
        self.make_mid(planes, stride)
        self.relu2 = act_layer(inplace=True)
        self.conv3 = nn.Conv2d(planes, width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.downsample = downsample(inplanes, width, stride) if stride != 1 or inplanes != width else None
        self.relu3 = act_layer(inplace=True)

    def make_mid(self, planes: int, stride: int) -> None:
        """Register the middle layer: conv2 (3x3, stride) + bn2."""
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)

    def forward_mid(self, out: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.forward_mid(out))
        out = self.bn3(self.conv3(out))
        out = out + identity
        return self.relu3(out)


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) convs, BN at gamma 1 / beta 0, default Linear.

    fan_out is divided by ``groups``: PyTorch's own fan_out ignores groups, which would make the
    depthwise filters of separable convs about sqrt(channels) times too small.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
            nn.init.normal_(m.weight, std=(2.0 / fan_out) ** 0.5)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNet(nn.Module):
    """3x3 stride-1 stem, one stage (``layer{i}``) per entry of ``layers``, global pool, ``fc``."""

    def __init__(self, block: Type[BasicBlock] | Type[Bottleneck], layers: Sequence[int],
                 planes: Sequence[int], strides: Sequence[int], stem: int, in_chans: int = 1,
                 num_classes: int = 10, act_layer: Type[nn.Module] = nn.ReLU):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, stem, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = act_layer(inplace=True)
        width = stem
        for i, (depth, p, stride) in enumerate(zip(layers, planes, strides), start=1):
            blocks = []
            for j in range(depth):
                blocks.append(block(width, p, stride if j == 0 else 1, act_layer=act_layer))
                width = p * block.expansion
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.num_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        x = self.avgpool(x)
        return self.fc(torch.flatten(x, 1))


def _cifar_resnet(depth: int, in_chans: int, num_classes: int) -> ResNet:
    """ResNet-(6n+2) of the ResNet paper's CIFAR section: 3 stages of n basic blocks, widths 16/32/64."""
    n = (depth - 2) // 6
    return ResNet(BasicBlock, (n, n, n), (16, 32, 64), (1, 2, 2), stem=16, in_chans=in_chans,
                  num_classes=num_classes)


def resnet20(in_chans: int = 1, num_classes: int = 10) -> ResNet:
    """ResNet-20 (3 x 3 basic blocks), about 0.27 M parameters."""
    return _cifar_resnet(20, in_chans, num_classes)


def resnet56(in_chans: int = 1, num_classes: int = 10) -> ResNet:
    """ResNet-56 (3 x 9 basic blocks), about 0.86 M parameters; the paper's CIFAR-10 ResNet."""
    return _cifar_resnet(56, in_chans, num_classes)


# ResNet-50's bottleneck layout at a quarter of its width, for 32x32 inputs (no 7x7 stem, no max-pool).
RESNET50_SMALL = {"layers": (3, 4, 6, 3), "planes": (16, 32, 64, 128), "strides": (1, 2, 2, 2), "stem": 16}


def resnet50_small(in_chans: int = 1, num_classes: int = 10,
                   block: Type[Bottleneck] = Bottleneck) -> ResNet:
    """ResNet-50 layout ([3, 4, 6, 3] bottlenecks, outputs 64/128/256/512) at quarter width, about 1.48 M
    parameters; ``block`` swaps the bottleneck (see :mod:`.xception`)."""
    return ResNet(block, in_chans=in_chans, num_classes=num_classes, **RESNET50_SMALL)
