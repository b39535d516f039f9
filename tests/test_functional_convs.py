"""Functional convolutions with a constant weight (timm's BlurPool2d: a fixed blur filter applied
per channel with F.conv2d) become conv modules before the channel graph is built: the channels
around them prune, a depthwise one narrows with them, a dense one is read and refitted, the
pruned model round-trips, and a plan that names another node is refused."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from chanprune import prune
from chanprune.errors import ChanpruneError
from chanprune.functional_convs import CONV_MODULE_OP
from chanprune.graph import build_graph
from chanprune.surgery import PlanOp, replay

from conftest import assert_exact_against_zeroed, assert_round_trips, randomise


class Blur(nn.Module):
    """timm's BlurPool2d in miniature: reflect padding, then a fixed [1, 2, 1]² filter per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        taps = torch.tensor([1.0, 2.0, 1.0])
        kernel = (taps[:, None] * taps[None, :]) / 16
        self.register_buffer("filt", kernel[None, None].repeat(channels, 1, 1, 1), persistent=False)

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.filt, stride=2, groups=self.channels)


class BlurNet(nn.Module):
    """conv1 → BN → blur (stride 2) → functional dense 3x3 conv (own weight and bias) → conv3 → head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.blur = Blur(8)
        self.weight = nn.Parameter(torch.randn(12, 8, 3, 3) * 0.2)
        self.bias = nn.Parameter(torch.randn(12) * 0.1)
        self.conv3 = nn.Conv2d(12, 10, 3, padding=1)
        self.fc = nn.Linear(10, 4)

    def forward(self, x):
        x = self.blur(F.relu(self.bn1(self.conv1(x))))
        x = F.relu(F.conv2d(x, self.weight, self.bias, padding=1))
        return self.fc(F.relu(self.conv3(x)).mean((2, 3)))


def images(n: int = 48) -> torch.Tensor:
    return torch.randn(n, 3, 12, 12, generator=torch.Generator().manual_seed(6))


def test_functional_convs_become_modules_and_the_channels_around_them_prune():
    model, x = randomise(BlurNet(), 0), images()
    graph = build_graph(model, x[:1])
    assert [(r.op, r.layer) for r in graph.rewrites] == [(CONV_MODULE_OP, "conv2d"), (CONV_MODULE_OP, "conv2d_1")]
    blur, dense = graph.gm.get_submodule("conv2d"), graph.gm.get_submodule("conv2d_1")
    assert (blur.groups, blur.stride, blur.weight.requires_grad) == (8, (2, 2), False)
    assert (dense.in_channels, dense.out_channels, dense.padding, dense.weight.requires_grad) == (8, 12, (1, 1), True)
    conv1 = graph.group("conv1")
    assert conv1.prunable and "conv2d" in conv1.followers and [r.name for r in conv1.readers] == ["conv2d_1"]
    assert graph.group("conv2d_1").prunable
    torch.testing.assert_close(graph.gm(x), model(x))
    assert not hasattr(model, "conv2d")  # the user's model is left as it was


def test_dropping_channels_through_a_blur_is_exact_and_round_trips(tmp_path):
    model, x = randomise(BlurNet(), 0), images()
    pruned, _ = prune(model, x, None, widths={"conv2d_1": 5, "conv3": 7}, method="max_response",
                      reconstruct=False, progress=False)
    assert (pruned.conv1.out_channels, pruned.conv2d.groups, pruned.conv2d_1.in_channels) == (5, 5, 5)
    assert pruned.conv2d_1.out_channels == 7 and not pruned.conv2d.weight.requires_grad
    assert not hasattr(pruned.blur, "filt") and "weight" not in pruned.state_dict()  # held once, by the modules
    assert_exact_against_zeroed(model, pruned, x, 3 + 5)
    assert_round_trips(pruned, randomise(BlurNet(), 5), x, tmp_path)


def test_a_plan_that_names_another_node_is_refused():
    model = randomise(BlurNet(), 0)
    with pytest.raises(ChanpruneError, match="makes 'relu' a conv module, which is not a functional conv"):
        replay(copy.deepcopy(model), [PlanOp(CONV_MODULE_OP, "relu")])


class Tied(nn.Module):
    """A functional conv with the weight of a layer the model also calls: left as it is."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(F.conv2d(self.conv(x), self.conv.weight, padding=1).mean((2, 3)))


def test_a_tied_weight_stays_with_its_layer():
    model, x = randomise(Tied(), 0), images(2)
    with pytest.warns(UserWarning, match=r"conv2d \(conv2d\) is not supported"):
        graph = build_graph(model, x[:1])
    assert graph.rewrites == [] and model.conv.weight is not None and hasattr(graph.gm.conv, "weight")
