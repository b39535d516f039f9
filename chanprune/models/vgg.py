"""CIFAR-style VGG-16 at half width: 13 conv3x3 + BN + ReLU, 5 max-pools, a small classifier."""

from __future__ import annotations

from collections import OrderedDict
from typing import Type

import torch
from torch import nn

# (stage, widths) of VGG-16 at half width; a max-pool closes every stage.
VGG16_HALF = ((1, (32, 32)), (2, (64, 64)), (3, (128, 128, 128)), (4, (256, 256, 256)), (5, (256, 256, 256)))


class ConvBNAct(nn.Sequential):
    """conv3x3 (no bias) -> BatchNorm -> activation, with named children conv / bn / act."""

    def __init__(self, in_ch: int, out_ch: int, act_layer: Type[nn.Module] = nn.ReLU):
        super().__init__(OrderedDict(
            conv=nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            bn=nn.BatchNorm2d(out_ch),
            act=act_layer(inplace=True),
        ))


class VGG(nn.Module):
    """VGG for 32x32 inputs; layers are named conv{stage}_{index} as in the paper."""

    def __init__(self, cfg=VGG16_HALF, in_chans: int = 1, num_classes: int = 10, hidden: int = 256,
                 act_layer: Type[nn.Module] = nn.ReLU):
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        width = in_chans
        for stage, widths in cfg:
            for i, out_ch in enumerate(widths, start=1):
                layers[f"conv{stage}_{i}"] = ConvBNAct(width, out_ch, act_layer)
                width = out_ch
            layers[f"pool{stage}"] = nn.MaxPool2d(2)
        self.features = nn.Sequential(layers)
        self.classifier = nn.Sequential(OrderedDict(
            fc1=nn.Linear(width, hidden),
            act=act_layer(inplace=True),
            fc2=nn.Linear(hidden, num_classes),
        ))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(x, 1))


def vgg16_half(in_chans: int = 1, num_classes: int = 10) -> VGG:
    """The reference VGG-16 at half width (about 3.7 M parameters)."""
    return VGG(VGG16_HALF, in_chans=in_chans, num_classes=num_classes)
