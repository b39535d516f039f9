"""Layers that pruned models may contain besides ordinary torch.nn ones."""

from __future__ import annotations

import torch
from torch import nn


class SelectedConv2d(nn.Conv2d):
    """A dense Conv2d that reads only the input channels ``index`` (the paper's feature-map sampling).

    Used where a conv's input is shared with a residual shortcut that keeps every channel: the
    conv stays an ordinary dense conv over fewer inputs, behind one index-select (a Gather in
    ONNX). ``index`` is a buffer, so it is saved with the weights.
    """

    def __init__(self, index: torch.Tensor, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros"):
        super().__init__(len(index), out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode)
        self.register_buffer("index", torch.as_tensor(index, dtype=torch.long).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.index_select(1, self.index))


def conv_like(conv: nn.Conv2d, in_channels: int, out_channels: int, groups: int | None = None,
              index: torch.Tensor | None = None) -> nn.Conv2d:
    """A fresh conv with ``conv``'s geometry and new channel counts; keeps (or sets) a channel select."""
    args = (out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups if groups is None else groups, conv.bias is not None, conv.padding_mode)
    if index is None and isinstance(conv, SelectedConv2d):
        index = conv.index
    if index is not None:
        return SelectedConv2d(index, *args)
    return nn.Conv2d(in_channels, *args)
