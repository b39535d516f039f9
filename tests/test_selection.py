"""Every selection strategy keeps exactly c' distinct channels, for several c'."""

from __future__ import annotations

import warnings

import pytest
import torch

from chanprune.graph import build_graph
from chanprune.engine.run import reader_problem
from chanprune.pruner import prune
from chanprune.selection import STRATEGIES, ReaderProblem, SelectionProblem
from chanprune.engine.calibration import Sampling, unpruned_moments
from chanprune.engine.store import BatchStore

from conftest import make_tiny, prune_groups_directly, random_images


@pytest.fixture(scope="module")
def problems():
    """SelectionProblems of the tiny model's groups conv2 (conv reader, k=9) and conv3 (linear
    reader after flatten, k=4), from real moments."""
    model = make_tiny(0)
    images = random_images(120)
    graph = build_graph(model, images[:1])
    groups = [graph.group(name) for name in ("conv2", "conv3")]
    with BatchStore(2**30, torch.device("cpu")) as store:
        found = unpruned_moments(graph, images, 64, Sampling(6, 0, 10), [g.readers for g in groups], store, 3)
    out = {}
    for group, moments in zip(groups, found):
        name = group.name
        readers = [reader_problem(model, r, *moments[r.name]) for r in group.readers]
        out[name] = (group, readers, model.get_submodule(group.writer).weight.detach())
    return out


def make_problem(problems, name, n_keep, seed=0):
    group, readers, writer_weight = problems[name]
    return SelectionProblem(group, n_keep, readers, writer_weight, torch.Generator().manual_seed(seed))


def check_selection(keep: torch.Tensor, n_keep: int, channels: int) -> None:
    values = keep.tolist()
    assert len(values) == n_keep
    assert len(set(values)) == n_keep
    assert values == sorted(values)
    assert all(0 <= v < channels for v in values)
    assert keep.dtype == torch.long


@pytest.mark.parametrize("method", sorted(STRATEGIES))
@pytest.mark.parametrize("name", ["conv2", "conv3"])
def test_every_strategy_keeps_exactly_n(problems, method, name):
    channels = problems[name][0].channels
    for n_keep in (1, 2, 5, channels // 2, channels - 1, channels):
        keep = STRATEGIES[method](make_problem(problems, name, n_keep))
        check_selection(keep, n_keep, channels)


def test_baseline_strategies_choose_by_their_criteria(problems):
    # max_response: the largest sum |w| of the producing filters
    group, readers, writer_weight = problems["conv2"]
    scores = writer_weight.abs().reshape(group.channels, -1).sum(1)
    keep = STRATEGIES["max_response"](make_problem(problems, "conv2", 4))
    assert set(keep.tolist()) == set(scores.topk(4).indices.tolist())
    # input_l1: the largest sum |W_i| over the readers' input slices
    raw = readers[0].raw_weight.reshape(readers[0].raw_weight.shape[0], group.channels, -1)
    keep = STRATEGIES["input_l1"](make_problem(problems, "conv2", 4))
    assert set(keep.tolist()) == set(raw.abs().sum((0, 2)).topk(4).indices.tolist())
    assert STRATEGIES["first_k"](make_problem(problems, "conv2", 4)).tolist() == [0, 1, 2, 3]


def test_random_strategy_is_seeded(problems):
    a = STRATEGIES["random"](make_problem(problems, "conv3", 6, seed=1))
    b = STRATEGIES["random"](make_problem(problems, "conv3", 6, seed=1))
    assert torch.equal(a, b)


def test_lasso_beats_first_k_in_reconstruction_error(problems):
    # the LASSO choice followed by least squares fits the targets better than the naive choice
    from chanprune.solvers import least_squares, relative_error

    group, readers, _ = problems["conv2"]
    rp = readers[0]
    errors = {}
    for method in ("lasso", "first_k"):
        keep = STRATEGIES[method](make_problem(problems, "conv2", 4))
        w, b = least_squares(rp.fit, keep, rp.k)
        errors[method] = relative_error(rp.fit, keep, rp.k, w, b)
    assert errors["lasso"] < errors["first_k"]


def test_lasso_drops_channels_with_zero_weights_first(problems):
    group, readers, writer_weight = problems["conv2"]
    rp = readers[0]
    dead = [0, 3, 4, 9]
    w = rp.weight.reshape(rp.weight.shape[0], group.channels, rp.k).clone()
    w[:, dead] = 0
    zeroed = ReaderProblem(rp.reader, w.reshape(rp.weight.shape), rp.bias, rp.raw_weight, rp.fit, rp.heldout, rp.k)
    base = SelectionProblem(group, 8, [zeroed], writer_weight, torch.Generator().manual_seed(0))
    keep = STRATEGIES["lasso"](base)
    assert keep.tolist() == [c for c in range(12) if c not in dead]
    # fewer alive channels than asked for: every alive one is kept and the rest filled, still exactly n
    base.n_keep = 10
    keep = STRATEGIES["lasso"](base)
    check_selection(keep, 10, 12)
    assert set(keep.tolist()) >= {c for c in range(12) if c not in dead}
    # more alive channels than asked for: no dead channel is chosen
    base.n_keep = 5
    keep = STRATEGIES["lasso"](base)
    check_selection(keep, 5, 12)
    assert not set(keep.tolist()) & set(dead)


@pytest.mark.parametrize("method", sorted(STRATEGIES))
def test_pruning_keeps_exactly_the_requested_widths(method):
    model = make_tiny(1)
    images = random_images(100, seed=2)
    widths = {"conv1": 3, "conv2": 7, "conv3": 5, "fc1": 10}  # keyed by group (writer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # fewer than 3 samples per input for fc1
        pruned, errors, _, graph = prune_groups_directly(model, images, widths, method, samples_per_image=4)
    for group in graph.prunable():
        for r in group.readers:
            assert len(errors[r.name]["kept_indices"]) == widths[group.name]
    assert pruned.conv1.out_channels == 3 and pruned.bn1.num_features == 3
    assert pruned.conv2.in_channels == 3 and pruned.conv2.out_channels == 7 and pruned.bn2.num_features == 7
    assert pruned.conv3.in_channels == 7 and pruned.conv3.out_channels == 5
    assert pruned.fc1.in_features == 5 * 4 and pruned.fc1.out_features == 10
    assert pruned.fc2.in_features == 10 and pruned.fc2.out_features == 5
    assert pruned(images[:2]).shape == (2, 5)


@pytest.mark.parametrize("method", sorted(STRATEGIES))
def test_prune_api_report_kept_indices_match_shapes(method):
    model = make_tiny(1)
    images = random_images(100, seed=2)
    pruned, report = prune(model, images, 1.5, method, samples_per_image=4, progress=False)
    assert abs(report.speedup_achieved / 1.5 - 1) <= 0.02
    pruned_readers = [layer for layer in report.layers if layer.kept_indices is not None]
    assert {layer.name for layer in pruned_readers} == {"conv2", "conv3", "fc1", "fc2"}
    for layer in pruned_readers:
        size = 4 if layer.name == "fc1" else 1
        assert len(layer.kept_indices) * size == layer.in_channels_after < layer.in_channels_before
        assert len(set(layer.kept_indices)) == len(layer.kept_indices)


@pytest.mark.parametrize("method", sorted(STRATEGIES))
def test_every_strategy_keeps_exactly_n_with_fewer_samples_than_inputs(method):
    # the usual case on real networks (e.g. VGG conv4_x: 1629 inputs, ~100 samples in a quick run)
    model = make_tiny(2)
    images = random_images(12, seed=3)
    widths = {"conv2": 5, "conv3": 6}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruned, errors, _, _ = prune_groups_directly(model, images, widths, method, samples_per_image=2)
    assert len(errors["conv3"]["kept_indices"]) == 5
    assert len(errors["fc1"]["kept_indices"]) == 6
    assert pruned.conv3.in_channels == 5 and pruned.fc1.in_features == 24
    assert torch.isfinite(pruned(images)).all()


@pytest.mark.parametrize("rounds", [2, 3])
def test_multi_round_lasso_keeps_exactly_n(rounds):
    from dataclasses import fields

    from chanprune.config import PruneConfig

    if "lasso_rounds" not in {f.name for f in fields(PruneConfig)}:
        pytest.skip("this chanprune has no multi-round LASSO")
    model = make_tiny(0)
    images = random_images(120)
    widths = {"conv1": 3, "conv2": 5, "conv3": 9, "fc1": 7}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruned, errors, _, graph = prune_groups_directly(model, images, widths, "lasso", samples_per_image=4,
                                                         lasso_rounds=rounds)
    for group in graph.prunable():
        for r in group.readers:
            kept = errors[r.name]["kept_indices"]
            assert len(kept) == len(set(kept)) == widths[group.name]
            assert errors[r.name]["rel_error"] <= errors[r.name]["rel_error_before"] * (1 + 1e-6) + 1e-6
    assert pruned(images[:2]).shape == (2, 5)
