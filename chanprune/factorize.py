"""3C: channel pruning combined with spatial and channel factorization (He et al. 2017, Table 2).

A reconstructed conv of kernel kh×kw, c inputs and n outputs is replaced by a chain of thinner
convs with the same receptive field, fitted to the same targets from the same second moments:

* spatial factorization (Jaderberg et al. 2014): a kh×1 conv with d₁ outputs, then a 1×kw conv.
  The vertical filters come from a rank-d₁ SVD of the kernel (rows (c, i), columns (n, j)); the
  horizontal layer is then refitted by least squares. Its inputs over a 1×kw window are a linear
  map A of the original kh×kw patch (Z = X Aᵀ), so its moments are A G Aᵀ and A B: no new pass.
* channel factorization (Zhang et al. 2016): a conv with d₂ outputs, then a 1×1 conv. The d₂
  directions are the leading eigenvectors of the covariance of the layer's responses W G Wᵀ,
  and the 1×1 layer is refitted by least squares to the original model's responses (the
  asymmetric step: it makes up for the error accumulated below as well).
* both (3C on one layer): kh×1 (d₁), 1×kw (d₂), 1×1 (n).

Ranks: each technique (channel pruning counts as one) takes an equal share of the speed-up in
FLOPs, S^(1/(1+m)); channel pruning is allocated first, then every factorized layer keeps the
same fraction of its pruned FLOPs, found by bisection so that the model meets S.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from .allocation import TOLERANCE, FlopModel, Unit
from .errors import ChanpruneError
from .solvers import ridged_cholesky
from .stats import Moments

FACTORIZATIONS = ("spatial", "channel")


@dataclass(frozen=True)
class Ranks:
    """Ranks of one layer's factorization: d₁ of the spatial step, d₂ of the channel step (None: not applied)."""

    spatial: int | None = None
    channel: int | None = None


def applicable(kinds: tuple[str, ...], kernel: tuple[int, int], stride: tuple[int, int]) -> tuple[str, ...]:
    """The factorizations of ``kinds`` that suit a conv: spatial needs a kh×kw kernel with both
    sides above 1 and stride 1; channel suits every dense conv."""
    return tuple(k for k in kinds if k == "channel" or (min(kernel) > 1 and tuple(stride) == (1, 1)))


def layer_cost(c: int, n: int, kernel: tuple[int, int], ranks: Ranks) -> float:
    """Multiply-adds per output position of the factorized chain (c·n·kh·kw unfactorized)."""
    kh, kw = kernel
    if ranks.spatial is not None and ranks.channel is not None:
        return ranks.spatial * c * kh + ranks.channel * ranks.spatial * kw + n * ranks.channel
    if ranks.spatial is not None:
        return ranks.spatial * (c * kh + n * kw)
    if ranks.channel is not None:
        return ranks.channel * (c * kh * kw + n)
    return c * n * kh * kw


def channel_speedup(speedup: float, kinds: tuple[str, ...], channel_pruning: bool = True) -> float:
    """The share of ``speedup`` channel pruning takes when ``kinds`` factorizations join it (1:
    none, when factorization alone makes the speed-up)."""
    return speedup ** (1 / (1 + len(kinds))) if channel_pruning else 1.0


def plan_ranks(model: nn.Module, flop_model: FlopModel, units: list[Unit], widths: dict[str, int],
               kinds: tuple[str, ...], speedup: float) -> dict[str, Ranks]:
    """Ranks of every factorizable reader of ``units`` (dense convs reading one group) such that,
    at the channel widths ``widths``, the model's FLOPs meet ``speedup`` within the tolerance:
    every factorized layer keeps the same fraction of its pruned FLOPs (found by bisection)."""
    layers = {}  # reader -> (c', n', kernel, applicable kinds, pruned FLOPs)
    for unit in units:
        for r in unit.readers:
            conv = model.get_submodule(r.name)
            if unit.writer is not None or r.kind != "conv" or not isinstance(conv, nn.Conv2d) or conv.groups != 1 \
                    or r.pads is not None \
                    or len(flop_model.graph.layouts[r.name]) != 1 or r.name in flop_model.graph.depthwise:
                continue
            frac_in, frac_out = flop_model.fractions(widths, r.name)
            c, n = max(1, round(conv.in_channels * frac_in)), max(1, round(conv.out_channels * frac_out))
            usable = applicable(kinds, tuple(conv.kernel_size), tuple(conv.stride))
            if usable:
                layers[r.name] = (c, n, tuple(conv.kernel_size), usable,
                                  flop_model.layer_flops(widths, [r.name])[r.name])
    target = flop_model.total / speedup
    pruned = flop_model.flops(widths)

    def total_of(ranks: dict[str, Ranks]) -> float:
        total = pruned
        for name, r in ranks.items():
            c, n, kernel, _, flops = layers[name]
            total -= flops * (1 - layer_cost(c, n, kernel, r) / (c * n * math.prod(kernel)))
        return total

    def plan(fraction: float) -> dict[str, Ranks]:
        ranks = {}
        for name, (c, n, kernel, usable, _) in layers.items():
            candidate = ranks_at(fraction, c, n, kernel, usable)
            if layer_cost(c, n, kernel, candidate) < c * n * math.prod(kernel):  # factorizing saves FLOPs here
                ranks[name] = candidate
        return ranks

    if total_of(plan(1.0)) <= target * (1 + TOLERANCE):
        return {}
    low, high, best = 0.0, 1.0, plan(0.0)
    for _ in range(50):
        ranks = plan(0.5 * (low + high))
        if abs(total_of(ranks) / target - 1) < abs(total_of(best) / target - 1):
            best = ranks
        low, high = (low, 0.5 * (low + high)) if total_of(ranks) > target else (0.5 * (low + high), high)
    best = _nudged(best, total_of, target)
    total = total_of(best)
    if abs(total / target - 1) > TOLERANCE:
        raise ChanpruneError(f"factorization cannot bring this model to {speedup:g}x within {TOLERANCE:.0%} "
                             f"(reached {flop_model.total / total:.2f}x); ask for a smaller speed-up")
    return best


def _nudged(ranks: dict[str, Ranks], total_of, target: float) -> dict[str, Ranks]:
    """Whole ranks are coarse in small layers: move single ranks by one while that brings the
    FLOPs closer to ``target``."""
    while True:
        gap = abs(total_of(ranks) - target)
        options = []
        for name, r in ranks.items():
            for field in ("spatial", "channel"):
                value = getattr(r, field)
                for step in (-1, 1):
                    if value is not None and value + step >= 1:
                        options.append({**ranks, name: replace(r, **{field: value + step})})
        better = min(options, key=lambda o: abs(total_of(o) - target), default=None)
        if better is None or abs(total_of(better) - target) >= gap:
            return ranks
        ranks = better


def ranks_at(fraction: float, c: int, n: int, kernel: tuple[int, int], kinds: tuple[str, ...]) -> Ranks:
    """The ranks whose chain costs about ``fraction`` of the unfactorized conv (at least 1 each;
    at most full rank, where factorizing saves nothing)."""
    kh, kw = kernel
    budget = fraction * c * n * kh * kw
    if kinds == ("spatial",):
        return Ranks(spatial=_clamp(budget / (c * kh + n * kw), min(c * kh, n * kw)))
    if kinds == ("channel",):
        return Ranks(channel=_clamp(budget / (c * kh * kw + n), n))
    # both, with d₁ = d₂ = d: d·c·kh + d²·kw + n·d = budget
    b = c * kh + n
    d = (-b + math.sqrt(b * b + 4 * kw * budget)) / (2 * kw)
    return Ranks(spatial=_clamp(d, min(c * kh, n * kw)), channel=_clamp(d, n))


def _clamp(value: float, most: int) -> int:
    return max(1, min(most, round(value)))


def channel_factors(weight: torch.Tensor, bias: torch.Tensor, moments: Moments, rank: int,
                    ridge: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Channel factorization of a layer ``weight`` (n, D) on inputs with ``moments`` (D features):
    (first (rank, D), second (n, rank), bias (n,)), the second refitted to the moments' targets."""
    xtx, xty, _ = moments.centred()
    responses = weight @ xtx @ weight.T
    directions = torch.linalg.eigh(0.5 * (responses + responses.T)).eigenvectors[:, -rank:]  # (n, rank)
    first = directions.T @ weight
    second = _refit(first, xtx, xty, ridge)
    return first, second, moments.mean_y - second @ (first @ moments.mean_x)


def spatial_factors(weight: torch.Tensor, moments: Moments, c: int, kernel: tuple[int, int], rank: int,
                    ridge: float) -> tuple[torch.Tensor, Moments]:
    """Spatial factorization of ``weight`` (n, c·kh·kw): (vertical filters (rank, c, kh), the
    moments of the horizontal layer's inputs (rank·kw features, channel-major), same targets)."""
    kh, kw = kernel
    n = weight.shape[0]
    matrix = weight.reshape(n, c, kh, kw).permute(1, 2, 0, 3).reshape(c * kh, n * kw)
    u, s, _ = torch.linalg.svd(matrix, full_matrices=False)
    vertical = (u[:, :rank] * s[:rank].sqrt()).T.reshape(rank, c, kh)
    return vertical, moments_through(moments, window_map(vertical, kw))


def window_map(vertical: torch.Tensor, kw: int) -> torch.Tensor:
    """A (rank·kw, c·kh·kw): the vertical convs' outputs over a 1×kw window as a linear map of
    the kh×kw input patch (both flattened channel-major, like conv weights)."""
    rank, c, kh = vertical.shape
    a = torch.zeros(rank, kw, c, kh, kw, dtype=vertical.dtype)
    for j in range(kw):
        a[:, j, :, :, j] = vertical
    return a.reshape(rank * kw, c * kh * kw)


def moments_through(moments: Moments, a: torch.Tensor) -> Moments:
    """The moments of Z = X Aᵀ against the same targets."""
    out = Moments(a.shape[0], moments.dim_y, device="meta")
    out.device = moments.device
    out.count, out.yty, out.yy = moments.count, moments.yty, moments.yy.clone()
    out.sum_x, out.sum_y = a @ moments.sum_x, moments.sum_y.clone()
    out.xtx, out.xty = a @ moments.xtx @ a.T, a @ moments.xty
    return out


def least_squares_on(moments: Moments, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (n, D) and bias of the least-squares fit on every feature of ``moments``."""
    xtx, xty, _ = moments.centred()
    weight = torch.cholesky_solve(xty, ridged_cholesky(xtx, ridge)).T.contiguous()
    return weight, moments.mean_y - weight @ moments.mean_x


def _refit(first: torch.Tensor, xtx: torch.Tensor, xty: torch.Tensor, ridge: float) -> torch.Tensor:
    """Least squares of a layer reading Z = X firstᵀ, from the centred moments of X."""
    gram = first @ xtx @ first.T
    return torch.cholesky_solve(first @ xty, ridged_cholesky(gram, ridge)).T.contiguous()
