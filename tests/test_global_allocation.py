"""allocation="global": error curves from the moments, the greedy width descent, and the whole run."""

from __future__ import annotations

import pytest
import torch

from chanprune.allocation import TOLERANCE, FlopModel, Unit
from chanprune.allocators import ALLOCATIONS
from chanprune.errors import ChanpruneError
from chanprune.flops import flop_breakdown
from chanprune.global_allocation import ErrorCurve, allocate_global
from chanprune.graph import build_graph
from chanprune.models import create_model
from chanprune.pruner import prune
from chanprune.solvers import backward_elimination, elimination_path

from test_coverage_gaps import integer_problem, lstsq_sse, moments_of

SHAPE = (1, 1, 32, 32)


@pytest.mark.parametrize("seed,c,k", [(0, 6, 1), (1, 6, 4), (2, 12, 2)])
def test_elimination_path_gives_the_exact_error_of_every_width_it_passes(seed, c, k):
    x, y = integer_problem(seed, c, k)
    counts, errors = elimination_path([(moments_of(x, y), 1.0)], k, 1, ridge=0.0)
    assert counts[0] == c and counts[-1] == 1 and counts == sorted(counts, reverse=True)
    for n, error in zip(counts, errors):
        kept = backward_elimination([(moments_of(x, y), 1.0)], k, n, ridge=0.0).tolist()
        assert error == pytest.approx(lstsq_sse(x, y, kept, k), rel=1e-6, abs=1e-6), (n, kept)
    assert all(b >= a - 1e-6 for a, b in zip(errors, errors[1:]))  # fewer channels never fit better


@pytest.mark.parametrize("seed,k", [(3, 1), (4, 3)])
def test_elimination_dropping_several_channels_per_step_matches_refitting(seed, k):
    """Several channels leave per step (each step swaps them behind the kept blocks and downdates
    in place): every step drops the channels whose lone removal costs least, summed over two
    readers with their weights, and reports the exact refitted error of what it keeps."""
    c, weights = 14, (1.0, 0.25)
    readers = [integer_problem(seed + 10 * i, c, k) for i in range(2)]
    problems = [(moments_of(x, y), s) for (x, y), s in zip(readers, weights)]

    def sse(kept):
        return sum(s * lstsq_sse(x, y, kept, k) for (x, y), s in zip(readers, weights))

    steps = list(zip(*elimination_path(problems, k, 3, ridge=0.0, step_fraction=0.3)))
    assert [n for n, _ in steps] == [14, 10, 7, 5, 4, 3]  # int(0.3 * alive) channels per step, at least 1
    alive = list(range(c))
    for n, error in steps:
        assert error == pytest.approx(sse(alive), rel=1e-6), n
        rises = {j: sse([a for a in alive if a != j]) for j in alive}
        chosen = backward_elimination(problems, k, n, ridge=0.0, step_fraction=0.3).tolist()
        assert chosen == alive, n
        if len(alive) > 3:
            n_drop = min(len(alive) - 3, max(1, int(0.3 * len(alive))))
            alive = sorted(sorted(alive, key=rises.get)[n_drop:])

def test_error_curve_interpolates_and_adds():
    curve = ErrorCurve((2, 4, 8), (3.0, 1.0, 0.0))
    assert curve.at(4) == 1.0 and curve.at(3) == 2.0 and curve.at(6) == 0.5
    assert curve.at(1) == 3.0 and curve.at(9) == 0.0  # clamped outside the measured range
    total = curve + ErrorCurve((4, 6), (2.0, 1.0))
    assert total.widths == (2, 4, 6, 8) and total.at(6) == 0.5 + 1.0 and total.at(2) == 3.0 + 2.0
    assert curve.scaled(2.0).errors == (6.0, 2.0, 0.0)


@pytest.fixture(scope="module")
def vgg():
    model = create_model("vgg16-mnist", pretrained=False)
    graph = build_graph(model, torch.zeros(SHAPE))
    total, per_layer = flop_breakdown(model, SHAPE)
    return graph, FlopModel(graph, total, per_layer), [Unit(g) for g in graph.prunable()]


def linear_curve(channels: int, slope: float) -> ErrorCurve:
    """Error growing by ``slope`` per channel removed."""
    return ErrorCurve(tuple(range(1, channels + 1)), tuple(slope * (channels - w) for w in range(1, channels + 1)))


@pytest.mark.parametrize("speedup", [2.0, 4.0])
@pytest.mark.parametrize("round_to", [1, 8])
def test_global_widths_meet_the_target_and_spare_the_costly_units(vgg, speedup, round_to):
    graph, flop_model, units = vgg
    costly = units[3].name
    curves = {u.name: linear_curve(u.channels, 100.0 if u.name == costly else 1.0) for u in units}
    widths = allocate_global(flop_model, units, speedup, round_to, lambda narrowest: curves)
    assert abs(flop_model.total / flop_model.flops(widths) / speedup - 1) <= TOLERANCE
    assert widths[costly] == units[3].channels  # 100x the error per channel: never the cheapest step
    assert all(w % round_to == 0 or w == u.channels for u in units for w in [widths[u.name]])


def test_free_channels_go_first(vgg):
    """Channels whose removal costs nothing (a flat curve) are all taken before any costly one."""
    graph, flop_model, units = vgg
    free = units[5]
    curves = {u.name: linear_curve(u.channels, 0.0 if u is free else 1.0) for u in units}
    for speedup in (1.1, 1.3):
        widths = allocate_global(flop_model, units, speedup, 1, lambda narrowest: curves)
        others_whole = all(widths[u.name] == u.channels for u in units if u is not free)
        assert widths[free.name] == 1 or others_whole, speedup
        assert widths[free.name] < free.channels


def test_unreachable_target_is_refused_before_any_measurement(vgg):
    graph, flop_model, units = vgg

    def measure(narrowest):
        raise AssertionError("curves measured for an impossible target")

    with pytest.raises(ChanpruneError, match="out of reach"):
        allocate_global(flop_model, units, 5000.0, 1, measure)


def test_global_is_registered_for_the_config_and_the_command_line():
    from click.testing import CliRunner

    from chanprune.cli import main

    assert "global" in ALLOCATIONS
    out = CliRunner().invoke(main, ["prune", "--help"]).output
    assert "global" in out


def test_prune_with_global_widths(tiny_model, tiny_images):
    """A whole run: the target met, widths differ between layers, and the caller's model unchanged."""
    pruned, report = prune(tiny_model, tiny_images, 2.0, "greedy", allocation="global", global_weight="energy",
                           progress=False)
    assert abs(report.speedup_achieved / 2.0 - 1) <= TOLERANCE
    fractions = {round(layer.in_channels_after / layer.in_channels_before, 3) for layer in report.layers
                 if layer.in_channels_after < layer.in_channels_before}
    assert len(fractions) > 1
    assert pruned(tiny_images[:2]).shape == tiny_model(tiny_images[:2]).shape


def test_sensitivity_weighting_meets_the_target(tiny_model, tiny_images):
    _, sensitivity = prune(tiny_model, tiny_images, 2.0, "greedy", allocation="global",
                           global_weight="sensitivity", progress=False)
    assert abs(sensitivity.speedup_achieved / 2.0 - 1) <= TOLERANCE
    assert sensitivity.config["global_weight"] == "sensitivity"


def test_recipes_choose_the_global_weight_unless_the_caller_does():
    from chanprune.config import PruneConfig
    from chanprune.recipes import RECIPES

    assert PruneConfig(recipe="default").global_weight == RECIPES["default"].global_weight
    assert PruneConfig(recipe="paper", global_weight="sensitivity").global_weight == "sensitivity"
