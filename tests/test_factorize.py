"""3C: spatial and channel factorization of reconstructed convs, fitted from the moments, combined
with channel pruning at a FLOPs target."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from chanprune import ChanpruneError, prune
from chanprune.factorize import (channel_factors, channel_speedup, layer_cost, least_squares_on, ranks_at,
                                 spatial_factors, window_map)
from chanprune.flops import count_flops
from chanprune.layers import FactorizedConv2d
from chanprune.stats import Moments, conv_patches, sample_positions
from chanprune.surgery import PlanOp, apply_op, factorize_channel, factorize_spatial

from conftest import assert_round_trips, make_tiny, random_images

KINDS = [("spatial",), ("channel",), ("spatial", "channel")]


def moments_of(conv: nn.Conv2d, x: torch.Tensor, target: nn.Module) -> Moments:
    """Moments of ``conv``'s input patches at every position against ``target``'s outputs."""
    n, _, h, w = x.shape
    pos = sample_positions(torch.arange(n), h, w, h * w, key=0)
    patches = conv_patches(conv, x, pos).double()
    y = target(x).detach()[pos.image, :, pos.row, pos.col].double()
    m = Moments(patches.shape[1], y.shape[1])
    m.update(patches, y)
    return m


def test_the_window_map_is_what_the_vertical_convs_compute():
    vertical = torch.randn(4, 3, 3, dtype=torch.float64)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    pos = sample_positions(torch.arange(2), 7, 7, 49, key=0)
    patches = conv_patches(conv, x, pos)
    z = nn.functional.conv2d(x, vertical[..., None], padding=(1, 0))  # (2, 4, 7, 7), no horizontal padding
    padded = nn.functional.pad(z, (1, 1))
    windows = torch.stack([padded[pos.image, :, pos.row, pos.col + j] for j in range(3)], 2).reshape(len(pos.image), -1)
    torch.testing.assert_close(patches @ window_map(vertical, 3).T, windows)


def test_a_spatially_separable_kernel_is_reproduced_at_its_rank():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1).double()
    with torch.no_grad():  # every filter a sum of 2 separable (vertical x horizontal) parts
        v, h = torch.randn(2, 3, 3, dtype=torch.float64), torch.randn(5, 2, 3, dtype=torch.float64)
        conv.weight.copy_(torch.einsum("rci,nrj->ncij", v, h))
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    m = moments_of(conv, x, conv)
    weight = conv.weight.detach().reshape(5, -1)
    vertical, through = spatial_factors(weight, m, 3, (3, 3), 2, 1e-12)
    w, b = least_squares_on(through, 1e-12)
    chain = factorize_spatial(copy.deepcopy(conv), 2)
    with torch.no_grad():
        chain[0].weight.copy_(vertical[..., None])
        chain[1].weight.copy_(w.reshape(5, 2, 1, 3))
        chain[1].bias.copy_(b)
    assert isinstance(chain, FactorizedConv2d) and (chain.in_channels, chain.out_channels) == (3, 5)
    torch.testing.assert_close(chain(x), conv(x), rtol=1e-4, atol=1e-4)  # moments summed in float32


def test_a_low_rank_response_is_reproduced_by_channel_factorization():
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    with torch.no_grad():  # outputs live in a 2-dimensional subspace
        conv.weight.copy_((torch.randn(6, 2, dtype=torch.float64) @ torch.randn(2, 36, dtype=torch.float64))
                          .reshape(6, 4, 3, 3))
    x = torch.randn(6, 4, 8, 8, dtype=torch.float64)
    m = moments_of(conv, x, conv)
    first, second, bias = channel_factors(conv.weight.detach().reshape(6, -1), conv.bias.detach(), m, 2, 1e-12)
    chain = factorize_channel(copy.deepcopy(conv), 2)
    with torch.no_grad():
        chain[0].weight.copy_(first.reshape(2, 4, 3, 3))
        chain[1].weight.copy_(second[..., None, None])
        chain[1].bias.copy_(bias)
    assert chain[0].bias is None
    torch.testing.assert_close(chain(x), conv(x), rtol=1e-4, atol=1e-4)  # moments summed in float32


def test_ranks_cost_the_fraction_asked_for():
    for kinds in KINDS:
        for fraction in (0.2, 0.5):
            ranks = ranks_at(fraction, 64, 64, (3, 3), kinds)
            assert layer_cost(64, 64, (3, 3), ranks) == pytest.approx(fraction * 64 * 64 * 9, rel=0.1)
    assert channel_speedup(8.0, ("spatial", "channel")) == pytest.approx(2.0)


@pytest.mark.parametrize("kinds", KINDS)
def test_factorized_pruning_meets_the_target_and_round_trips(tmp_path, kinds):
    model, x = make_tiny(), random_images(64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruned, report = prune(model, x, 2.0, factorize=kinds, allocation="uniform", round_to=1, progress=False)
        plain, _ = prune(model, x, channel_speedup(2.0, kinds), allocation="uniform", round_to=1, progress=False)
    assert abs(report.speedup_achieved / 2.0 - 1) <= 0.02
    assert report.flops_after == count_flops(pruned, (1, 3, 8, 8))
    chains = [m for m in pruned.modules() if isinstance(m, FactorizedConv2d)]
    assert chains and all(len(c) == 1 + len(kinds) for c in chains)
    assert any("factorized" in layer.kind for layer in report.layers)
    with torch.no_grad():
        assert (pruned(x) - model(x)).norm() < 2 * (plain(x) - model(x)).norm() + 0.5 * model(x).norm()
    assert_round_trips(pruned, make_tiny(), x, tmp_path)


def test_factorization_needs_reconstruction_and_a_known_kind():
    model, x = make_tiny(), random_images(8)
    with pytest.raises(ChanpruneError, match="at most once"):
        prune(model, x, 2.0, factorize=("svd",), progress=False)
    with pytest.raises(ChanpruneError, match="reconstruct=True"):
        prune(model, x, 2.0, factorize=("channel",), reconstruct=False, progress=False)


def test_a_plan_that_factorizes_wrongly_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 2), nn.Conv2d(3, 4, 1))
    for op, message in [(PlanOp("factorize_spatial", "0", (0,)), "rank 0"),
                        (PlanOp("factorize_spatial", "0", (10**6,)), "does not match its architecture"),
                        (PlanOp("factorize_channel", "0", (5,)), "rank 5"),
                        (PlanOp("factorize_channel", "1", (2,)), "Linear"),
                        (PlanOp("factorize_spatial", "2", (1,)), "spatially"),
                        (PlanOp("factorize_channel", "0", (1, 2)), "ranks")]:
        with pytest.raises(ChanpruneError, match=message):
            apply_op(model, op)


def test_factorization_alone_keeps_every_channel():
    model, x = make_tiny(), random_images(64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruned, report = prune(model, x, 1.5, factorize=("channel",), channel_pruning=False, round_to=1,
                               progress=False)
    assert abs(report.speedup_achieved / 1.5 - 1) <= 0.02
    assert pruned.conv2.in_channels == 8 and pruned.conv3.in_channels == 12 and pruned.conv3.out_channels == 16
    assert isinstance(pruned.conv2, FactorizedConv2d) and pruned.conv2[0].out_channels < 12
    with pytest.raises(ChanpruneError, match="nothing to do"):
        prune(model, x, 1.5, channel_pruning=False, progress=False)
