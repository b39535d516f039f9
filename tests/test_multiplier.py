"""Depthwise convs with a channel multiplier (``groups == in_channels``, ``m`` outputs per input
channel): each channel of the group they follow becomes a block of ``m`` consecutive channels, so
the conv, a BatchNorm after it and the layers reading it lose whole blocks. Keeping every channel
and dropping channels no reader uses are exact; a pruned model meets its FLOPs report, saves,
loads and exports."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from chanprune import prune
from chanprune.errors import ChanpruneError
from chanprune.flops import count_flops
from chanprune.graph import build_graph
from chanprune.surgery import keep_channels

from conftest import assert_round_trips, prune_groups_directly, randomise

SHAPE = (3, 10, 10)


class MultiplierNet(nn.Module):
    """stem (6) ─┬ dw_a (3x3, x2) ─┐
                 └ dw_b (1x1, x2) ─┴ + → BN (12) → pw (12 → 8) → head   (FastViT's reparameterisable
    downsampling: two multiplier convs on one input, added)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.dw_a = nn.Conv2d(6, 12, 3, padding=1, groups=6, bias=False)
        self.dw_b = nn.Conv2d(6, 12, 1, groups=6, bias=False)
        self.bn = nn.BatchNorm2d(12)
        self.pw = nn.Conv2d(12, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = torch.relu(self.bn(self.dw_a(x) + self.dw_b(x)))
        return self.head(torch.relu(self.pw(y)).mean((2, 3)))


class BlockTrunkNet(nn.Module):
    """stem (4) → dw (x2: 8 channels, blocks of 2) → BN → t;  t + pw2(pw1(t)) · gamma → mean → head.
    pw2 writes plain channels that are added to blocks: they become blocks of the stem's group
    too, with the layer scale gamma that multiplied them (FastViT's blocks after its downsampling)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.dw = nn.Conv2d(4, 8, 3, padding=1, groups=4)
        self.bn = nn.BatchNorm2d(8)
        self.pw1 = nn.Conv2d(8, 6, 1)
        self.pw2 = nn.Conv2d(6, 8, 1)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 8).reshape(8, 1, 1))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        t = self.bn(self.dw(torch.relu(self.stem(x))))
        t = t + self.pw2(torch.relu(self.pw1(t))) * self.gamma
        return self.head(t.mean((2, 3)))


def images(n: int = 40) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(6))


def test_a_channel_multiplier_makes_blocks_of_the_group():
    graph = build_graph(randomise(MultiplierNet(), 0), images(1))
    stem = graph.group("stem")
    assert stem.prunable and stem.followers == ["dw_a", "dw_b", "bn"]
    assert stem.blocks == {"dw_a": 2, "dw_b": 2, "bn": 2}
    assert [(r.name, r.channel_size) for r in stem.readers] == [("pw", 2)]
    assert {"dw_a", "dw_b"} <= graph.depthwise


def test_keeping_every_channel_is_exact():
    model, x = randomise(MultiplierNet(), 0), images()
    pruned, _, _, _ = prune_groups_directly(model, x, {"group:stem": 6}, reconstruct=False, recipe="default")
    with torch.no_grad():
        assert torch.equal(pruned(x), model(x))


def test_dropping_a_channel_no_reader_uses_is_exact():
    model, x = randomise(MultiplierNet(), 0), images()
    with torch.no_grad():  # stem channel 3 reaches pw as channels 6 and 7, which pw ignores
        model.pw.weight[:, [6, 7]] = 0
    pruned, report = prune(model, x, None, widths={"pw": 5}, method="greedy", reconstruct=False, progress=False)
    assert next(layer for layer in report.layers if layer.name == "pw").kept_indices == [0, 1, 2, 4, 5]
    assert (pruned.dw_a.in_channels, pruned.dw_a.out_channels, pruned.dw_a.groups) == (5, 10, 5)
    assert pruned.bn.num_features == 10 and pruned.pw.in_channels == 10
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), rtol=1e-5, atol=1e-6)


def test_a_pruned_multiplier_net_meets_its_target_and_round_trips(tmp_path):
    model, x = randomise(MultiplierNet(), 0), images()
    pruned, report = prune(model, x, 1.5, allocation="uniform", round_to=1, progress=False)
    assert abs(report.speedup_achieved / 1.5 - 1) <= 0.02
    assert report.flops_after == count_flops(pruned, (1, *SHAPE))
    assert pruned.dw_a.out_channels == 2 * pruned.stem.out_channels < 12
    assert_round_trips(pruned, randomise(MultiplierNet(), 5), x, tmp_path)


def test_a_multiplier_conv_refuses_part_of_a_block():
    with pytest.raises(ChanpruneError, match="whole blocks of 2"):
        keep_channels(MultiplierNet().dw_a, torch.tensor([0, 1, 2, 4, 5]))


def test_a_group_added_to_blocks_becomes_blocks_with_its_layer_scale():
    graph = build_graph(randomise(BlockTrunkNet(), 0), images(1))
    stem = graph.group("stem")
    assert stem.prunable and stem.residual and stem.writers == ["stem", "pw2"]
    assert stem.blocks == {"dw": 2, "bn": 2, "pw2": 2, "gamma": 2}
    assert sorted((r.name, r.channel_size) for r in stem.readers) == [("head", 2), ("pw1", 2)]


def test_a_block_trunk_keeps_every_channel_exactly_and_drops_unread_ones_exactly(tmp_path):
    model, x = randomise(BlockTrunkNet(), 0), images()
    pruned, _, _, _ = prune_groups_directly(model, x, {"group:stem": 4}, reconstruct=False, recipe="default",
                                            trunk="joint")
    with torch.no_grad():
        assert torch.equal(pruned(x), model(x))
        model.pw1.weight[:, [2, 3]] = 0  # stem channel 1 (channels 2 and 3 of the trunk) is read by nobody
        model.head.weight[:, [2, 3]] = 0
    pruned, report = prune(model, x, None, widths={"group:stem": 3}, method="greedy", trunk="joint",
                           reconstruct=False, progress=False)
    assert next(layer for layer in report.layers if layer.name == "pw1").kept_indices == [0, 2, 3]
    assert pruned.stem.out_channels == 3 and pruned.pw2.out_channels == 6 == pruned.gamma.numel()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), rtol=1e-5, atol=1e-6)
    assert_round_trips(pruned, randomise(BlockTrunkNet(), 5), x, tmp_path)
