"""Pixel shuffle in the channel graph (a super-resolution network): each channel after the shuffle is
a block of r² consecutive channels of the conv before it, which loses whole blocks."""

from __future__ import annotations

import copy

import pytest
import torch

from chanprune import prune
from chanprune.flops import count_flops
from chanprune.graph import build_graph
from chanprune.models.srresnet import MSRResNet

from conftest import assert_round_trips, randomise

SHAPE = (3, 12, 12)


def tiny_sr(seed: int = 0) -> MSRResNet:
    return randomise(MSRResNet(width=8, blocks=2, scale=2), seed).eval()


def images(n: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def test_the_shuffled_group_counts_blocks_of_r_squared():
    graph = build_graph(tiny_sr(), images(1))
    group = next(g for g in graph.groups if g.writer == "upconv")
    assert group.channels == 8 and group.block_of("upconv") == 4 and group.prunable
    assert [r.name for r in group.readers] == ["hr_conv"]
    conv_last = next(g for g in graph.groups if g.writer == "conv_last")
    assert not conv_last.prunable  # the model's output


def test_without_reconstruction_it_equals_zeroed_inputs():
    model, x = tiny_sr(), images()
    pruned, report = prune(model, x, None, widths={"hr_conv": 3}, recipe="paper", method="max_response",
                           reconstruct=False, progress=False)
    kept = next(layer for layer in report.layers if layer.name == "hr_conv").kept_indices
    assert len(kept) == 3 and pruned.upconv.out_channels == 12 and pruned.hr_conv.in_channels == 3
    reference = copy.deepcopy(model)
    dropped = [c for c in range(8) if c not in kept]
    with torch.no_grad():
        reference.hr_conv.weight[:, dropped] = 0
        expected, got = reference.double()(x.double()), copy.deepcopy(pruned).double()(x.double())
        original = copy.deepcopy(model).double()(x.double())
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(original, expected, atol=1e-6)  # the dropped channels mattered
    # the kept blocks are the right ones: upconv keeps channels 4c..4c+3 of each kept c
    torch.testing.assert_close(pruned.upconv.weight, model.upconv.weight[torch.tensor(
        [4 * c + i for c in kept for i in range(4)])])


@pytest.mark.parametrize("trunk", ["keep", "joint"])
def test_pruned_sr_network_meets_the_target_and_round_trips(tmp_path, trunk):
    model, x = tiny_sr(), images()
    pruned, report = prune(model, x, 1.5, trunk=trunk, round_to=1, progress=False)
    assert abs(report.speedup_achieved / 1.5 - 1) <= 0.02
    assert report.flops_after == count_flops(pruned, (1, *SHAPE))
    assert pruned.upconv.out_channels == 4 * pruned.hr_conv.in_channels
    plain, _ = prune(model, x, 1.5, trunk=trunk, round_to=1, reconstruct=False, progress=False)
    assert [p.shape for p in plain.parameters()] == [p.shape for p in pruned.parameters()]
    with torch.no_grad():
        rebuilt, kept_weights = (net(x) - model(x) for net in (pruned, plain))
    assert rebuilt.norm() < 0.8 * kept_weights.norm()  # least squares beats keeping the weights
    assert_round_trips(pruned, MSRResNet(width=8, blocks=2, scale=2), x, tmp_path)


def test_a_shuffle_of_channels_read_elsewhere_is_blocked():
    class ReadTwice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(3, 8, 1)
            self.b = torch.nn.Conv2d(8, 4, 1)
            self.c = torch.nn.Conv2d(2, 4, 1)

        def forward(self, x):
            y = self.a(x)
            return self.b(y).mean((2, 3)) + self.c(torch.nn.functional.pixel_shuffle(y, 2)).mean((2, 3))

    with pytest.warns(UserWarning, match="pixel shuffle"):
        graph = build_graph(ReadTwice().eval(), torch.randn(1, 3, 6, 6))
    assert not next(g for g in graph.groups if g.writer == "a").prunable
