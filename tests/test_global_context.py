"""Global-context blocks (GCNet; timm's GlobalContext): each channel's spatial entries are weighted
by one attention map (``x.reshape(B, C, H*W).unsqueeze(1) @ attn``), the context is viewed back to
(B, C, 1, 1), transformed and added to the block's input. The reshapes move the channel axis
without mixing channels and the matrix product weights each channel's own entries, so the
channels the block reads and writes prune like any added group, exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from chanprune import prune
from chanprune.flops import count_flops
from chanprune.graph import build_graph

from conftest import assert_exact_against_zeroed, assert_round_trips, in_float64, randomise


class GCNet(nn.Module):
    """stem → conv+BN → global context (attention pooling, a 1x1 bottleneck, added) → conv → head."""

    def __init__(self, fixed_view: bool = False, pool_channels: bool = False):
        super().__init__()
        self.fixed_view, self.pool_channels = fixed_view, pool_channels
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv, self.bn = nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12)
        self.conv_attn = nn.Conv2d(12, 1, 1)
        self.fc1, self.fc2 = nn.Conv2d(12, 6, 1), nn.Conv2d(6, 12, 1)
        self.conv2 = nn.Conv2d(12, 10, 3, padding=1)
        self.fc = nn.Linear(10, 4)
        self.register_buffer("mixing", torch.ones(12, 12))

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.bn(self.conv(x)))
        b, c, h, w = x.shape
        attn = self.conv_attn(x).reshape(b, 1, h * w).softmax(dim=-1).unsqueeze(3)
        flat = x.reshape(b, 12 if self.fixed_view else c, h * w).unsqueeze(1)
        if self.pool_channels:  # every channel's entries summed over the channels first
            flat = self.mixing @ flat
        context = flat @ attn
        x = x + self.fc2(F.relu(self.fc1(context.view(b, c, 1, 1))))
        return self.fc(F.relu(self.conv2(x)).mean((2, 3)))


def images(n: int = 40) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(7))


def test_the_block_reads_and_writes_one_group():
    graph = build_graph(randomise(GCNet(), 0), images(1))
    group = graph.group("conv")
    assert group.prunable and group.channels == 12 and group.writers == ["conv", "fc2"]
    assert [r.name for r in group.readers] == ["conv_attn", "fc1", "conv2"]


def test_dropping_channels_through_the_context_is_exact_and_round_trips(tmp_path):
    model, x = randomise(GCNet(), 0), images()
    pruned, report = prune(model, x, None, widths={"group:conv": 7, "group:fc1": 4}, method="max_response",
                           reconstruct=False, trunk="joint", progress=False)
    assert (pruned.conv.out_channels, pruned.fc2.out_channels, pruned.fc2.in_channels) == (7, 7, 4)
    assert (pruned.conv_attn.in_channels, pruned.fc1.in_channels, pruned.conv2.in_channels) == (7, 7, 7)
    # zeroed: conv_attn, fc1 and conv2 inputs, and fc2's hidden inputs
    assert_exact_against_zeroed(model, pruned, x, 5 + 5 + 5 + 2)
    assert report.flops_after == count_flops(pruned, (1, 3, 8, 8)) < report.flops_before
    assert_round_trips(pruned, randomise(GCNet(), 5), x, tmp_path)


def test_keeping_every_channel_reproduces_the_model():
    model, x = randomise(GCNet(), 0), images()
    kept, _ = prune(model, x, None, widths={"group:conv": 12}, method="max_response", reconstruct=False,
                    trunk="joint", progress=False)
    torch.testing.assert_close(in_float64(kept, x), in_float64(model, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("options, why", [
    ({"fixed_view": True}, "reshape_1 reshapes the channels"),
    ({"pool_channels": True}, "matmul multiplies matrices over its channels"),
])
def test_a_fixed_width_view_or_a_product_over_the_channels_blocks_them(options, why):
    with pytest.warns(UserWarning, match=why):
        graph = build_graph(randomise(GCNet(**options), 0), images(1))
    assert not graph.group("conv").prunable and graph.group("stem").prunable
