"""Channels cut into pieces: ``split`` (sizes), ``chunk``, a channel slice and ``narrow`` make each
piece a group of its own that shares its writer; pruning moves the cuts to the new widths (the
pruned model is the traced graph with its cut positions rewritten), and the result is exact,
matches its FLOPs report, saves, loads and exports."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import fx, nn

from chanprune import prune
from chanprune.errors import ChanpruneError
from chanprune.flops import count_flops
from chanprune.graph import build_graph
from chanprune.io.provenance import provenance
from chanprune.surgery import PlanOp, apply_op

from conftest import assert_round_trips, in_float64, prune_groups_directly, randomise, zeroed_reference

SHAPE = (3, 12, 12)
DEAD_STEM = (7, 12)  # stem channels (both in the second split piece) that are zero everywhere
DEAD_MIX = (1, 10)  # mix channels (first and last chunk piece) that are zero everywhere


class SplitNet(nn.Module):
    """CSP / mixed-kernel / shuffle-style cuts on one small net.

    stem (16) ─split [6, 10]─┬ a (6→8) ─────────────┐
                             └ dw (depthwise 10) ───┴ cat (18) → mix (12) ─chunk 2─┬ p (6) → conv_p ┐
                                                                   │               └ q (6) ────────┴ cat → out
                                                                   └ narrow(1, 3, 6) → conv_s
    """

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(6, 8, 3, padding=1)
        self.dw = nn.Conv2d(10, 10, 3, padding=1, groups=10)
        self.mix = nn.Conv2d(18, 12, 1)
        self.conv_p = nn.Conv2d(6, 6, 3, padding=1)
        self.out = nn.Conv2d(12, 8, 3, padding=1)
        self.conv_s = nn.Conv2d(6, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x1, x2 = torch.split(x, [6, 10], dim=1)
        y = torch.cat([torch.relu(self.a(x1)), torch.relu(self.dw(x2))], 1)
        y = torch.relu(self.mix(y))
        p, q = y.chunk(2, dim=1)
        z = torch.relu(self.out(torch.cat([torch.relu(self.conv_p(p)), q], 1)))
        s = torch.relu(self.conv_s(y.narrow(1, 3, 6)))
        return self.head((z + s).mean((2, 3)))


class SlicedNet(nn.Module):
    """A Ghost-style slice: conv (10) → ``x[:, 2:7]`` → conv."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, 3, padding=1)
        self.conv2 = nn.Conv2d(5, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        y = torch.relu(self.conv1(x))[:, 2:7]
        return self.head(torch.relu(self.conv2(y)).mean((2, 3)))


def images(n: int = 48) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(3))


def split_net(dead: bool = False) -> SplitNet:
    model = randomise(SplitNet(), 0)
    if dead:  # channels that write zeros and that every reader ignores change nothing when dropped
        with torch.no_grad():
            for c in DEAD_STEM:
                model.stem.weight[c] = 0
                model.stem.bias[c] = 0
                model.dw.bias[c - 6] = 0
            for c in DEAD_MIX:
                model.mix.weight[c] = 0
                model.mix.bias[c] = 0
    return model


def test_each_piece_is_a_group_that_shares_its_writer():
    graph = build_graph(split_net(), images(1))
    assert graph.out_layouts == {"stem": ["stem[0:6]", "stem[6:16]"],
                                 "mix": ["mix[0:3]", "mix[3:6]", "mix[6:9]", "mix[9:12]"]}
    names = {g.name: g for g in graph.groups}
    assert names["stem[6:16]"].followers == ["dw"] and names["stem[6:16]"].writers == ["stem"]
    assert [r.name for r in names["mix[3:6]"].readers] == ["conv_p", "conv_s"]
    assert [r.name for r in names["mix[6:9]"].readers] == ["out", "conv_s"]
    assert graph.layouts["out"] == ["conv_p", "mix[6:9]", "mix[9:12]"]
    assert all(names[g].prunable for g in (*graph.out_layouts["stem"], *graph.out_layouts["mix"]))
    assert {c.node for c in graph.cuts} == {"split", "chunk", "narrow"}


def test_keeping_every_channel_is_exact():
    model, x = split_net(), images()
    full = {"stem[0:6]": 6, "stem[6:16]": 10, "mix[0:3]": 3, "mix[3:6]": 3, "mix[6:9]": 3, "mix[9:12]": 3}
    pruned, _, plan, _ = prune_groups_directly(model, x, full, reconstruct=False)
    assert [op.op for op in plan.ops if op.op == "cut_channels"]  # the cuts were rewritten, to where they were
    with torch.no_grad():
        assert torch.equal(pruned(x), model(x))


def test_dropping_dead_channels_of_every_piece_is_exact():
    model, x = split_net(dead=True), images()
    widths = {"group:stem[6:16]": 8, "group:mix[0:3]": 2, "group:mix[9:12]": 2}
    pruned, report = prune(model, x, None, widths=widths, method="max_response", reconstruct=False, progress=False)
    kept = {layer.name: layer.kept_indices for layer in report.layers}  # of the piece each unit pruned
    assert [6 + c for c in range(10) if c not in kept["mix"]] == list(DEAD_STEM)  # dw follows the piece
    assert [c for c in range(3) if c not in kept["conv_p"]] == [DEAD_MIX[0]]
    assert [9 + c for c in range(3) if c not in kept["out"]] == [DEAD_MIX[1]]
    assert pruned.stem.out_channels == 14 and pruned.mix.out_channels == 10 and pruned.dw.out_channels == 8
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), rtol=1e-5, atol=1e-6)


def test_a_pruned_split_net_meets_its_target_and_round_trips(tmp_path):
    model, x = split_net(), images()
    pruned, report = prune(model, x, 1.8, allocation="uniform", round_to=1, progress=False)
    assert abs(report.speedup_achieved / 1.8 - 1) <= 0.02
    assert report.flops_after == count_flops(pruned, (1, *SHAPE))
    assert isinstance(pruned, fx.GraphModule)  # the cuts live in the traced graph
    split = next(n for n in pruned.graph.nodes if n.name == "split")
    assert split.args[1] == [pruned.a.in_channels, pruned.dw.in_channels] and pruned.stem.out_channels < 16
    assert next(n for n in pruned.graph.nodes if n.name == "chunk").target == "split"
    assert_round_trips(pruned, randomise(SplitNet(), 5), x, tmp_path)


def test_a_channel_slice_moves_with_the_pruned_channels():
    model, x = randomise(SlicedNet(), 0), images()
    graph = build_graph(model, x[:1])
    assert graph.out_layouts["conv1"] == ["conv1[0:2]", "conv1[2:7]", "conv1[7:10]"]
    pruned, report = prune(model, x, None, widths={"group:conv1[2:7]": 3}, reconstruct=False, progress=False)
    kept = next(layer for layer in report.layers if layer.name == "conv2").kept_indices
    sliced = next(n for n in pruned.graph.nodes if n.target is operator.getitem)
    assert sliced.args[1][1] == slice(2, 5)
    reference = randomise(SlicedNet(), 0)
    with torch.no_grad():
        reference.conv2.weight[:, [c for c in range(5) if c not in kept]] = 0
        torch.testing.assert_close(pruned(x), reference(x), rtol=1e-5, atol=1e-6)
    assert pruned.conv1.out_channels == 8


def test_a_plan_that_cuts_a_node_that_is_not_a_cut_is_refused():
    gm = fx.symbolic_trace(randomise(SlicedNet(), 0))
    with pytest.raises(ChanpruneError, match="does not match its architecture"):
        apply_op(gm, PlanOp("cut_channels", "conv2", (1, 0, 3)))
    with pytest.raises(ChanpruneError, match="does not match its architecture"):
        apply_op(gm, PlanOp("cut_channels", "getitem", (1, 5, 2)))
    with pytest.raises(ChanpruneError, match="not traced"):
        apply_op(SlicedNet(), PlanOp("cut_channels", "getitem", (1, 0, 3)))


class CatPlusTrunk(nn.Module):
    """A concatenation added to one group (mixed-kernel and Ghost blocks): stem (8) + cat[a (3), b (5)]."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 3, 3, padding=1)
        self.b = nn.Conv2d(8, 5, 1)
        self.out = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        t = torch.relu(self.stem(x))
        t = t + torch.cat([self.a(t), self.b(t)], 1)
        return self.head(torch.relu(self.out(torch.relu(t))).mean((2, 3)))


def test_a_concatenation_added_to_one_group_ties_piece_by_piece(tmp_path):
    model, x = randomise(CatPlusTrunk(), 0), images()
    graph = build_graph(model, x[:1])
    assert graph.out_layouts == {"stem": ["stem[0:3]", "stem[3:8]"]}
    names = {g.name: g for g in graph.groups}
    assert names["stem[0:3]"].writers == ["stem", "a"] and names["stem[3:8]"].writers == ["stem", "b"]
    assert names["stem[0:3]"].residual and names["stem[0:3]"].prunable and not graph.cuts
    pruned, report = prune(model, x, 1.5, trunk="joint", allocation="uniform", round_to=1, progress=False)
    assert pruned.a.out_channels < 3 or pruned.b.out_channels < 5
    assert pruned.stem.out_channels == pruned.a.out_channels + pruned.b.out_channels == pruned.out.in_channels
    assert report.flops_after == count_flops(pruned, (1, *SHAPE))
    assert_round_trips(pruned, randomise(CatPlusTrunk(), 5), x, tmp_path, onnx=False)


class ChannelsLastGate(nn.Module):
    """MambaOut's gated block on channels-last values: fc1's output split along the last axis into
    a gate g (6), a kept piece i (2) and a piece c (4) that a depthwise conv mixes in NCHW; the
    gate multiplies ``cat((i, c), -1)``, which fc2 reads."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 12)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.fc2 = nn.Linear(6, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.stem(x)).permute(0, 2, 3, 1)
        g, i, c = torch.split(self.fc1(y), [6, 2, 4], dim=-1)
        c = self.dw(c.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        z = self.fc2(nn.functional.gelu(g) * torch.cat((i, c), dim=-1))
        return self.head(z.mean((1, 2)))


def test_a_concatenation_along_the_last_axis_of_channels_last_values_prunes(tmp_path):
    model, x = randomise(ChannelsLastGate(), 0), images()
    graph = build_graph(model, x[:1])
    # the gate is cut to match i and c, and each gate piece is tied to the piece it multiplies
    assert graph.out_layouts["fc1"] == ["fc1[0:2]", "fc1[2:6]", "fc1[0:2]", "fc1[2:6]"]
    assert graph.group("fc1[2:6]").followers == ["dw"] and graph.group("fc1[0:2]").prunable
    pruned, _ = prune(model, x, None, widths={"group:fc1[0:2]": 1, "group:fc1[2:6]": 3}, method="max_response",
                      reconstruct=False, progress=False)
    assert (pruned.fc1.out_features, pruned.dw.out_channels, pruned.fc2.in_features) == (8, 3, 4)
    reference, zeroed = zeroed_reference(model, provenance(pruned).plan)
    assert zeroed > 0
    torch.testing.assert_close(in_float64(pruned, x), in_float64(reference, x), rtol=1e-10, atol=1e-10)
    assert_round_trips(pruned, randomise(ChannelsLastGate(), 5), x, tmp_path, onnx=False)
