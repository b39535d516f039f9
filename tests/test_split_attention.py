"""Split attention (ResNeSt; timm's SplitAttn and RadixSoftmax): one grouped conv writes every
path (one conv group per path), its output is viewed as (paths, channels) and summed for the
attention, whose conv output is viewed as (1, paths, channels), transposed, normalised over the
paths and merged back into paths × channels before it weights the paths. Channel c of every path
and of every path's attention is one channel, so the grouped conv keeps the same channels in each
conv group, and the attention conv loses them too, exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from chanprune import prune
from chanprune.flops import count_flops
from chanprune.graph import build_graph
from chanprune.graph_ops import _merged_paths, _split_paths

from conftest import assert_exact_against_zeroed, assert_round_trips, in_float64, randomise

RADIX, WIDTH = 2, 12
PATHS = f"conv[0:{WIDTH}]"  # the grouped conv's output, cut into its paths, which are then tied


class SplitAttention(nn.Module):
    """stem → grouped conv writing 2 paths → radix softmax attention → weighted sum → conv → head."""

    def __init__(self, fixed_merge: bool = False, channels_softmax: bool = False):
        super().__init__()
        self.fixed_merge, self.channels_softmax = fixed_merge, channels_softmax
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, RADIX * WIDTH, 3, padding=1, groups=RADIX, bias=False)
        self.bn0 = nn.BatchNorm2d(RADIX * WIDTH)
        self.reduce, self.bn1 = nn.Conv2d(WIDTH, 6, 1), nn.BatchNorm2d(6)
        self.select = nn.Conv2d(6, RADIX * WIDTH, 1)
        self.head = nn.Conv2d(WIDTH, 10, 3, padding=1)
        self.fc = nn.Linear(10, 4)

    def forward(self, x):
        x = F.relu(self.bn0(self.conv(F.relu(self.stem(x)))))
        b, rc, h, w = x.shape
        paths = x.reshape(b, RADIX, rc // RADIX, h, w)
        attn = self.select(F.relu(self.bn1(self.reduce(paths.sum(dim=1).mean((2, 3), keepdim=True)))))
        attn = F.softmax(attn.view(b, 1, RADIX, -1).transpose(1, 2), dim=-1 if self.channels_softmax else 1)
        attn = attn.reshape(b, RADIX * WIDTH) if self.fixed_merge else attn.reshape(b, -1)
        attn = attn.view(b, -1, 1, 1).reshape(b, RADIX, rc // RADIX, 1, 1)
        x = (paths * attn).sum(dim=1)
        return self.fc(F.relu(self.head(x)).mean((2, 3)))


def images(n: int = 40) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(3))


def test_views_that_split_and_merge_paths_are_recognised():
    assert _split_paths((4, 24, 8, 8), (4, 2, 12, 8, 8), 1) == (2, 2)  # a selective kernel's paths
    assert _split_paths((1, 24, 1, 1), (1, 1, 2, 12), 1) == (3, 2)  # the radix softmax's view
    assert _split_paths((4, 24, 8, 8), (8, 12, 8, 8), 1) is None  # the paths would join the batch
    assert _split_paths((4, 24, 8, 8), (4, 2, 12, 64), 1) == (2, 2)  # each channel keeps its pixels
    assert _split_paths((4, 24, 8, 8), (4, 2, 96, 8), 1) is None  # channels and rows would mix
    assert _merged_paths((1, 2, 1, 12), (1, 24), 3) == (1, 2)
    assert _merged_paths((4, 2, 12), (8, 12), 2) is None  # the batch is not a path
    assert _merged_paths((4, 12, 2), (4, 24), 1) is None  # channels not fastest: interleaved


def test_the_grouped_conv_paths_and_their_attention_are_one_group():
    graph = build_graph(randomise(SplitAttention(), 0), images(1))
    group = graph.group(PATHS)
    assert group.prunable and group.channels == WIDTH and group.conv_groups == 1
    assert group.writers == ["conv", "select"] and group.followers == ["bn0"]
    assert [r.name for r in group.readers] == ["reduce", "head"]
    assert graph.out_layouts["conv"] == graph.out_layouts["select"] == [group.name] * RADIX


def test_dropping_channels_of_the_paths_is_exact_keeps_the_conv_grouped_and_round_trips(tmp_path):
    model, x = randomise(SplitAttention(), 0), images()
    pruned, report = prune(model, x, None, widths={f"group:{PATHS}": 7, "group:reduce": 4},
                           method="max_response", reconstruct=False, progress=False)
    assert (pruned.conv.out_channels, pruned.conv.groups, pruned.select.out_channels) == (14, RADIX, 14)
    assert (pruned.reduce.in_channels, pruned.head.in_channels, pruned.select.in_channels) == (7, 7, 4)
    # zeroed: the reduce and head inputs, and the select's hidden inputs
    assert_exact_against_zeroed(model, pruned, x, 5 + 5 + 2)
    assert report.flops_after == count_flops(pruned, (1, 3, 8, 8)) < report.flops_before
    assert_round_trips(pruned, randomise(SplitAttention(), 5), x, tmp_path)


def test_keeping_every_channel_reproduces_the_model():
    model, x = randomise(SplitAttention(), 0), images()
    kept, _ = prune(model, x, None, widths={f"group:{PATHS}": WIDTH}, method="max_response", reconstruct=False,
                    progress=False)
    torch.testing.assert_close(in_float64(kept, x), in_float64(model, x), rtol=1e-12, atol=1e-12)


def test_a_2x_prune_narrows_the_paths_in_every_conv_group():
    model, x = randomise(SplitAttention(), 0), images()
    pruned, report = prune(model, x, 2.0, progress=False)
    assert abs(report.flops_before / report.flops_after / 2.0 - 1) <= 0.05
    assert pruned.conv.groups == RADIX and pruned.conv.out_channels < RADIX * WIDTH
    assert pruned.select.out_channels == pruned.conv.out_channels == RADIX * pruned.head.in_channels


@pytest.mark.parametrize("options, why", [
    ({"fixed_merge": True}, "reshape_1 reshapes the channels"),
    ({"channels_softmax": True}, "softmax normalises over the channel axis"),
])
def test_attention_that_fixes_or_mixes_the_channels_blocks_them(options, why):
    with pytest.warns(UserWarning, match=why):
        graph = build_graph(randomise(SplitAttention(**options), 0), images(1))
    assert not any(g.name.startswith("conv") and g.prunable for g in graph.groups) and graph.group("stem").prunable


class TransposedMLP(nn.Module):
    """stem → channels moved last by a transpose → two Linears over them → moved back → head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.relu(self.stem(x)).transpose(1, 3)
        return self.head(self.fc2(F.relu(self.fc1(x))).transpose(-1, 1)).mean((2, 3))


def test_a_transpose_moves_the_channel_axis_with_it():
    model, x = randomise(TransposedMLP(), 0), images()
    graph = build_graph(model, images(1))
    assert {g.name for g in graph.prunable()} == {"stem", "fc1", "fc2"}
    pruned, _ = prune(model, x, None, widths={"group:fc1": 9, "group:fc2": 5}, method="max_response",
                      reconstruct=False, progress=False)
    assert (pruned.fc1.out_features, pruned.fc2.in_features, pruned.head.in_channels) == (9, 9, 5)
    assert_exact_against_zeroed(model, pruned, x, 7 + 3)
