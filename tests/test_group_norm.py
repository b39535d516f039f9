"""GroupNorm (BiT's ResNet-v2) normalises each group of consecutive channels on its own statistics:
removing whole norm groups leaves the others exact, so the channels it reads are pruned in blocks
of one norm group; a GroupNorm over one group, or over channels that are also read elsewhere,
still blocks them."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from chanprune import prune
from chanprune.errors import ChanpruneError
from chanprune.graph import build_graph
from chanprune.surgery import PlanOp, apply_op

from conftest import assert_exact_against_zeroed, assert_round_trips, randomise


class GroupNormReLU(nn.GroupNorm):
    """A GroupNorm with its activation in its forward (timm's GroupNormAct): traced as a leaf."""

    def forward(self, x):
        return F.relu(super().forward(x))


class GNNet(nn.Module):
    """conv1 → GN+ReLU (4 groups of 3) → conv2 → GN(groups) → ReLU → conv3 → head."""

    def __init__(self, groups2: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.gn1 = GroupNormReLU(4, 12)
        self.conv2 = nn.Conv2d(12, 10, 3, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(groups2, 10)
        self.conv3 = nn.Conv2d(10, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.gn1(self.conv1(x))
        x = F.relu(self.gn2(self.conv2(x)))
        return self.fc(F.relu(self.conv3(x)).mean((2, 3)))


def images(n: int = 40) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(7))


def test_channels_before_a_group_norm_are_blocks_of_its_groups():
    graph = build_graph(randomise(GNNet(), 0), images(1))
    conv1, conv2 = graph.group("conv1"), graph.group("conv2")
    assert conv1.prunable and conv1.channels == 4 and conv1.block_of("conv1") == 3 and conv1.followers == ["gn1"]
    assert [r.name for r in conv1.readers] == ["conv2"] and conv1.readers[0].channel_size == 3
    assert conv2.prunable and conv2.channels == 5 and conv2.block_of("gn2") == 2


def test_dropping_whole_norm_groups_is_exact_and_round_trips(tmp_path):
    model, x = randomise(GNNet(), 0), images()
    pruned, report = prune(model, x, None, widths={"conv2": 2, "conv3": 3}, method="max_response",
                           reconstruct=False, progress=False)
    assert (pruned.conv1.out_channels, pruned.gn1.num_groups, pruned.gn1.num_channels) == (6, 2, 6)
    assert type(pruned.gn1) is GroupNormReLU
    assert (pruned.conv2.out_channels, pruned.gn2.num_groups, pruned.conv3.in_channels) == (6, 3, 6)
    # zeroed: norm groups: two of 3 channels before conv2, two of 2 before conv3
    assert_exact_against_zeroed(model, pruned, x, 2 + 2)
    assert report.flops_after < report.flops_before
    assert_round_trips(pruned, randomise(GNNet(), 5), x, tmp_path)


def test_a_group_norm_over_one_group_blocks_its_channels():
    with pytest.warns(UserWarning, match=r"gn2 \(GroupNorm\) couples every channel it normalises"):
        graph = build_graph(randomise(GNNet(groups2=1), 0), images(1))
    assert not graph.group("conv2").prunable and graph.group("conv1").prunable


def test_a_plan_that_splits_a_norm_group_is_refused():
    model = randomise(GNNet(), 0)
    with pytest.raises(ChanpruneError, match="a GroupNorm with blocks of 3 channels must keep whole blocks"):
        apply_op(model, PlanOp("keep_channels", "gn1", (0, 1, 2, 4)))
