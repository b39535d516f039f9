"""Solvers on second moments: the channel LASSO, least squares, and errors without the data.

All functions take and return float64 tensors and never see a sample matrix. Shapes:
``xtx`` (c*k, c*k), ``xty`` (c*k, n), ``weight`` (n, c*k) flattened channel-major, so input
channel i owns columns i*k .. i*k+k-1.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import lars_path_gram

from .stats import Moments, block_indices


def channel_gram(xtx: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
    """Q_ij = <Z_i, Z_j> with Z_i = X_i W_i^T: block sums of xtx * (W^T W) over k x k blocks."""
    c = xtx.shape[0] // k
    return (xtx * (weight.T @ weight)).reshape(c, k, c, k).sum((1, 3))


def channel_corr(xty: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
    """q_i = <Z_i, Y>: block sums of the row sums of xty * W^T."""
    return (xty * weight.T).sum(1).reshape(-1, k).sum(1)


def lasso_problem(moments: Moments, weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q̂, q̂) of the channel LASSO on centred moments, with every W_i scaled to unit norm and the
    whole problem divided by the centred ||Y||^2 so that problems of several readers can be summed."""
    xtx, xty, yty = moments.centred()
    norms = weight.reshape(weight.shape[0], -1, k).square().sum((0, 2)).sqrt()
    scale = torch.where(norms > 0, 1.0 / norms.clamp_min(1e-300), torch.zeros_like(norms))
    q_mat = channel_gram(xtx, weight, k) * torch.outer(scale, scale)
    q_vec = channel_corr(xty, weight, k) * scale
    denom = max(yty, 1e-300)
    return q_mat / denom, q_vec / denom


def lasso_select(q_mat: torch.Tensor, q_vec: torch.Tensor, n_keep: int,
                 candidates: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of exactly ``n_keep`` channels chosen by the LASSO path on the Gram form (Q, q).

    The path starts at the λ where every β is zero and lowers λ; channels enter (and sometimes
    leave) one at a time, so the first knot with ``n_keep`` active channels gives the answer
    without bisecting λ. ``candidates`` restricts the search (e.g. to channels with non-zero weights).
    """
    c = q_mat.shape[0]
    idx = torch.arange(c) if candidates is None else candidates
    if n_keep >= len(idx):
        return idx.sort().values
    gram = q_mat[idx[:, None], idx].numpy()
    xy = q_vec[idx].numpy()
    gram = gram + np.eye(len(idx)) * 1e-10 * max(np.trace(gram) / len(idx), 1e-300)
    # the path is the same however far it is followed: stop soon after n_keep channels can be
    # active (each knot adds or drops one), and go further only when drops held it back
    limit, max_iter = 8 * len(idx) + 50, n_keep + max(10, n_keep // 8)
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            _, _, coefs = lars_path_gram(Xy=xy, Gram=gram, n_samples=1, method="lasso", max_iter=max_iter)
        counts = (coefs != 0).sum(0)
        hits = np.flatnonzero(counts == n_keep)
        if len(hits) or max_iter >= limit or coefs.shape[1] <= max_iter:  # found, or the whole path was seen
            break
        max_iter = min(2 * max_iter, limit)
    if len(hits):
        chosen = np.flatnonzero(coefs[:, hits[0]])
    else:  # the path ended early (degenerate data): rank by |β| at the richest knot, then by |q|
        last = coefs[:, int(np.argmax(counts))]
        order = np.lexsort((-np.abs(xy), -np.abs(last)))
        chosen = order[:n_keep]
    return idx[torch.from_numpy(np.sort(chosen))]


def _every(cols: torch.Tensor, n: int) -> bool:
    """Whether ``cols`` is every index below ``n``, in order."""
    return len(cols) == n and bool((cols == torch.arange(n)).all())


def _rows(matrix: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``matrix[cols]``, without a copy when ``cols`` is every row in order."""
    return matrix if _every(cols, matrix.shape[0]) else matrix[cols]


def _block(matrix: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``matrix[cols][:, cols]`` in one gather, without a copy when ``cols`` is every row in order."""
    return matrix if _every(cols, matrix.shape[0]) else matrix[cols[:, None], cols]


def ridged_cholesky(a: torch.Tensor, ridge: float) -> torch.Tensor:
    """Cholesky factor of ``a + λI`` with λ = ridge * trace(a) / dim, raised until ``a`` is
    positive definite (few samples or dead inputs leave a singular or, by round-off, indefinite ``a``)."""
    dim = a.shape[0]
    lam = max(ridge * float(torch.trace(a)) / dim, 1e-12)
    for attempt in range(8):
        shifted = a.clone()
        shifted.diagonal().add_(lam * 100.0 ** attempt)
        chol, info = torch.linalg.cholesky_ex(shifted)
        if int(info) == 0:
            return chol
    raise FloatingPointError("the Gram matrix did not become positive definite; calibration data may be degenerate")


def least_squares(moments: Moments, keep: torch.Tensor, k: int,
                  ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (n, |keep|*k) and bias (n,) minimising ||Y - X_S W^T - b||^2.

    Solved on centred moments by Cholesky with a ridge of ``ridge * trace / dim`` (scaled to the
    data); the bias is not regularised and is ȳ - W x̄.
    """
    cols = block_indices(keep, k)
    xtx, xty, _ = moments.centred()
    a = _block(xtx, cols)
    rhs = _rows(xty, cols)
    w = torch.cholesky_solve(rhs, ridged_cholesky(a, ridge)).T.contiguous()
    b = moments.mean_y - w @ moments.mean_x[cols]
    return w, b


def heldout_least_squares(fit: Moments, heldout: Moments, keep: torch.Tensor, k: int, ridges: tuple[float, ...],
                          fallback: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """Least squares with the ridge (or the ``fallback`` weights: no reconstruction) that gives the
    lowest error on the held-out moments; returns (weight, bias, ridge or None for the fallback).

    Guards layers fitted on too few samples, where the smallest ridge overfits.
    """
    candidates = [(*least_squares(fit, keep, k, r), r) for r in ridges] + [(*fallback, None)]
    return min(candidates, key=lambda c: squared_error(heldout, keep, k, c[0], c[1]))


def squared_error(moments: Moments, keep: torch.Tensor, k: int, weight: torch.Tensor,
                  bias: torch.Tensor) -> float:
    """||Y - X_S W^T - b||^2 from the moments alone, clamped at zero against round-off."""
    if moments.count == 0:
        return float("nan")
    cols = block_indices(keep, k)
    xtx, xty, yty = moments.centred()
    fit = yty - 2.0 * float((weight * _rows(xty, cols).T).sum()) + float(((weight @ _block(xtx, cols)) * weight).sum())
    offset = moments.mean_y - weight @ moments.mean_x[cols] - bias
    return max(fit + moments.count * float(offset @ offset), 0.0)


def output_errors(moments: Moments, keep: torch.Tensor, k: int, weight: torch.Tensor,
                  bias: torch.Tensor) -> torch.Tensor:
    """||Y_j - Ŷ_j||^2 of every output j (the terms :func:`squared_error` adds up), clamped at zero."""
    cols = block_indices(keep, k)
    xtx, xty, _ = moments.centred()
    fit = moments.centred_yy() - 2.0 * (weight * _rows(xty, cols).T).sum(1) + ((weight @ _block(xtx, cols)) * weight).sum(1)
    offset = moments.mean_y - weight @ moments.mean_x[cols] - bias
    return (fit + moments.count * offset.square()).clamp_min(0.0)


def relative_error(moments: Moments, keep: torch.Tensor, k: int, weight: torch.Tensor,
                   bias: torch.Tensor) -> float:
    """||Y - Ŷ|| / ||Y|| from the moments."""
    if moments.count == 0 or moments.yty <= 0:
        return float("nan")
    return (squared_error(moments, keep, k, weight, bias) / moments.yty) ** 0.5


def _diagonal_blocks(h: torch.Tensor, k: int) -> torch.Tensor:
    """The c diagonal k x k blocks of a (c*k, c*k) matrix or view of one, as a (c, k, k) view."""
    rows, cols = h.stride()
    return h.as_strided((h.shape[0] // k, k, k), (k * (rows + cols), rows, cols))


def backward_elimination(problems: list[tuple[Moments, float]], k: int, n_keep: int, ridge: float = 1e-6,
                         step_fraction: float = 0.05) -> torch.Tensor:
    """Channels kept by greedy removal on the exact least-squares error (beyond the paper).

    With H = (X^T X)^-1 and the LS solution W = H X^T Y, removing channel block j raises the
    error by tr(W_j^T (H_jj)^-1 W_j) (the block form of Optimal Brain Surgeon). Each step removes
    the cheapest ``step_fraction`` of the remaining channels, then downdates H and W exactly.
    ``problems`` holds (moments, weight) per reader; costs are summed weighted by 1/||Y||^2.
    """
    alive = None
    for alive, _ in _eliminate(problems, k, n_keep, ridge, step_fraction):
        pass
    return alive


def elimination_path(problems: list[tuple[Moments, float]], k: int, n_min: int, ridge: float = 1e-6,
                     step_fraction: float = 0.05) -> tuple[list[int], list[float]]:
    """The error curve of :func:`backward_elimination` from all channels down to ``n_min``:
    (kept counts, descending; weighted least-squares error at each), in one pass.

    The error at each count is exact for the channels elimination keeps there (the full fit's
    error plus the exact increase of each joint removal), so the curve is what greedy selection
    would leave at that width on these moments.
    """
    counts, errors = [], []
    for alive, error in _eliminate(problems, k, n_min, ridge, step_fraction):
        counts.append(len(alive))
        errors.append(error)
    return counts, errors


def _eliminate(problems: list[tuple[Moments, float]], k: int, n_keep: int, ridge: float,
               step_fraction: float) -> Iterator[tuple[torch.Tensor, float]]:
    """(kept channels, weighted LS error) after each step of backward elimination, the full set first.

    H and W stay in their first buffers: each step swaps the dropped blocks behind the kept ones
    (O(dropped · d) copies), so the kept set is always the leading block ``[:m, :m]`` and the
    downdate runs in place on that view, with no gather of a (c·k)² matrix per step.
    """
    states, error = [], 0.0
    for moments, scale in problems:
        xtx, xty, yty = moments.centred()
        h = torch.cholesky_inverse(ridged_cholesky(xtx, ridge))
        w = h @ xty
        states.append((h, w, scale))
        error += scale * max(yty - float((w * xty).sum()), 0.0)
    order = torch.arange(states[0][0].shape[0] // k)  # the channel at each block position
    alive = len(order)  # the first ``alive`` positions are kept
    yield order.clone(), error
    while alive > n_keep:
        m = alive * k
        cost = torch.zeros(alive, dtype=torch.float64)
        for h, w, scale in states:
            wb = w[:m].reshape(alive, k, -1)
            cost += scale * (wb * torch.linalg.solve(_diagonal_blocks(h[:m, :m], k), wb)).sum((1, 2))
        n_drop = min(alive - n_keep, max(1, int(step_fraction * alive)))
        rest = alive - n_drop
        dropped = torch.zeros(alive, dtype=torch.bool)
        dropped[cost.topk(n_drop, largest=False).indices] = True
        front = torch.nonzero(dropped[:rest]).flatten()  # dropped, to move behind
        back = rest + torch.nonzero(~dropped[rest:]).flatten()  # kept, to move in front
        a, b = block_indices(front, k), block_indices(back, k)
        for h, w, _ in states:
            _swap_symmetric(h[:m, :m], a, b)
            _swap(w, a, b)
        order[front], order[back] = order[back].clone(), order[front].clone()
        r = rest * k
        for h, w, scale in states:
            h_rg = h[:r, r:m]
            chol = ridged_cholesky(h[r:m, r:m], 1e-12)
            w_gone = torch.cholesky_solve(w[r:m], chol)
            error += scale * float((w[r:m] * w_gone).sum())
            h[:r, :r].addmm_(h_rg, torch.cholesky_solve(h_rg.T, chol), alpha=-1)
            w[:r].addmm_(h_rg, w_gone, alpha=-1)
        alive = rest
        yield order[:alive].sort().values, error


def _swap(matrix: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """Exchange rows ``a`` and ``b`` of ``matrix`` (a view) in place."""
    matrix[a], matrix[b] = matrix[b], matrix[a]


def _swap_symmetric(matrix: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """Exchange rows and columns ``a`` and ``b`` of a symmetric ``matrix`` (a view) in place: the
    new rows are the old ones with the two column sets exchanged, and the new columns their
    transposes, so only rows are read (the strided columns are only written)."""
    rows_a, rows_b = matrix[a], matrix[b]
    for rows in (rows_a, rows_b):
        rows[:, a], rows[:, b] = rows[:, b], rows[:, a]
    matrix[a], matrix[b] = rows_b, rows_a
    matrix[:, a], matrix[:, b] = rows_b.T, rows_a.T


def swap_search(problems: list[tuple[Moments, float]], k: int, keep: torch.Tensor, ridge: float = 1e-6,
                max_swaps: int | None = None, candidates: int = 16) -> tuple[torch.Tensor, int]:
    """Improve a kept set by exchanging one kept and one dropped channel at a time while the
    weighted least-squares error falls (the local search of OSSCAR, Meng et al. 2024); returns
    the kept channels, sorted, and the number of exchanges made.

    For a dropped channel j, with H = (G_SS)⁻¹ and W = H B_S, its Schur complement
    S_j = G_jj - C_jᵀ H C_j and residual correlation r_j = B_j - C_jᵀ W give the exact error drop
    of adding it, tr(r_jᵀ S_j⁻¹ r_j), and the blocks of H and W of the grown set follow by a rank-k
    update, which gives the exact error rise of then removing each kept channel i (the block form
    of Optimal Brain Surgeon). Each step makes the best exchange among the ``candidates`` dropped
    channels with the largest drops (all of them when there are no more), so every exchange made
    lowers the error. ``max_swaps`` defaults to the number of kept channels.
    """
    channels = problems[0][0].dim_x // k
    kept = keep.sort().values
    limit = len(kept) if max_swaps is None else max_swaps
    swaps = 0
    while swaps < limit and len(kept) < channels:
        dropped = torch.from_numpy(np.setdiff1d(np.arange(channels), kept.numpy()))
        gains = torch.zeros(len(dropped), dtype=torch.float64)
        states = []
        for moments, scale in problems:
            state = _ExchangeState(moments, kept, k, ridge)
            gains += scale * state.addition_gains(dropped)
            states.append((state, scale))
        chosen = dropped[gains.topk(min(candidates, len(dropped))).indices]
        delta = torch.zeros(len(chosen), len(kept), dtype=torch.float64)
        for state, scale in states:
            delta += scale * state.exchange_deltas(chosen)
        best = int(delta.argmin())
        j, i = divmod(best, len(kept))
        total = sum(scale * state.error for state, scale in states)
        if float(delta.flatten()[best]) >= -1e-12 * max(total, 1e-300):
            break
        kept = torch.cat([kept[kept != kept[i]], chosen[j][None]]).sort().values
        swaps += 1
    return kept, swaps


class _ExchangeState:
    """Least squares of one reader on a kept set, for the exact effect of adding a dropped channel
    and of then removing a kept one."""

    def __init__(self, moments: Moments, kept: torch.Tensor, k: int, ridge: float):
        xtx, xty, yty = moments.centred()
        self.xtx, self.xty, self.k, self.kept = xtx, xty, k, kept
        self.cols = block_indices(kept, k)
        self.chol = ridged_cholesky(_block(xtx, self.cols), ridge)
        self.w = torch.cholesky_solve(xty[self.cols], self.chol)  # (d_S, n)
        self.error = max(yty - float((self.w * xty[self.cols]).sum()), 0.0)

    def _added(self, dropped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(H C_j, S_j, r_j) of each dropped channel j: (d_S, J, k), (J, k, k), (J, k, n)."""
        k, n_d = self.k, len(dropped)
        d_cols = block_indices(dropped, k)
        c = self.xtx[self.cols[:, None], d_cols]
        hc = torch.cholesky_solve(c, self.chol)
        schur = _diagonal_blocks(self.xtx, k)[dropped] - torch.einsum(
            "sjk,sjl->jkl", c.reshape(-1, n_d, k), hc.reshape(-1, n_d, k))
        schur = schur + torch.eye(k, dtype=schur.dtype) * 1e-12 * schur.diagonal(dim1=1, dim2=2).abs().mean().clamp_min(1e-300)
        r = (self.xty[d_cols] - c.T @ self.w).reshape(n_d, k, -1)
        return hc.reshape(-1, n_d, k), schur, r

    def addition_gains(self, dropped: torch.Tensor) -> torch.Tensor:
        """Exact drop of the error when each of ``dropped`` joins the kept set."""
        _, schur, r = self._added(dropped)
        return (r * torch.linalg.solve(schur, r)).sum((1, 2))

    def exchange_deltas(self, dropped: torch.Tensor) -> torch.Tensor:
        """(J, |kept|): exact change of the error when dropped channel j joins and kept channel i leaves."""
        k, n_s = self.k, len(self.kept)
        hc, schur, r = self._added(dropped)
        w_new = torch.linalg.solve(schur, r)  # (J, k, n): weights of the added channel
        gains = (r * w_new).sum((1, 2))
        h = torch.cholesky_inverse(self.chol)
        hc_blocks = hc.reshape(n_s, k, len(dropped), k).permute(2, 0, 1, 3)  # (J, S, k, k)
        solved = torch.linalg.solve(schur[:, None], hc_blocks.transpose(-1, -2))  # S_j⁻¹ (H C_j)_iᵀ
        h_ii = _diagonal_blocks(h, k)[None] + hc_blocks @ solved  # blocks of the grown set's inverse
        w_i = self.w.reshape(n_s, k, -1)[None] - hc_blocks @ w_new[:, None]  # (J, S, k, n)
        rises = (w_i * torch.linalg.solve(h_ii, w_i)).sum((2, 3))
        return rises - gains[:, None]
