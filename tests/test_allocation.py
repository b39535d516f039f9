"""Speed-up target -> widths on the bundled VGG graph (no data needed), and explicit widths."""

from __future__ import annotations

import copy
import itertools
import re

import pytest
import torch

from chanprune.allocation import PRESETS, TOLERANCE, FlopModel, Unit, allocate, check_widths
from chanprune.errors import ChanpruneError, UnreachableSpeedup
from chanprune.flops import count_flops, flop_breakdown
from chanprune.graph import build_graph
from chanprune.models import create_model
from chanprune.pruner import prune
from chanprune.surgery import Plan

from conftest import IMAGE_SHAPE, make_tiny, random_images

SHAPE = (1, 1, 32, 32)


def units_of(groups) -> list[Unit]:
    """A pruning unit per group, as the pruner makes them for prunable groups."""
    return [Unit(g) for g in groups]


@pytest.fixture(scope="module")
def vgg():
    model = create_model("vgg16-mnist", pretrained=False)
    graph = build_graph(model, torch.zeros(SHAPE))
    total, per_layer = flop_breakdown(model, SHAPE)
    return model, graph, FlopModel(graph, total, per_layer)


def shrink(model, graph, widths):
    """Physically keep the first widths[g] channels of every group (weights do not matter here)."""
    model = copy.deepcopy(model)
    plan = Plan()
    for g in graph.groups:
        if g.name not in widths:
            continue
        keep = torch.arange(widths[g.name])
        for r in g.readers:
            plan.keep_inputs(model, r.name, keep, r.channel_size)
        for name in (g.writer, *g.followers):
            plan.keep_outputs(model, name, keep)
    return model


def test_flop_model_counts_every_conv_and_linear(vgg):
    model, graph, flop_model = vgg
    assert set(flop_model.per_layer) == {n for g in graph.groups for n in [g.writer]}
    # conv1_1: 2 * 32*32 positions * 9 * 1 input * 32 outputs; fc2: 2 * 256 * 10
    assert flop_model.per_layer["features.conv1_1.conv"] == 2 * 32 * 32 * 9 * 1 * 32
    assert flop_model.per_layer["classifier.fc2"] == 2 * 256 * 10
    assert flop_model.total == count_flops(model, SHAPE) == sum(flop_model.per_layer.values())
    assert flop_model.flops({}) == flop_model.total


@pytest.mark.parametrize("preset", ["uniform", "vgg-paper"])
@pytest.mark.parametrize("speedup", [1.5, 2.0, 3.0, 4.0, 5.0])
def test_allocation_meets_the_target_within_two_percent(vgg, preset, speedup):
    model, graph, flop_model = vgg
    widths = allocate(flop_model, units_of(graph.prunable()), speedup, PRESETS[preset])
    achieved = flop_model.total / flop_model.flops(widths)
    assert abs(achieved / speedup - 1) <= 0.02
    by_name = {g.name: g for g in graph.groups}
    for name, w in widths.items():
        assert isinstance(w, int) and 1 <= w <= by_name[name].channels


@pytest.mark.parametrize("preset, speedup", [("uniform", 2.0), ("vgg-paper", 4.0)])
def test_flop_model_equals_counted_flops_of_the_shrunk_model(vgg, preset, speedup):
    model, graph, flop_model = vgg
    widths = allocate(flop_model, units_of(graph.prunable()), speedup, PRESETS[preset])
    assert count_flops(shrink(model, graph, widths), SHAPE) == pytest.approx(flop_model.flops(widths), rel=1e-9)


@pytest.mark.parametrize("speedup", [2.0, 4.0])
def test_uniform_keeps_the_same_fraction_everywhere(vgg, speedup):
    _, graph, flop_model = vgg
    widths = allocate(flop_model, units_of(graph.prunable()), speedup, PRESETS["uniform"])
    assert set(widths) == {g.name for g in graph.prunable()}
    fractions = [widths[g.name] / g.channels for g in graph.prunable()]
    assert max(fractions) - min(fractions) <= 1.0 / 32 + 1e-9  # rounding of the narrowest group


@pytest.mark.parametrize("speedup", [2.0, 4.0])
def test_vgg_paper_ratio_and_conv5_whole(vgg, speedup):
    _, graph, flop_model = vgg
    widths = allocate(flop_model, units_of(graph.prunable()), speedup, PRESETS["vgg-paper"])
    by_reader = {g.readers[0].name: g for g in graph.prunable()}
    for reader, g in by_reader.items():
        if "conv5_" in reader or reader.startswith("classifier"):
            assert g.name not in widths or widths[g.name] == g.channels, reader
    early = [widths[g.name] / g.channels for r, g in by_reader.items() if any(f"conv{s}_" in r for s in (1, 2, 3))]
    stage4 = [widths[g.name] / g.channels for r, g in by_reader.items() if "conv4_" in r]
    assert len(early) == 6 and len(stage4) == 3
    alpha = sum(early) / len(early)
    for f in stage4:
        assert f == pytest.approx(min(1.0, 1.5 * alpha), abs=0.03)


def test_allocation_rejects_impossible_targets(vgg):
    _, graph, flop_model = vgg
    with pytest.raises(ChanpruneError):
        allocate(flop_model, units_of(graph.prunable()), 0.5)
    # one channel in every group gives about 3089x: 1000x is reachable (with 1..7 channels per layer),
    # 5000x is not
    one = flop_model.total / flop_model.flops({g.name: 1 for g in graph.prunable()})
    assert 3000 < one < 3200
    with pytest.raises(ChanpruneError, match="out of reach"):
        allocate(flop_model, units_of(graph.prunable()), 5000.0)
    with pytest.raises(ChanpruneError):  # conv5_x and the classifier alone cannot give 3x
        allocate(flop_model, units_of([g for g in graph.prunable() if "conv5" in g.readers[0].name]), 3.0)
    assert allocate(flop_model, units_of(graph.prunable()), 1.0) == {g.name: g.channels for g in graph.prunable()}


def units(graph):
    return [Unit(g) for g in graph.prunable()]


def test_check_widths_validates_names_and_values(vgg):
    _, graph, _ = vgg
    # keyed by the reader (conv1_2 keeps 16 input channels), returned by the group (written by conv1_1)
    assert check_widths({"features.conv1_2.conv": 16}, graph, units(graph)) == {"features.conv1_1.conv": 16}
    for unknown in ("features.conv9_9.conv", "features.conv1_1.conv"):  # conv1_1 reads the image
        with pytest.raises(ChanpruneError, match="unknown layer"):
            check_widths({unknown: 3}, graph, units(graph))
    for bad in (0, 33, 2.5, "8", None):
        with pytest.raises(ChanpruneError):
            check_widths({"features.conv1_2.conv": bad}, graph, units(graph))


def test_widths_keyed_by_a_reader_set_its_input_channels():
    model = make_tiny(0)
    images = random_images(100)
    pruned, report = prune(model, images, None, widths={"conv3": 7}, samples_per_image=4, progress=False)
    assert pruned.conv3.in_channels == 7
    assert pruned.conv3.out_channels == 16


def test_widths_for_the_last_layer_prune_its_inputs():
    model = make_tiny(0)
    images = random_images(100)
    pruned, _ = prune(model, images, None, widths={"fc2": 10}, samples_per_image=4, progress=False)
    assert pruned.fc2.in_features == 10 and pruned.fc1.out_features == 10


@pytest.mark.parametrize("round_to", [8, 16])
@pytest.mark.parametrize("speedup", [2.0, 3.0, 4.0, 5.0])
def test_round_to_keeps_multiples_and_still_meets_the_target(vgg, round_to, speedup):
    _, graph, flop_model = vgg
    widths = allocate(flop_model, units_of(graph.prunable()), speedup, round_to=round_to)
    assert abs(flop_model.total / flop_model.flops(widths) / speedup - 1) <= 0.02
    by_name = {g.name: g for g in graph.groups}
    for name, w in widths.items():
        assert w % round_to == 0 or w == by_name[name].channels
    plain = allocate(flop_model, units_of(graph.prunable()), speedup)
    if speedup == 2.0:  # uniform 2x keeps 1/sqrt(2) of 32, 64, ...: widths no block size divides
        assert any(w % 8 for w in plain.values())


def test_round_to_is_validated_and_can_make_a_target_unreachable(vgg):
    _, graph, flop_model = vgg
    with pytest.raises(ChanpruneError, match="round_to"):
        allocate(flop_model, units_of(graph.prunable()), 2.0, round_to=0)
    with pytest.raises(ChanpruneError, match="--round-to"):
        allocate(flop_model, units_of(graph.prunable()), 1000.0, round_to=32)


@pytest.mark.parametrize("subset, round_to", [((0,), 1), ((1,), 4), ((0, 1), 1), ((1, 3), 1), ((1, 3), 4),
                                              ((0, 1, 2, 3), 4)])
def test_small_model_meets_every_reachable_target_and_names_the_closest_otherwise(subset, round_to):
    """TinyCNN's groups have 8-24 channels, so one channel (or block) is a large share of the FLOPs
    and no common fraction meets many targets. Checked against every width choice: allocate()
    meets a target whenever some widths do, keeps multiples of round_to, and otherwise names the
    truly closest speed-up."""
    model = make_tiny(0)
    shape = (1, *IMAGE_SHAPE)
    graph = build_graph(model, torch.zeros(shape))
    total, per_layer = flop_breakdown(model, shape)
    flop_model = FlopModel(graph, total, per_layer)
    groups = [graph.prunable()[i] for i in subset]
    lattices = [sorted({*range(round_to, g.channels + 1, round_to), g.channels}) for g in groups]
    reachable = {total / flop_model.flops(dict(zip([g.name for g in groups], w)))
                 for w in itertools.product(*lattices)}
    outcomes = set()
    for speedup in (1.05 + 0.1 * k for k in range(30)):
        closest = min(reachable, key=lambda r: abs(r / speedup - 1))
        if max(reachable) < speedup / (1 + TOLERANCE):
            with pytest.raises(ChanpruneError, match="out of reach"):
                allocate(flop_model, units_of(groups), speedup, round_to=round_to)
            outcomes.add("out of reach")
        elif abs(closest / speedup - 1) <= TOLERANCE:
            widths = allocate(flop_model, units_of(groups), speedup, round_to=round_to)
            assert abs(total / flop_model.flops(widths) / speedup - 1) <= TOLERANCE, speedup
            assert all(widths[g.name] in lattice for g, lattice in zip(groups, lattices)), (speedup, widths)
            outcomes.add("met")
        else:
            with pytest.raises(ChanpruneError, match=re.escape(f"(closest {closest:.3f}x)")):
                allocate(flop_model, units_of(groups), speedup, round_to=round_to)
            outcomes.add("refused")
    assert {"met", "refused"} <= outcomes


@pytest.mark.parametrize("allocator", ["uniform", "global"])
def test_round_to_auto_rounds_only_units_of_64_channels_or_more(vgg, allocator):
    from chanprune.allocators import ALLOCATIONS
    from chanprune.global_allocation import ErrorCurve

    model, graph, flop_model = vgg
    found = units(graph)
    curves = {u.name: ErrorCurve((1, u.channels), (float(u.channels), 0.0)) for u in found}
    widths = ALLOCATIONS[allocator].decide(flop_model, found, 3.0, "auto", lambda narrowest: curves)
    assert abs(flop_model.total / flop_model.flops(widths) / 3.0 - 1) <= TOLERANCE
    wide = [u for u in found if u.channels >= 64]
    assert wide and all(widths[u.name] % 8 == 0 or widths[u.name] == u.channels for u in wide)
    narrow = [u for u in found if u.channels < 64]
    assert any(widths[u.name] % 8 for u in narrow)  # any width where a block would be a large share


class Wide(torch.nn.Module):
    """Two 64-channel convs: --round-to auto rounds both to blocks of 8."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 64, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(64, 64, 3, padding=1)
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


def test_auto_rounding_gives_way_where_its_blocks_cannot_reach_the_target():
    """At 60x both convs must keep fewer than 8 channels: "auto" (chanprune's choice of blocks)
    then prunes without rounding and says so; blocks the user asked for are refused instead."""
    torch.manual_seed(0)
    model, x = Wide().eval(), torch.randn(40, 3, 8, 8)
    with pytest.warns(UserWarning, match="--round-to auto cannot reach 60x on this model"):
        pruned, report = prune(model, x, 60.0, round_to="auto", allocation="uniform", progress=False)
    assert abs(report.speedup_achieved / 60 - 1) <= 0.02 and pruned.conv1.out_channels < 8
    with pytest.raises(UnreachableSpeedup, match="out of reach: the most this model can reach is .* with --round-to 8"):
        prune(model, x, 60.0, round_to=8, allocation="uniform", progress=False)
