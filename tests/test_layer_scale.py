"""Layer scale: a per-channel parameter multiplying a group's channels is sliced with them (like a
BatchNorm follower), in NCHW (torchvision's ConvNeXt, ``gamma`` of shape (C, 1, 1)) and through a
view (timm's ``gamma.view(1, -1, 1, 1)``), on a residual trunk and on a plain chain."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from chanprune import prune
from chanprune.flops import count_flops
from chanprune.graph import build_graph

from conftest import assert_round_trips, randomise

SHAPE = (3, 10, 10)


class ScaledChain(nn.Module):
    """conv1 → x * gamma.view(1, -1, 1, 1) → relu → conv2 → pooled linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gamma = nn.Parameter(torch.linspace(0.5, 2.0, 8))
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        y = torch.relu(self.conv1(x) * self.gamma.view(1, -1, 1, 1))
        return self.head(self.conv2(y).mean((2, 3)))


class ScaledResidual(nn.Module):
    """A trunk (stem) with a branch conv → BN → layer_scale (C, 1, 1) added back."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.layer_scale = nn.Parameter(torch.linspace(0.1, 1.0, 8).view(8, 1, 1))
        self.out = nn.Conv2d(8, 5, 1)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        t = torch.relu(self.stem(x))
        t = t + self.layer_scale * self.bn(self.branch(t))
        return self.head(self.out(t).mean((2, 3)))


def images(n: int = 32) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("cls, path", [(ScaledChain, "gamma"), (ScaledResidual, "layer_scale")])
def test_the_scale_joins_its_group(cls, path):
    graph = build_graph(randomise(cls(), 0).eval(), images(1))
    group = next(g for g in graph.groups if path in g.scales)
    assert group.prunable and graph.layouts[path] == [group.name]


def test_without_reconstruction_it_equals_zeroed_inputs():
    model, x = randomise(ScaledChain(), 0).eval(), images()
    pruned, report = prune(model, x, None, widths={"conv2": 5}, recipe="paper", method="max_response",
                           reconstruct=False, progress=False)
    kept = next(layer for layer in report.layers if layer.name == "conv2").kept_indices
    assert pruned.gamma.shape == (5,) and torch.equal(pruned.gamma.detach(), model.gamma.detach()[kept])
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.conv2.weight[:, [c for c in range(8) if c not in kept]] = 0
        torch.testing.assert_close(pruned.double()(x.double()), reference.double()(x.double()), rtol=1e-9, atol=1e-9)
        assert not torch.allclose(model.double()(x.double()), reference.double()(x.double()), atol=1e-6)


def test_a_trunk_with_layer_scale_prunes_and_round_trips(tmp_path):
    model, x = randomise(ScaledResidual(), 0).eval(), images()
    pruned, report = prune(model, x, 1.6, trunk="joint", allocation="uniform", round_to=1, progress=False)
    assert abs(report.speedup_achieved / 1.6 - 1) <= 0.02
    assert report.flops_after == count_flops(pruned, (1, *SHAPE))
    width = pruned.stem.out_channels
    assert width < 8 and pruned.layer_scale.shape == (width, 1, 1) and pruned.bn.num_features == width
    assert_round_trips(pruned, randomise(ScaledResidual(), 5), x, tmp_path)


def test_a_scale_over_more_than_the_channels_still_blocks():
    class Spatial(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 1)
            self.mask = nn.Parameter(torch.ones(8, 10, 10))
            self.conv2 = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.conv2(self.conv1(x) * self.mask).mean((2, 3))

    with pytest.warns(UserWarning, match="scales its channels by a tensor chanprune does not track"):
        graph = build_graph(Spatial().eval(), images(1))
    assert not next(g for g in graph.groups if g.writer == "conv1").prunable
