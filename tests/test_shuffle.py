"""Channel shuffles (ShuffleNet v2) rewritten as slices of their input, the layers downstream
permuted to match: the rewrite keeps the function, every group behind a shuffle is pruned, the
pruned model is exact where channels are only dropped, matches its FLOPs report, saves, loads and
exports; a shuffle whose channels reach what cannot be permuted stays, and a plan that rewrites
what is not a shuffle is refused."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from chanprune import prune
from chanprune.errors import ChanpruneError
from chanprune.flops import count_flops
from chanprune.graph import build_graph
from chanprune.io.provenance import provenance
from chanprune.shuffle import REWRITE_OPS
from chanprune.surgery import PlanOp, apply_op

from conftest import assert_round_trips, in_float64, randomise, zeroed_reference

SHAPE = (3, 16, 16)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(n, -1, h, w)


def branch(c_in: int, c: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                         nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False), nn.BatchNorm2d(c),
                         nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())


class Down(nn.Module):
    """Both halves computed from the input (stride 2), then concatenated and shuffled."""

    def __init__(self, c_in: int, c: int):
        super().__init__()
        self.branch1 = nn.Sequential(nn.Conv2d(c_in, c_in, 3, 2, 1, groups=c_in, bias=False), nn.BatchNorm2d(c_in),
                                     nn.Conv2d(c_in, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.branch2 = branch(c_in, c, 2)

    def forward(self, x):
        return channel_shuffle(torch.cat([self.branch1(x), self.branch2(x)], 1), 2)


class Unit(nn.Module):
    """Half the channels pass through, the other half through a branch; then a shuffle."""

    def __init__(self, c: int):
        super().__init__()
        self.branch2 = branch(c // 2, c // 2)

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([x1, self.branch2(x2)], 1), 2)


class TinyShuffleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.stage = nn.Sequential(Down(12, 12), Unit(24), Unit(24))
        self.head = nn.Sequential(nn.Conv2d(24, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        return self.fc(self.head(self.stage(self.stem(x))).mean((2, 3)))


class ShuffleToLinear(nn.Module):
    """A shuffle whose channels are flattened into a Linear: they cannot be permuted there."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        y = channel_shuffle(torch.relu(self.conv(x)), 2)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 4), 1))


class PermuteShuffle(nn.Module):
    """A shuffle written with ``permute`` and ``flatten``, three groups, before a dense conv."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.conv2 = nn.Conv2d(12, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        n, c, h, w = y.shape
        y = y.view(n, 3, c // 3, h, w).permute(0, 2, 1, 3, 4).flatten(1, 2)
        return self.fc(torch.relu(self.conv2(y)).mean((2, 3)))


class ShuffleThenScale(nn.Module):
    """A shuffle whose channels a per-channel parameter multiplies, in the original order."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, 8).reshape(8, 1, 1))
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = channel_shuffle(torch.relu(self.conv1(x)), 2) * self.scale
        return self.fc(torch.relu(self.conv2(y)).mean((2, 3)))


def images(n: int = 48) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(3))


def net(seed: int = 0) -> TinyShuffleNet:
    return randomise(TinyShuffleNet(), seed)


def test_shuffles_become_slices_and_every_group_is_prunable():
    model, x = net(), images()
    before = in_float64(model, x)
    graph = build_graph(model, x[:1])
    assert [r.op for r in graph.rewrites if r.op == "slice_shuffle"] == ["slice_shuffle"] * 3
    permuted = {r.layer for r in graph.rewrites if r.op != "slice_shuffle"}
    assert {"stage.1.branch2.0", "stage.2.branch2.0", "head.0"} <= permuted  # readers of shuffled channels
    assert [g.name for g in graph.groups if not g.prunable] == ["fc"]  # only the logits
    assert not any(n.target is torch.transpose for n in graph.gm.graph.nodes)
    torch.testing.assert_close(in_float64(graph.gm, x), in_float64(model, x), rtol=1e-12, atol=1e-12)
    assert torch.equal(in_float64(model, x), before)  # the caller's model is not changed


def test_keeping_every_channel_keeps_the_function():
    model, x = net(), images()
    widths = {f"group:{g.name}": g.channels for g in build_graph(model, x[:1]).prunable()}
    pruned, report = prune(model, x, None, widths=widths, reconstruct=False, progress=False)
    assert {op.op for op in provenance(pruned).plan} <= set(REWRITE_OPS)
    assert report.flops_after == report.flops_before
    torch.testing.assert_close(in_float64(pruned, x), in_float64(model, x), rtol=1e-12, atol=1e-12)


def test_dropping_channels_equals_zeroing_them_in_every_reader():
    """Without reconstruction, the pruned model is the original with each removed channel zeroed
    where it is read: a channel routed wrongly through a shuffle would change the output."""
    model, x = net(), images()
    pruned, report = prune(model, x, 2.0, method="max_response", reconstruct=False, allocation="uniform",
                           round_to=1, progress=False)
    reference, zeroed = zeroed_reference(model, provenance(pruned).plan)
    assert zeroed > 0
    expected = in_float64(reference, x)
    torch.testing.assert_close(in_float64(pruned, x), expected, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(in_float64(model, x), expected, rtol=1e-4)  # the check has teeth


def test_a_pruned_shuffle_net_meets_its_target_and_round_trips(tmp_path):
    model, x = net(), images()
    pruned, report = prune(model, x, 2.0, allocation="uniform", round_to=1, progress=False)
    assert abs(report.speedup_achieved / 2.0 - 1) <= 0.02
    assert report.flops_after == count_flops(pruned, (1, *SHAPE))
    for name in ("stage.1.branch2.0", "stage.2.branch2.0", "head.0"):  # behind a chunk or a shuffle
        assert pruned.get_submodule(name).in_channels < model.get_submodule(name).in_channels, name
    assert_round_trips(pruned, net(5), x, tmp_path)


def test_a_shuffle_whose_channels_cannot_be_permuted_stays_unpruned():
    model, x = randomise(ShuffleToLinear(), 0), images()
    with pytest.warns(UserWarning, match="view"):
        graph = build_graph(model, x[:1])
    assert graph.rewrites == []
    conv = graph.group("conv")
    assert not conv.prunable and any("view" in reason for reason in conv.blocked_by)


def test_a_shuffle_written_with_permute_and_flatten_is_rewritten_too(tmp_path):
    model, x = randomise(PermuteShuffle(), 0), images()
    graph = build_graph(model, x[:1])
    assert [(r.op, r.layer) for r in graph.rewrites] == [("slice_shuffle", "flatten"), ("permute_inputs", "conv2")]
    pruned, _ = prune(model, x, None, widths={"conv2": 6}, method="max_response", reconstruct=False,
                      progress=False)
    reference, zeroed = zeroed_reference(model, provenance(pruned).plan)
    assert zeroed == 6 and pruned.conv1.out_channels == 6
    torch.testing.assert_close(in_float64(pruned, x), in_float64(reference, x), rtol=1e-10, atol=1e-10)
    assert_round_trips(pruned, randomise(PermuteShuffle(), 5), x, tmp_path, onnx=False)


def test_a_shuffle_scaled_per_channel_afterwards_is_not_rewritten():
    """The scale holds its channels in the shuffled order, which a rewrite would move."""
    model, x = randomise(ShuffleThenScale(), 0), images()
    with pytest.warns(UserWarning, match="view"):
        graph = build_graph(model, x[:1])
    assert graph.rewrites == [] and not graph.group("conv1").prunable


def test_plans_that_rewrite_what_is_not_a_shuffle_are_refused():
    gm = fx.symbolic_trace(net())
    shuffle_end = next(n.name for n in gm.graph.nodes if n.op == "call_method" and n.target == "view"
                       and n.args[0].target == "contiguous")
    with pytest.raises(ChanpruneError, match="does not match its architecture"):
        apply_op(gm, PlanOp("slice_shuffle", "stem_0", (0, 4, 4, 8)))  # a conv, not a shuffle
    with pytest.raises(ChanpruneError, match="does not match its architecture"):
        apply_op(gm, PlanOp("slice_shuffle", shuffle_end, (0, 6, 4, 8)))  # overlapping slices
    with pytest.raises(ChanpruneError, match="not a permutation"):
        apply_op(gm, PlanOp("permute_inputs", "head.0", (0,) * 24))
    with pytest.raises(ChanpruneError, match="does not match its architecture"):
        apply_op(gm, PlanOp("permute_inputs", "head.1", tuple(range(32))))  # a BatchNorm has no inputs
    with pytest.raises(ChanpruneError, match="not traced"):
        apply_op(net(), PlanOp("slice_shuffle", shuffle_end, (0, 24)))
