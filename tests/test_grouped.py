"""Grouped convolutions (ResNeXt, RegNet): the channels a grouped conv reads are pruned block by
block, as many in every conv group, and the conv is refitted group by group from moments kept per
conv group; the channels it writes also lose as many in every conv group (chosen block by block
on its readers' problems); it stays grouped."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from chanprune import prune
from chanprune.errors import ChanpruneError
from chanprune.flops import count_flops
from chanprune.graph import build_graph
from chanprune.surgery import PlanOp, apply_op

from conftest import assert_round_trips, prune_groups_directly, randomise

SHAPE = (3, 12, 12)
GROUPS = 4


class NeXtBlock(nn.Module):
    """stem (16) → c1 1x1 (24) → BN → c2 3x3 grouped (4 groups of 6) → BN → c3 1x1 (16) → BN, added to the stem."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.c1 = nn.Conv2d(16, 24, 1)
        self.b1 = nn.BatchNorm2d(24)
        self.c2 = nn.Conv2d(24, 24, 3, padding=1, groups=GROUPS)
        self.b2 = nn.BatchNorm2d(24)
        self.c3 = nn.Conv2d(24, 16, 1)
        self.b3 = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        t = torch.relu(self.stem(x))
        y = torch.relu(self.b1(self.c1(t)))
        y = torch.relu(self.b2(self.c2(y)))
        return self.head(torch.relu(t + self.b3(self.c3(y))).mean((2, 3)))


def images(n: int = 64) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(2))


def unreconstructed(model: nn.Module, x: torch.Tensor, reader: str, width: int) -> tuple[nn.Module, torch.Tensor]:
    """``model`` with ``reader``'s input channels cut to ``width`` by max_response, without least
    squares, and the input channels ``reader`` kept."""
    pruned, report = prune(model, x, None, widths={reader: width}, method="max_response", reconstruct=False,
                           progress=False)
    return pruned, torch.tensor(next(layer for layer in report.layers if layer.name == reader).kept_indices)


def test_the_grouped_conv_reads_and_writes_groups_kept_block_by_block():
    graph = build_graph(randomise(NeXtBlock(), 0), images(1))
    read, written = graph.group("c1"), graph.group("c2")
    assert [(r.name, r.groups) for r in read.readers] == [("c2", GROUPS)] and read.prunable
    assert written.conv_groups == GROUPS and written.prunable and [r.name for r in written.readers] == ["c3"]


def test_its_outputs_lose_as_many_channels_per_conv_group_exactly_as_zeroed_inputs_of_the_reader():
    model, x = randomise(NeXtBlock(), 0), images()
    pruned, kept = unreconstructed(model, x, "c3", 16)
    assert torch.equal(torch.bincount(kept // 6, minlength=GROUPS), torch.full((GROUPS,), 4))
    assert pruned.c2.groups == GROUPS and pruned.c2.out_channels == 16 and pruned.b2.num_features == 16
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.c3.weight[:, [c for c in range(24) if c not in kept]] = 0
        assert not torch.allclose(model(x), reference(x), atol=1e-4)
        torch.testing.assert_close(pruned.double()(x.double()), reference.double()(x.double()), rtol=1e-9, atol=1e-9)
    with pytest.raises(ChanpruneError, match="must be a multiple of 4"):
        prune(model, x, None, widths={"c3": 15}, progress=False)


def test_keeping_every_channel_is_exact():
    model, x = randomise(NeXtBlock(), 0), images()
    pruned, _, plan, _ = prune_groups_directly(model, x, {"c1": 24}, reconstruct=False)
    assert [op.op for op in plan.ops] == ["keep_inputs", "keep_outputs", "keep_channels"]
    with torch.no_grad():
        assert torch.equal(pruned(x), model(x))


def test_without_reconstruction_it_equals_the_grouped_conv_with_zeroed_inputs():
    model, x = randomise(NeXtBlock(), 0), images()
    pruned, kept = unreconstructed(model, x, "c2", 12)
    assert torch.equal(torch.bincount(kept // 6, minlength=GROUPS), torch.full((GROUPS,), 3))
    assert pruned.c2.groups == GROUPS and pruned.c2.in_channels == 12 and pruned.c1.out_channels == 12
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for c in range(24):
            if c not in kept:  # conv group c // 6 reads input c as its column c % 6
                reference.c2.weight[(c // 6) * 6:(c // 6 + 1) * 6, c % 6] = 0
        assert not torch.allclose(model(x), reference(x), atol=1e-4)
        torch.testing.assert_close(pruned.double()(x.double()), reference.double()(x.double()), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", ["greedy", "lasso"])
def test_reconstruction_group_by_group_lowers_the_error(method):
    model, x = randomise(NeXtBlock(), 0), images()
    errors = {}
    for reconstruct in (False, True):
        pruned, report = prune(model, x, None, widths={"c2": 12}, method=method, reconstruct=reconstruct,
                               progress=False)
        with torch.no_grad():
            errors[reconstruct] = float((pruned(x) - model(x)).norm() / model(x).norm())
        layer = next(layer for layer in report.layers if layer.name == "c2")
        assert layer.rel_error <= layer.rel_error_before + 1e-12
    assert errors[True] < 0.8 * errors[False]


def test_a_grouped_conv_down_to_one_input_per_group_still_loses_outputs():
    model, x = randomise(NeXtBlock(), 0), images()
    pruned, _ = prune(model, x, None, widths={"c2": GROUPS, "c3": 2 * GROUPS}, progress=False)
    assert (pruned.c2.in_channels, pruned.c2.out_channels, pruned.c2.groups) == (GROUPS, 2 * GROUPS, GROUPS)
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape


def test_a_pruned_grouped_block_meets_its_target_and_round_trips(tmp_path):
    model, x = randomise(NeXtBlock(), 0), images()
    pruned, report = prune(model, x, 1.4, progress=False)
    assert abs(report.speedup_achieved / 1.4 - 1) <= 0.02
    assert report.flops_after == count_flops(pruned, (1, *SHAPE))
    assert pruned.c2.groups == GROUPS and pruned.c2.in_channels % GROUPS == 0 and pruned.c2.out_channels % GROUPS == 0
    assert pruned.c2.in_channels < 24 or pruned.c2.out_channels < 24
    assert_round_trips(pruned, randomise(NeXtBlock(), 7), x, tmp_path)


def test_widths_must_keep_as_many_channels_in_every_conv_group():
    model, x = randomise(NeXtBlock(), 0), images()
    with pytest.raises(ChanpruneError, match="must be a multiple of 4"):
        prune(model, x, None, widths={"c2": 10}, progress=False)
    with pytest.raises(ChanpruneError, match="as many input channels in every group"):
        apply_op(copy.deepcopy(model), PlanOp("keep_inputs", "c2", tuple(range(8))))
    with pytest.raises(ChanpruneError, match="as many output channels in every group"):
        apply_op(copy.deepcopy(model), PlanOp("keep_outputs", "c2", (0, 1, 6, 7, 12, 13, 18)))


def test_a_grouped_conv_sharing_its_input_with_a_dense_conv_leaves_it_whole():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 1)
            self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.dense = nn.Conv2d(8, 8, 1)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            y = torch.relu(self.c1(x))
            return self.head((self.grouped(y) + self.dense(y)).mean((2, 3)))

    with pytest.warns(UserWarning, match="grouped is a grouped conv .2 groups. and other layers read its input too"):
        graph = build_graph(Shared().eval(), images(1))
    assert not graph.group("c1").prunable
