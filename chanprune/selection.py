"""Channel selection strategies behind one interface: problem in, sorted kept indices out.

Every strategy is followed by the same least-squares reconstruction in the pruner, so the
strategies differ only in which channels they keep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .graph import ChannelGroup, Reader
from .solvers import (backward_elimination, lasso_problem, lasso_select, least_squares,
                      swap_search)
from .stats import Moments, block_indices


@dataclass
class ReaderProblem:
    """One reader of the group: its folded weights (n, c*k), original weights, moments and k."""

    reader: Reader
    weight: torch.Tensor
    bias: torch.Tensor
    raw_weight: torch.Tensor
    fit: Moments
    heldout: Moments
    k: int


@dataclass
class SelectionProblem:
    """Choose ``n_keep`` of the group's channels, given every reader and the writer's filters."""

    group: ChannelGroup
    n_keep: int
    readers: list[ReaderProblem]
    writer_weight: torch.Tensor
    generator: torch.Generator
    lasso_rounds: int = 1


Strategy = Callable[[SelectionProblem], torch.Tensor]


def _top(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    return scores.topk(n_keep).indices.sort().values


def select_lasso(problem: SelectionProblem) -> torch.Tensor:
    """He et al.: LASSO on β over channel contributions; readers' normalised (Q, q) are summed.

    With ``lasso_rounds`` R > 1 this is the paper's alternating form: the channel count falls
    geometrically over R LASSO steps, and after each step every reader's weights are refitted by
    least squares on the kept channels, so the next step sees weights that already compensate
    for the channels dropped so far.
    """
    weight_norm = sum(rp.weight.reshape(rp.weight.shape[0], -1, rp.k).abs().sum((0, 2)) for rp in problem.readers)
    keep = torch.nonzero(weight_norm > 0).flatten()
    if len(keep) <= problem.n_keep:  # channels no reader uses go first
        dead = torch.nonzero(weight_norm == 0).flatten()
        return torch.cat([keep, dead[: problem.n_keep - len(keep)]]).sort().values
    weights = [rp.weight[:, block_indices(keep, rp.k)] for rp in problem.readers]
    start, rounds = len(keep), max(1, problem.lasso_rounds)
    for step in range(1, rounds + 1):
        size = max(problem.n_keep, round(start * (problem.n_keep / start) ** (step / rounds)))
        q_mat = q_vec = None
        for rp, weight in zip(problem.readers, weights):
            qm, qv = lasso_problem(rp.fit.restrict(block_indices(keep, rp.k)), weight, rp.k)
            q_mat = qm if q_mat is None else q_mat + qm
            q_vec = qv if q_vec is None else q_vec + qv
        keep = keep[lasso_select(q_mat, q_vec, size)]
        if step < rounds:
            weights = [least_squares(rp.fit, keep, rp.k)[0] for rp in problem.readers]
    return keep


def _weighted_fits(problem: SelectionProblem) -> tuple[list[tuple[Moments, float]], int] | None:
    """Each reader's fitted moments weighted by 1/||Y||² and the readers' common features per
    channel, or None when readers disagree on it (the exact solvers then do not apply)."""
    ks = {rp.k for rp in problem.readers}
    if len(ks) > 1:
        return None
    return [(rp.fit, 1.0 / max(rp.fit.centred()[2], 1e-300)) for rp in problem.readers], ks.pop()


def select_greedy(problem: SelectionProblem) -> torch.Tensor:
    """Beyond the paper: backward elimination on the exact least-squares error of every reader."""
    fits = _weighted_fits(problem)
    if fits is None:  # readers disagree on features per channel: fall back to the paper's selection
        return select_lasso(problem)
    return backward_elimination(*fits, problem.n_keep)


def select_swap(problem: SelectionProblem) -> torch.Tensor:
    """Beyond the paper: greedy elimination, then exchanges of kept and dropped channels while the
    exact least-squares error of every reader (weighted by 1/||Y||²) falls (OSSCAR's local search)."""
    fits = _weighted_fits(problem)
    if fits is None:
        return select_lasso(problem)
    keep, _ = swap_search(*fits, backward_elimination(*fits, problem.n_keep))
    return keep


def select_max_response(problem: SelectionProblem) -> torch.Tensor:
    """Li et al. filter pruning: keep channels whose producing filters have the largest sum |w|."""
    scores = problem.writer_weight.abs().reshape(problem.group.channels, -1).sum(1)
    return _top(scores, problem.n_keep)


def select_input_l1(problem: SelectionProblem) -> torch.Tensor:
    """Keep channels with the largest sum |W_i| over the readers' input slices."""
    scores = sum(rp.raw_weight.reshape(rp.raw_weight.shape[0], -1, rp.k).abs().sum((0, 2))
                 for rp in problem.readers)
    return _top(scores, problem.n_keep)


def select_first_k(problem: SelectionProblem) -> torch.Tensor:
    """The paper's naive baseline: the first k channels."""
    return torch.arange(problem.n_keep)


def select_random(problem: SelectionProblem) -> torch.Tensor:
    """A random subset, seeded."""
    return torch.randperm(problem.group.channels, generator=problem.generator)[: problem.n_keep].sort().values


STRATEGIES: dict[str, Strategy] = {
    "lasso": select_lasso,
    "greedy": select_greedy,
    "swap": select_swap,
    "max_response": select_max_response,
    "input_l1": select_input_l1,
    "first_k": select_first_k,
    "random": select_random,
}
