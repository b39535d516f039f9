"""Layers that pruned models may contain besides ordinary torch.nn ones."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.utils import _pair


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


def scatter_source(keep: torch.Tensor, channels: int) -> torch.Tensor:
    """For each of ``channels`` positions, the kept channel written there (``keep[i]`` gets
    channel i), or ``len(keep)`` (the zero channel) where nothing is written."""
    source = torch.full((channels,), len(keep), dtype=torch.long)
    source[torch.as_tensor(keep, dtype=torch.long)] = torch.arange(len(keep))
    return source


class _Scatter:
    """Writes a layer's k output channels into ``channels`` positions (FCP's fine-grained trunk
    writer): kept channel i goes to position ``keep[i]``, every other position holds its entry of
    ``scatter_fill`` (the mean the dropped output had), so the residual add after the layer stays
    full width. One Pad, one Gather and one Add in ONNX."""

    scatter_source: torch.Tensor
    scatter_fill: torch.Tensor

    def _init_scatter(self, keep: torch.Tensor, channels: int) -> None:
        self.register_buffer("scatter_source", scatter_source(keep, channels))
        self.register_buffer("scatter_fill", torch.zeros(channels))

    def scatter(self, y: torch.Tensor) -> torch.Tensor:
        spatial = y.dim() - 2
        padded = F.pad(y, [0, 0] * spatial + [0, 1])  # channel k: zeros
        return padded.index_select(1, self.scatter_source) + self.scatter_fill.view(1, -1, *[1] * spatial)

    @property
    def scattered_to(self) -> int:
        """Width of the output after the scatter."""
        return len(self.scatter_source)


class ScatteredConv2d(_Scatter, nn.Conv2d):
    """A dense Conv2d computing only the trunk channels ``keep`` of ``channels`` (no BatchNorm follows)."""

    def __init__(self, keep: torch.Tensor, channels: int, in_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros"):
        nn.Conv2d.__init__(self, in_channels, len(keep), kernel_size, stride, padding, dilation, groups, bias,
                           padding_mode)
        self._init_scatter(keep, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scatter(super().forward(x))


class ScatteredBatchNorm2d(_Scatter, nn.BatchNorm2d):
    """A BatchNorm2d over a trunk writer's kept channels ``keep`` of ``channels``, scattered back."""

    def __init__(self, keep: torch.Tensor, channels: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True):
        nn.BatchNorm2d.__init__(self, len(keep), eps, momentum, affine, track_running_stats)
        self._init_scatter(keep, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scatter(super().forward(x))


class FactorizedConv2d(nn.Sequential):
    """A conv replaced by a chain of thinner convs with the same receptive field and outputs (3C,
    see :mod:`chanprune.factorize`): the first conv reads the inputs (input channels are removed
    there), the last writes the outputs and carries the bias (output channels are removed there)."""

    @property
    def in_channels(self) -> int:
        return self[0].in_channels

    @property
    def out_channels(self) -> int:
        return self[-1].out_channels

    @property
    def weight(self) -> torch.Tensor:
        """The last conv's weights: one row per output channel, what filter-ranking criteria read."""
        return self[-1].weight


def conv_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding as the conv applies it ('same' puts any odd extra
    row or column at the bottom / right, as PyTorch does)."""
    if conv.padding == "valid":
        return 0, 0, 0, 0
    if conv.padding == "same":
        (th, tw) = (d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size))
        return tw // 2, tw - tw // 2, th // 2, th - th // 2
    ph, pw = _pair(conv.padding)
    return pw, pw, ph, ph


def own_forward(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` is another library's Conv2d subclass with a forward of its own (timm's
    Conv2dSame pads its input there, by an amount that depends on the input's size)."""
    return type(conv).forward is not nn.Conv2d.forward and not isinstance(conv, SelectedConv2d)


def conv_like(conv: nn.Conv2d, in_channels: int, out_channels: int, groups: int | None = None,
              index: torch.Tensor | None = None) -> nn.Conv2d:
    """A fresh conv with ``conv``'s geometry and new channel counts (weights uninitialised); keeps
    (or sets) a channel select, and the class of a conv with its own forward."""
    args = (out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups if groups is None else groups, conv.bias is not None, conv.padding_mode)
    if index is None and isinstance(conv, SelectedConv2d):
        index = conv.index
    if index is not None:
        return SelectedConv2d(index, *args)
    if own_forward(conv):
        return _resized(conv, in_channels, out_channels, args[5])
    return nn.Conv2d(in_channels, *args)


def _resized(conv: nn.Conv2d, in_channels: int, out_channels: int, groups: int) -> nn.Conv2d:
    """A copy of ``conv`` (its class and settings) with new channel counts and empty weights."""
    weight, bias = conv.weight, conv.bias
    conv.weight, conv.bias = None, None  # not copied
    try:
        new = copy.deepcopy(conv)
    finally:
        conv.weight, conv.bias = weight, bias
    new.in_channels, new.out_channels, new.groups = in_channels, out_channels, groups
    new.weight = nn.Parameter(weight.new_empty(out_channels, in_channels // groups, *conv.kernel_size))
    new.bias = nn.Parameter(bias.new_empty(out_channels)) if bias is not None else None
    return new
