"""Channel selection strategies behind one interface: problem in, sorted kept indices out.

Every strategy is followed by the same least-squares reconstruction in the pruner, so the
strategies differ only in which channels they keep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .graph import ChannelGroup, Reader
from .solvers import lasso_problem, lasso_select
from .stats import Moments


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


Strategy = Callable[[SelectionProblem], torch.Tensor]


def _top(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    return scores.topk(n_keep).indices.sort().values


def select_lasso(problem: SelectionProblem) -> torch.Tensor:
    """He et al.: LASSO on β over channel contributions; readers' normalised (Q, q) are summed."""
    q_mat = q_vec = None
    weight_norm = torch.zeros(problem.group.channels, dtype=torch.float64)
    for rp in problem.readers:
        qm, qv = lasso_problem(rp.fit, rp.weight, rp.k)
        q_mat = qm if q_mat is None else q_mat + qm
        q_vec = qv if q_vec is None else q_vec + qv
        weight_norm += rp.weight.reshape(rp.weight.shape[0], -1, rp.k).abs().sum((0, 2))
    alive = torch.nonzero(weight_norm > 0).flatten()
    if len(alive) <= problem.n_keep:  # channels no reader uses go first
        dead = torch.nonzero(weight_norm == 0).flatten()
        return torch.cat([alive, dead[: problem.n_keep - len(alive)]]).sort().values
    return lasso_select(q_mat, q_vec, problem.n_keep, candidates=alive)


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
    "max_response": select_max_response,
    "input_l1": select_input_l1,
    "first_k": select_first_k,
    "random": select_random,
}
