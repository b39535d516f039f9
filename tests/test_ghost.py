"""Ghost modules: ``cat([x1, cheap(x1)])`` holds one group twice (the cheap op is a depthwise
conv, a follower), so its readers, the squeeze-excitation that gates it and the trunk it is added
to hold the group twice too; pruning a channel removes it in both places. Keeping every channel
and dropping channels no reader uses are exact; a pruned model meets its FLOPs report, saves,
loads and exports."""

from __future__ import annotations

import torch
from torch import nn

from chanprune import prune
from chanprune.flops import count_flops
from chanprune.graph import build_graph

from conftest import assert_round_trips, prune_groups_directly, randomise

SHAPE = (3, 12, 12)


class GhostModule(nn.Module):
    """GhostNet's module: a 1x1 conv to ``ceil(out / 2)`` channels, a depthwise 3x3 copy of them,
    both concatenated and sliced to ``out`` channels."""

    def __init__(self, cin: int, out: int, relu: bool = True):
        super().__init__()
        self.out = out
        init = -(-out // 2)
        act = nn.ReLU() if relu else nn.Identity()
        self.primary = nn.Sequential(nn.Conv2d(cin, init, 1, bias=False), nn.BatchNorm2d(init), act)
        self.cheap = nn.Sequential(nn.Conv2d(init, init, 3, padding=1, groups=init, bias=False),
                                   nn.BatchNorm2d(init), act)

    def forward(self, x):
        x1 = self.primary(x)
        return torch.cat([x1, self.cheap(x1)], 1)[:, :self.out]


class GhostNet(nn.Module):
    """stem (8) ─ ghost1 (16, as [g, g]) ─ SE gate ─ ghost2 (8, as [h, h]) ─ + stem ─ ghost3 (7) ─ head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.ghost1 = GhostModule(8, 16)
        self.se_reduce = nn.Conv2d(16, 4, 1)
        self.se_expand = nn.Conv2d(4, 16, 1)
        self.ghost2 = GhostModule(16, 8, relu=False)
        self.ghost3 = GhostModule(8, 7)
        self.head = nn.Linear(7, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.ghost1(x)
        y = y * torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(y.mean((2, 3), keepdim=True)))))
        x = self.ghost2(y) + x
        return self.head(self.ghost3(x).mean((2, 3)))


def images(n: int = 48) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(4))


def test_a_ghost_module_holds_its_group_twice():
    graph = build_graph(randomise(GhostNet(), 0), images(1))
    g1 = graph.group("ghost1.primary.0")
    assert graph.layouts["ghost2.primary.0"] == ["ghost1.primary.0", "ghost1.primary.0"]
    assert "ghost1.cheap.0" in g1.followers and g1.prunable
    assert graph.out_layouts["se_expand"] == ["ghost1.primary.0", "ghost1.primary.0"]  # the gate, tied twice
    trunk = graph.group("stem.0[0:4]")  # the stem's halves are added to [h, cheap(h)]: both are h
    assert trunk.residual and trunk.prunable and trunk.writers == ["stem.0", "ghost2.primary.0"]
    assert graph.out_layouts["stem.0"] == ["stem.0[0:4]", "stem.0[0:4]"]
    assert [r.name for r in trunk.readers] == ["ghost1.primary.0", "ghost3.primary.0"]
    # ghost3's odd width: the slice cuts its group, so the head reads [a, b, a]
    assert graph.layouts["head"] == ["ghost3.primary.0[0:3]", "ghost3.primary.0[3:4]", "ghost3.primary.0[0:3]"]


def test_keeping_every_channel_is_exact():
    model, x = randomise(GhostNet(), 0), images()
    full = {"group:ghost1.primary.0": 8, "group:stem.0[0:4]": 4, "group:ghost3.primary.0[0:3]": 3}
    pruned, _, _, _ = prune_groups_directly(model, x, full, reconstruct=False, recipe="default")
    with torch.no_grad():
        assert torch.equal(pruned(x), model(x))


def test_dropping_channels_no_reader_uses_is_exact():
    model, x = randomise(GhostNet(), 0), images()
    with torch.no_grad():  # channel 5 of ghost1 (and its cheap copy at 13) is read by nobody
        for reader in (model.ghost2.primary[0], model.se_reduce):
            reader.weight[:, [5, 13]] = 0
    pruned, report = prune(model, x, None, widths={"group:ghost1.primary.0": 7}, method="greedy",
                           reconstruct=False, progress=False)
    kept = next(layer for layer in report.layers if layer.name == "ghost2.primary.0").kept_indices
    assert kept == [0, 1, 2, 3, 4, 6, 7]
    assert pruned.ghost1.primary[0].out_channels == 7 and pruned.ghost1.cheap[0].out_channels == 7
    assert pruned.se_expand.out_channels == 14 and pruned.ghost2.primary[0].in_channels == 14
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), rtol=1e-5, atol=1e-6)


def test_a_pruned_ghost_net_meets_its_target_and_round_trips(tmp_path):
    model, x = randomise(GhostNet(), 0), images()
    pruned, report = prune(model, x, 1.6, trunk="joint", allocation="uniform", round_to=1, progress=False)
    assert abs(report.speedup_achieved / 1.6 - 1) <= 0.02
    assert report.flops_after == count_flops(pruned, (1, *SHAPE))
    width = {name: pruned.get_submodule(name).out_channels  # a traced graph: ghost3's slice moved
             for name in ("ghost1.primary.0", "stem.0", "ghost2.primary.0", "ghost3.primary.0")}
    assert width["ghost1.primary.0"] < 8 and width["stem.0"] < 8 and width["ghost3.primary.0"] < 4
    assert width["stem.0"] == 2 * width["ghost2.primary.0"]  # the add stays aligned
    assert_round_trips(pruned, randomise(GhostNet(), 5), x, tmp_path)
