"""Convs with a forward of their own (timm's Conv2dSame: TensorFlow's 'SAME' padding, computed
from the input's size in forward, which torch.fx cannot trace): traced as leaves and checked to be
a convolution, they read, write and follow channels like any conv (their input samples taken with
the padding found), and the pruned model keeps their class; a subclass that is not a plain
convolution is left whole."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from chanprune import prune
from chanprune.config import PruneConfig
from chanprune.graph import build_graph
from chanprune.units import pruning_units

from conftest import assert_exact_against_zeroed, assert_round_trips, in_float64, prune_groups_directly, randomise


class SameConv2d(nn.Conv2d):
    """TensorFlow 'SAME' padding worked out from the input in forward, as timm's Conv2dSame."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, padding=0, **kwargs)

    def forward(self, x):
        pads = []
        for size, k, s, d in zip(reversed(x.shape[2:]), reversed(self.kernel_size), reversed(self.stride),
                                 reversed(self.dilation)):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class SquaredConv2d(nn.Conv2d):
    """Not a convolution: the square of one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, padding=2, **kwargs)

    def forward(self, x):
        return super().forward(x) ** 2


class SameNet(nn.Module):
    """stem (SAME, stride 2) → BN → depthwise (SAME, stride 2) → BN → 1x1 → SAME 5x5 reader → head."""

    def __init__(self, reader: type[nn.Conv2d] = SameConv2d):
        super().__init__()
        self.stem = SameConv2d(3, 8, 3, stride=2, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = SameConv2d(8, 8, 3, stride=2, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 12, 1)
        self.conv = reader(12, 10, 5, stride=2)
        self.fc = nn.Linear(10, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.stem(x)))
        x = F.relu(self.bn2(self.dw(x)))
        x = F.relu(self.conv(F.relu(self.pw(x))))
        return self.fc(x.mean((2, 3)))


def images(n: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, 15, 15, generator=torch.Generator().manual_seed(3))


def test_convs_with_their_own_padding_read_write_and_follow_channels():
    graph = build_graph(randomise(SameNet(), 0), images(1))
    stem, pw, conv = graph.group("stem"), graph.group("pw"), graph.group("conv")
    assert stem.prunable and stem.followers == ["bn1", "dw", "bn2"] and [r.name for r in stem.readers] == ["pw"]
    assert pw.prunable and [r.name for r in pw.readers] == ["conv"]
    assert pw.readers[0].pads == (1, 2, 1, 2)  # 'SAME' for a 5x5 stride-2 conv on 4x4: 3 rows, 1 before
    assert stem.readers[0].pads is None and conv.prunable


def test_refitting_a_reader_that_pads_in_its_forward_keeps_its_function():
    """Least squares at full width recovers the weights only if the samples were padded as the
    conv's forward pads."""
    model, x = randomise(SameNet(), 0), images(200)
    same, _, _, _ = prune_groups_directly(model, x, {"pw": 12}, method="greedy")
    assert type(same.conv) is SameConv2d
    torch.testing.assert_close(in_float64(same, x), in_float64(model, x), rtol=1e-4, atol=1e-4)


def test_dropping_channels_they_write_is_exact_and_keeps_their_class(tmp_path):
    model, x = randomise(SameNet(), 0), images()
    pruned, _ = prune(model, x, None, widths={"pw": 5, "conv": 7, "fc": 6}, method="max_response",
                      reconstruct=False, progress=False)
    assert type(pruned.stem) is SameConv2d and type(pruned.dw) is SameConv2d and type(pruned.conv) is SameConv2d
    assert (pruned.stem.out_channels, pruned.dw.groups, pruned.pw.in_channels) == (5, 5, 5)
    assert (pruned.pw.out_channels, pruned.conv.in_channels, pruned.conv.out_channels) == (7, 7, 6)
    assert_exact_against_zeroed(model, pruned, x, 3 + 5 + 4)
    assert_round_trips(pruned, randomise(SameNet(), 5), x, tmp_path)


def test_a_subclass_that_is_not_a_plain_convolution_stays_whole():
    with pytest.warns(UserWarning, match="not a plain convolution"):
        graph = build_graph(randomise(SameNet(SquaredConv2d), 0), images(1))
    assert not graph.group("conv").prunable and not graph.group("pw").prunable
    assert graph.group("stem").prunable


def test_a_reader_that_pads_in_its_forward_takes_no_channel_select():
    """Feature-map sampling would put it behind a SelectedConv2d, which pads as a plain conv."""
    model, x = randomise(SameNet(), 0), images()
    units = pruning_units(build_graph(model, x[:1]), PruneConfig(exclude=("pw",), feature_map_sampling=True))
    assert [(u.name, u.reader) for u in units] == [("conv", None)]  # no select unit: conv reads all of pw's
    pruned, _ = prune(model, x, None, widths={"fc": 6}, exclude=("pw",), feature_map_sampling=True, progress=False)
    assert type(pruned.conv) is SameConv2d and (pruned.conv.in_channels, pruned.conv.out_channels) == (12, 6)
