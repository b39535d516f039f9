"""The paper's "Xception-50": ResNet-50's bottleneck layout with every 3x3 conv made separable.

He, Zhang, Sun (2017) prune such a network to show that channel pruning also works on
depthwise-separable convs. The separable layer is depthwise 3x3 (groups = channels, carries the
stride) + BN, then pointwise 1x1 + BN (+ the block's ReLU); no activation between the two, as in
Xception. Everything else is the bottleneck ResNet of :mod:`.resnet`.
"""

from __future__ import annotations

import torch
from torch import nn

from .resnet import Bottleneck, ResNet, resnet50_small


class SeparableBottleneck(Bottleneck):
    """Bottleneck whose middle layer is conv2_dw/bn2_dw (depthwise 3x3) then conv2_pw/bn2 (1x1)."""

    def make_mid(self, planes: int, stride: int) -> None:
        self.conv2_dw = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, groups=planes, bias=False)
        self.bn2_dw = nn.BatchNorm2d(planes)
        self.conv2_pw = nn.Conv2d(planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)

    def forward_mid(self, out: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2_pw(self.bn2_dw(self.conv2_dw(out))))


def xception50_small(in_chans: int = 1, num_classes: int = 10) -> ResNet:
    """Xception-50 at the width of :func:`.resnet.resnet50_small` ([3, 4, 6, 3] separable bottlenecks),
    about 0.87 M parameters."""
    return resnet50_small(in_chans, num_classes, block=SeparableBottleneck)
