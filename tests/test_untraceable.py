"""A submodule torch.fx cannot trace (Python control flow on tensor values, as timm's
BilinearAttnTransform) is kept whole as a leaf: what its forward recorded before failing is taken
back, a warning names it, and the rest of the model is read and pruned as usual."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from chanprune import prune
from chanprune.graph import build_graph
from chanprune.tracing import trace

from conftest import assert_exact_against_zeroed, assert_round_trips, randomise


class Gate(nn.Module):
    """A conv, then a branch on the data: fx records the conv, then fails."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        y = self.conv(x) * self.scale
        return y if y.mean() > 0 else -y


class GatedNet(nn.Module):
    """conv1 → gate (untraceable) → conv2 → conv3 → head; the gate's scale is read again outside it."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = Gate(8)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.conv3 = nn.Conv2d(12, 10, 3, padding=1)
        self.fc = nn.Linear(10, 4)

    def forward(self, x):
        x = self.gate(F.relu(self.conv1(x)))
        x = F.relu(self.conv3(F.relu(self.conv2(x)))) * self.gate.scale
        return self.fc(x.mean((2, 3)))


def images(n: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, 10, 10, generator=torch.Generator().manual_seed(4))


def test_an_untraceable_submodule_is_a_leaf_and_the_trace_computes_the_model():
    model, x = randomise(GatedNet(), 0), images()
    with pytest.warns(UserWarning, match=r"gate \(Gate\) cannot be traced with torch.fx \(TraceError.*kept whole"):
        gm = trace(model)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == ["conv1", "gate", "conv2", "conv3", "fc"]  # gate.conv's node was taken back
    assert [n.target for n in gm.graph.nodes if n.op == "get_attr"] == ["gate.scale"]  # re-created outside
    torch.testing.assert_close(gm(x), model(x))
    x[:, 0] = -x[:, 0]  # the other branch, too
    torch.testing.assert_close(gm(x), model(x))


def test_the_channels_around_it_stay_whole_and_the_rest_prunes(tmp_path):
    model, x = randomise(GatedNet(), 0), images()
    with pytest.warns(UserWarning, match="kept whole"):
        graph = build_graph(model, x[:1])
    assert not graph.group("conv1").prunable and "Gate" in " ".join(graph.group("conv1").blocked_by)
    assert graph.group("conv2").prunable and graph.group("conv3").prunable
    with pytest.warns(UserWarning, match="kept whole"):
        pruned, _ = prune(model, x, None, widths={"conv3": 5, "fc": 6}, method="max_response",
                          reconstruct=False, progress=False)
    assert (pruned.conv2.out_channels, pruned.conv3.in_channels, pruned.fc.in_features) == (5, 5, 6)
    assert pruned.gate.conv.out_channels == 8 and type(pruned.gate) is Gate
    assert_exact_against_zeroed(model, pruned, x, 7 + 4)
    assert_round_trips(pruned, randomise(GatedNet(), 5), x, tmp_path, onnx=False)


class Outer(nn.Module):
    """An untraceable gate inside a module that itself branches on the data after it."""

    def __init__(self):
        super().__init__()
        self.gate = Gate(8)
        self.scale = nn.Parameter(torch.ones(1))  # read by GatedNet's forward

    def forward(self, x):
        y = self.gate(x)
        return y if y.std() > 0 else x


def test_only_the_outermost_untraceable_module_is_named():
    model = GatedNet()
    model.gate = Outer()
    with pytest.warns(UserWarning) as caught:
        gm = trace(randomise(model, 0))
    assert [str(w.message).split(" ")[0] for w in caught] == ["gate"]  # not gate.gate, which is inside it
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["conv1", "gate", "conv2", "conv3", "fc"]
