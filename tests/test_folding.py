"""Convs whose forward derives their weight (weight standardization, as timm's ScaledStdConv2d in
NF-Nets) are folded into plain convs holding the weight their forward computes: the weight read
off the forward is the standardized one, the trace computes the model, every group prunes, a
plan replays the fold on load, and a fold that does not compute what the layer does is refused."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from chanprune import prune
from chanprune.errors import ChanpruneError
from chanprune.folding import FOLD_OP, effective_weight
from chanprune.graph import build_graph
from chanprune.surgery import PlanOp, replay

from conftest import assert_exact_against_zeroed, assert_round_trips, in_float64, prune_groups_directly, randomise


class StdConv2d(nn.Conv2d):
    """Weight standardized per output channel in forward, times a learnt gain (NF-Nets' form)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))

    def standardized(self) -> torch.Tensor:
        w = self.weight
        mean = w.mean((1, 2, 3), keepdim=True)
        std = w.var((1, 2, 3), keepdim=True, unbiased=False).add(1e-6).sqrt()
        return self.gain * (w - mean) / std

    def forward(self, x):
        return F.conv2d(x, self.standardized(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdNet(nn.Module):
    """std stem (3x3, stride 2) → std grouped 3x3 (dilation 2) → std 1x1 → std 3x3 → head."""

    def __init__(self):
        super().__init__()
        self.stem = StdConv2d(3, 8, 3, stride=2, padding=1)
        self.grouped = StdConv2d(8, 12, 3, padding=2, dilation=2, groups=4, bias=False)
        self.pw = StdConv2d(12, 10, 1)
        self.conv = StdConv2d(10, 9, (3, 2), padding=(1, 0))
        self.fc = nn.Linear(9, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.pw(F.relu(self.grouped(x))))
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


def images(n: int = 48) -> torch.Tensor:
    return torch.randn(n, 3, 12, 12, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("layer", ["stem", "grouped", "pw", "conv"])
def test_the_weight_read_off_the_forward_is_the_standardized_one(layer):
    conv = randomise(StdNet(), 0).get_submodule(layer).double()
    weight, bias = effective_weight(conv)
    with torch.no_grad():
        torch.testing.assert_close(weight, conv.standardized(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bias, conv.bias if conv.bias is not None else torch.zeros_like(bias),
                                   rtol=1e-12, atol=1e-12)
    assert not torch.allclose(conv.weight, conv.standardized(), atol=1e-2)  # the raw weight differs


def test_every_std_conv_is_folded_and_every_group_prunes():
    model, x = randomise(StdNet(), 0), images()
    graph = build_graph(model, x[:1])
    assert [(r.op, r.layer) for r in graph.rewrites] == [(FOLD_OP, n) for n in ("stem", "grouped", "pw", "conv")]
    assert all(type(graph.gm.get_submodule(n)) is nn.Conv2d for n in ("stem", "grouped", "pw", "conv"))
    assert type(model.stem) is StdConv2d  # the user's model is left as it was
    assert all(g.prunable for g in graph.groups if g.name != "fc")
    torch.testing.assert_close(graph.gm(x), model(x), rtol=1e-4, atol=1e-5)


def test_refitting_a_folded_conv_at_full_width_keeps_its_function():
    model, x = randomise(StdNet(), 0), images(200)
    same, _, _, _ = prune_groups_directly(model, x, {"stem": 8, "grouped": 12, "pw": 10, "conv": 9},
                                       method="greedy")
    assert type(same.pw) is nn.Conv2d
    torch.testing.assert_close(in_float64(same, x), in_float64(model, x), rtol=1e-4, atol=1e-4)


def test_dropping_channels_of_folded_convs_is_exact_and_round_trips(tmp_path):
    model, x = randomise(StdNet(), 0), images()
    pruned, _ = prune(model, x, None, widths={"grouped": 4, "pw": 8, "conv": 6, "fc": 5}, method="max_response",
                      reconstruct=False, progress=False)
    assert all(type(pruned.get_submodule(n)) is nn.Conv2d for n in ("stem", "grouped", "pw", "conv"))
    assert (pruned.stem.out_channels, pruned.grouped.out_channels, pruned.pw.out_channels) == (4, 8, 6)
    # the reference folds the model first
    assert_exact_against_zeroed(model, pruned, x, 4 + 4 + 4 + 4)
    assert_round_trips(pruned, randomise(StdNet(), 5), x, tmp_path)


class SquaredConv2d(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) ** 2


def test_a_fold_that_does_not_match_the_layer_is_refused():
    model = randomise(StdNet(), 0)
    with pytest.raises(ChanpruneError, match="'fc', which is not a conv with a forward of its own"):
        replay(copy.deepcopy(model), [PlanOp(FOLD_OP, "fc")])
    model.pw = SquaredConv2d(12, 10, 1)
    with pytest.raises(ChanpruneError, match="folds 'pw' into a plain conv, which does not compute what it does"):
        replay(model, [PlanOp(FOLD_OP, "pw")])
