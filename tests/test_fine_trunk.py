"""FCP's fine-grained trunks (``trunk="fine"``): every conv reading a residual trunk reads its own
subset of it, and every branch's last layer writes its own subset into the full-width add."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from chanprune import ChanpruneError, prune
from chanprune.allocation import FlopModel
from chanprune.config import PruneConfig
from chanprune.flops import count_flops, flop_breakdown
from chanprune.graph import build_graph
from chanprune.layers import ScatteredBatchNorm2d, ScatteredConv2d
from chanprune.models.srresnet import MSRResNet
from chanprune.surgery import PlanOp, apply_op, scatter_outputs
from chanprune.units import pruning_units

from conftest import assert_round_trips
from test_multibranch import MiniResNet, images, make

WRITERS = ["layer1.0.conv2", "layer1.1.conv2", "layer2.0.conv2", "layer2.1.conv2"]


def quiet_prune(model, x, speedup, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return prune(model, x, speedup, trunk="fine", progress=False, **options)


def test_a_scattered_layer_writes_its_channels_where_they_belong():
    conv = nn.Conv2d(3, 5, 3, padding=1).eval()
    keep = torch.tensor([1, 4, 6])
    narrow = copy.deepcopy(conv)
    narrow.weight.data, narrow.bias.data = conv.weight.data[:3].clone(), conv.bias.data[:3].clone()
    narrow.out_channels = 3
    scattered = scatter_outputs(narrow, keep, 8)
    scattered.scatter_fill[[0, 2, 3, 5, 7]] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    x = torch.randn(2, 3, 6, 6)
    out = scattered(x)
    assert isinstance(scattered, ScatteredConv2d) and out.shape == (2, 8, 6, 6)
    torch.testing.assert_close(out[:, keep], conv(x)[:, :3])
    for channel, fill in zip([0, 2, 3, 5, 7], [1.0, 2.0, 3.0, 4.0, 5.0]):
        assert torch.all(out[:, channel] == fill)
    bn = scatter_outputs(nn.BatchNorm2d(3).eval(), keep, 8)
    assert isinstance(bn, ScatteredBatchNorm2d) and bn(torch.randn(2, 3, 4, 4)).shape == (2, 8, 4, 4)


def test_a_plan_that_scatters_wrongly_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 1))
    for op, message in [(PlanOp("scatter_outputs", "0", (0, 1, 2, 3), 1 << 40), "at most"),
                        (PlanOp("scatter_outputs", "0", (0, 1, 2), 8), "4 channels to 3"),
                        (PlanOp("scatter_outputs", "0", (0, 1, 2, 2), 8), "distinct"),
                        (PlanOp("scatter_outputs", "0", (0, 1, 2, 9), 8), "keeps channel 9")]:
        with pytest.raises(ChanpruneError, match=message):
            apply_op(model, op)


def test_fine_trunks_give_select_units_to_readers_and_write_units_to_branch_ends():
    model, x = make(MiniResNet), images(4)
    graph = build_graph(model, x[:1])
    units = pruning_units(graph, PruneConfig(trunk="fine"))
    writes = [u.writer.name for u in units if u.kind == "write"]
    assert writes == WRITERS  # not the stem, not the projection (a 1x1 conv whose add operand is its BN)
    assert not any(u.kind == "trunk" for u in units)
    trunk_readers = {r.name for g in graph.groups if g.residual for r in g.readers if r.kind == "conv"}
    assert {u.reader.name for u in units if u.kind == "select"} == trunk_readers
    names = [u.name for u in units]
    for writer in WRITERS:  # right after the unit that refits the writer's inputs
        assert names.index(f"write:{writer}") == names.index(f"{writer.rpartition('.')[0]}.conv1") + 1


def test_dead_trunk_outputs_are_the_ones_dropped_and_the_model_is_unchanged():
    model, x = make(MiniResNet), images()
    dead = [0, 5]
    with torch.no_grad():
        model.layer1[0].conv2.weight[dead] = 0
        model.layer1[0].bn2.running_mean[dead] = 0
        model.layer1[0].bn2.bias[dead] = 0
    pruned, report = quiet_prune(model, x, None, widths={"write:layer1.0.conv2": 10}, reconstruct=False)
    entry = next(layer for layer in report.layers if layer.name == "write:layer1.0.conv2")
    assert entry.kind == "write" and entry.out_channels_after == 10
    assert not set(entry.kept_indices) & set(dead) and entry.rel_error < 1e-3
    assert isinstance(pruned.layer1[0].bn2, ScatteredBatchNorm2d) and pruned.layer1[0].conv2.out_channels == 10
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), rtol=1e-5, atol=1e-5)


def test_dropping_live_outputs_costs_what_the_report_says():
    model, x = make(MiniResNet), images()
    pruned, report = quiet_prune(model, x, None, widths={"write:layer1.1.conv2": 6})
    entry = next(layer for layer in report.layers if layer.name == "write:layer1.1.conv2")
    block = {}
    hooks = [m.layer1[1].sum.register_forward_hook(lambda mod, i, o, key=key: block.__setitem__(key, o))
             for key, m in (("original", model), ("pruned", pruned))]
    with torch.no_grad():
        model(x), pruned(x)
    for h in hooks:
        h.remove()
    # the error on the block's sum (the writer's output plus the unchanged shortcut), relative to the
    # writer's target, is the error the report gives: the dropped outputs are in it
    branch = model.layer1[1].bn2(model.layer1[1].conv2(torch.relu(model.layer1[1].bn1(model.layer1[1].conv1(
        block_input(model, x))))))
    measured = float((block["pruned"] - block["original"]).norm() / branch.norm())
    assert 0.2 < entry.rel_error and measured == pytest.approx(entry.rel_error, rel=0.35)


def block_input(model: MiniResNet, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.layer1[0](torch.relu(model.bn1(model.conv1(x))))


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_fine_meets_the_target_and_round_trips(tmp_path, allocation):
    model, x = make(MiniResNet), images()
    pruned, report = quiet_prune(model, x, 2.0, allocation=allocation, round_to=1)
    assert abs(report.speedup_achieved / 2.0 - 1) <= 0.02
    assert report.flops_after == count_flops(pruned, (1, 3, 16, 16))
    if allocation == "uniform":
        assert sum(isinstance(m, ScatteredBatchNorm2d) for m in pruned.modules()) == len(WRITERS)
    assert_round_trips(pruned, MiniResNet(), x, tmp_path)


def test_a_network_without_batchnorm_scatters_from_its_convs(tmp_path):
    model = MSRResNet(width=8, blocks=2, scale=2).eval()
    x = torch.randn(24, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    pruned, report = quiet_prune(model, x, 1.5, allocation="uniform", round_to=1)
    assert abs(report.speedup_achieved / 1.5 - 1) <= 0.02
    assert report.flops_after == count_flops(pruned, (1, 3, 12, 12))
    assert all(isinstance(block.conv2, ScatteredConv2d) for block in pruned.body)
    with torch.no_grad():
        plain, _ = quiet_prune(model, x, 1.5, allocation="uniform", round_to=1, reconstruct=False)
        rebuilt, kept_weights = (net(x) - model(x) for net in (pruned, plain))
    assert rebuilt.norm() < kept_weights.norm()
    assert_round_trips(pruned, MSRResNet(width=8, blocks=2, scale=2), x, tmp_path)


def test_a_resumed_fine_run_replays_to_the_same_bytes(tmp_path):
    model, x = make(MiniResNet), images(40)
    options = dict(allocation="uniform", round_to=1, checkpoint_dir=tmp_path / "ck", batch_size=8)
    first, _ = quiet_prune(model, x, 1.8, **options)
    again, report = quiet_prune(model, x, 1.8, **options)
    assert report.resumed_units > len(WRITERS)
    sa, sb = first.state_dict(), again.state_dict()
    assert list(sa) == list(sb) and any(k.endswith("scatter_fill") for k in sa)
    for name in sa:
        assert sa[name].numpy().tobytes() == sb[name].numpy().tobytes(), name


def test_write_units_shrink_only_the_writer_in_the_flop_model():
    model, x = make(MiniResNet), images(4)
    graph = build_graph(model, x[:1])
    total, per_layer = flop_breakdown(model, (1, 3, 16, 16))
    flops = FlopModel(graph, total, per_layer).layer_flops({"write:layer1.0.conv2": 6}, per_layer)
    assert flops["layer1.0.conv2"] == pytest.approx(per_layer["layer1.0.conv2"] / 2)
    assert all(flops[name] == per_layer[name] for name in per_layer if name != "layer1.0.conv2")
