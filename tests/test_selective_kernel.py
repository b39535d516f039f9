"""Selective kernels (SKNet; timm's SelectiveKernel): the paths' outputs are stacked on a new axis,
an attention conv writes one weight per path and channel, viewed as (paths, channels) and
normalised over the paths, and the weighted paths are summed. Channel c of every path and of
every path's attention is one channel, so the paths, the attention conv and the readers of the
sum lose the same channels, exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from chanprune import prune
from chanprune.flops import count_flops
from chanprune.graph import build_graph

from conftest import assert_exact_against_zeroed, assert_round_trips, in_float64, randomise


class SKNet(nn.Module):
    """stem → two paths (3x3, dilated 3x3) stacked → attention over the paths → summed → conv → head."""

    def __init__(self, fixed_view: bool = False, normalise_channels: bool = False):
        super().__init__()
        self.fixed_view, self.normalise_channels = fixed_view, normalise_channels
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.path0 = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.path1 = nn.Sequential(nn.Conv2d(8, 12, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(12),
                                   nn.ReLU())
        self.reduce, self.bn = nn.Conv2d(12, 6, 1), nn.BatchNorm2d(6)
        self.select = nn.Conv2d(6, 24, 1)
        self.conv = nn.Conv2d(12, 10, 3, padding=1)
        self.fc = nn.Linear(10, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        paths = torch.stack([self.path0(x), self.path1(x)], dim=1)
        b, p, c, h, w = paths.shape
        attn = self.select(F.relu(self.bn(self.reduce(paths.sum(1).mean((2, 3), keepdim=True)))))
        attn = attn.view(b, 2, 12, 1, 1) if self.fixed_view else attn.view(b, p, c, 1, 1)
        attn = attn.softmax(dim=2 if self.normalise_channels else 1)
        x = (paths * attn).sum(1)
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


def images(n: int = 40) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(7))


def test_paths_and_their_attention_are_one_group():
    graph = build_graph(randomise(SKNet(), 0), images(1))
    group = graph.group("path0.0")
    assert group.prunable and group.channels == 12
    assert group.writers == ["path0.0", "path1.0", "select"] and group.followers == ["path0.1", "path1.1"]
    assert [r.name for r in group.readers] == ["reduce", "conv"]
    assert graph.out_layouts["select"] == ["path0.0", "path0.0"]  # one attention channel per path


def test_dropping_channels_of_the_paths_is_exact_and_round_trips(tmp_path):
    model, x = randomise(SKNet(), 0), images()
    pruned, report = prune(model, x, None, widths={"group:path0.0": 7, "group:reduce": 4},
                           method="max_response", reconstruct=False, progress=False)
    assert [pruned.get_submodule(n).out_channels for n in ("path0.0", "path1.0", "select")] == [7, 7, 14]
    assert (pruned.reduce.in_channels, pruned.conv.in_channels, pruned.select.in_channels) == (7, 7, 4)
    # zeroed: the reduce and conv inputs, and the select's hidden inputs
    assert_exact_against_zeroed(model, pruned, x, 5 + 5 + 2)
    assert report.flops_after == count_flops(pruned, (1, 3, 8, 8)) < report.flops_before
    assert_round_trips(pruned, randomise(SKNet(), 5), x, tmp_path)


def test_keeping_every_channel_reproduces_the_model():
    model, x = randomise(SKNet(), 0), images()
    kept, _ = prune(model, x, None, widths={"group:path0.0": 12}, method="max_response", reconstruct=False,
                    progress=False)
    torch.testing.assert_close(in_float64(kept, x), in_float64(model, x), rtol=1e-12, atol=1e-12)


def test_a_2x_prune_narrows_the_paths():
    model, x = randomise(SKNet(), 0), images()
    pruned, report = prune(model, x, 2.0, progress=False)
    assert abs(report.flops_before / report.flops_after / 2.0 - 1) <= 0.05
    assert pruned.path0[0].out_channels < 12 and pruned.select.out_channels == 2 * pruned.path0[0].out_channels


@pytest.mark.parametrize("options, why", [
    ({"fixed_view": True}, "view views the channels as paths with a fixed width"),
    ({"normalise_channels": True}, "softmax normalises over the channel axis"),
])
def test_attention_that_mixes_or_fixes_the_channels_blocks_them(options, why):
    with pytest.warns(UserWarning, match=why):
        graph = build_graph(randomise(SKNet(**options), 0), images(1))
    assert not graph.group("path0.0").prunable and graph.group("stem").prunable
