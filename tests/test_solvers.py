"""The moment route against explicit sample matrices: Gram, LASSO selection, least squares, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Lasso, lars_path

from chanprune.solvers import (channel_corr, channel_gram, lasso_problem, lasso_select,
                               least_squares, relative_error, squared_error)
from chanprune.stats import Moments, block_indices

C, K, N_OUT, N = 8, 4, 6, 600


def explicit_problem(seed: int = 0, beta=(1.0, 0.0, 0.8, 0.0, 0.55, 0.3, 0.0, 0.12)):
    """X (N, C*K) with channel means, layer weights W (N_OUT, C*K), and targets
    Y = sum_i beta_i X_i W_i^T + offset + noise, so the LASSO path has a clear order."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C * K, generator=g) + torch.linspace(-1, 2, C * K)  # non-zero means
    w = torch.randn(N_OUT, C * K, generator=g)
    y = torch.zeros(N, N_OUT)
    for i, b in enumerate(beta):
        cols = slice(i * K, (i + 1) * K)
        y += b * x[:, cols] @ w[:, cols].T
    y += 0.5 + 0.05 * torch.randn(N, N_OUT, generator=g)
    return x, w, y


def accumulate(x: torch.Tensor, y: torch.Tensor, sizes=(1, 0, 17, 100, 250)) -> Moments:
    """Moments of (x, y) fed in batches of uneven sizes (an empty batch included); rest last."""
    m = Moments(x.shape[1], y.shape[1])
    start = 0
    for s in sizes:
        m.update(x[start:start + s], y[start:start + s])
        start += s
    m.update(x[start:], y[start:])
    return m


def test_moments_equal_explicit_products_exactly_on_integer_data():
    # small integers: every float32 product and sum is exact, so the moments must be bit-exact
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-3, 4, (300, 10), generator=g).float()
    y = torch.randint(-3, 4, (300, 4), generator=g).float()
    m = accumulate(x, y)
    xd, yd = x.double(), y.double()
    assert m.count == 300
    assert m.xtx.dtype == torch.float64
    assert torch.equal(m.xtx, xd.T @ xd)
    assert torch.equal(m.xty, xd.T @ yd)
    assert m.yty == float(yd.square().sum())
    assert torch.equal(m.sum_x, xd.sum(0))
    assert torch.equal(m.sum_y, yd.sum(0))
    assert torch.equal(m.mean_x, xd.mean(0))


def test_moments_batches_match_explicit_and_centred():
    x, _, y = explicit_problem()
    m = accumulate(x, y)
    xd, yd = x.double(), y.double()
    torch.testing.assert_close(m.xtx, xd.T @ xd, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(m.xty, xd.T @ yd, rtol=1e-5, atol=1e-3)
    assert m.yty == pytest.approx(float(yd.square().sum()), rel=1e-6)
    xc, yc = xd - xd.mean(0), yd - yd.mean(0)
    cxx, cxy, cyy = m.centred()
    torch.testing.assert_close(cxx, xc.T @ xc, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(cxy, xc.T @ yc, rtol=1e-5, atol=1e-3)
    assert cyy == pytest.approx(float(yc.square().sum()), rel=1e-5)
    # one batch or many: the same sums
    one = Moments(x.shape[1], y.shape[1])
    one.update(x, y)
    torch.testing.assert_close(one.xtx, m.xtx, rtol=1e-6, atol=1e-3)


def test_block_indices_are_channel_major():
    assert block_indices(torch.tensor([0, 2, 5]), 3).tolist() == [0, 1, 2, 6, 7, 8, 15, 16, 17]
    assert block_indices(torch.tensor([4]), 1).tolist() == [4]


def explicit_z(x: torch.Tensor, w: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Z_i = X_i W_i^T for every input channel i."""
    c = x.shape[1] // k
    return [x[:, i * k:(i + 1) * k] @ w[:, i * k:(i + 1) * k].T for i in range(c)]


def test_channel_gram_and_corr_equal_inner_products_of_z():
    x, w, y = explicit_problem()
    xd, wd, yd = x.double(), w.double(), y.double()
    z = explicit_z(xd, wd, K)
    q_explicit = torch.tensor([[float((zi * zj).sum()) for zj in z] for zi in z], dtype=torch.float64)
    c_explicit = torch.tensor([float((zi * yd).sum()) for zi in z], dtype=torch.float64)
    q = channel_gram(xd.T @ xd, wd, K)
    c = channel_corr(xd.T @ yd, wd, K)
    assert q.shape == (C, C) and c.shape == (C,)
    torch.testing.assert_close(q, q_explicit, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(c, c_explicit, rtol=1e-10, atol=1e-8)


def normalised_centred_z(x, w, y):
    """Explicit LASSO design: centred Z_i of unit-norm W_i, vectorised as columns; and vec(Y - ȳ)."""
    xd, wd, yd = x.double(), w.double(), y.double()
    xc, yc = xd - xd.mean(0), yd - yd.mean(0)
    norms = wd.reshape(N_OUT, -1, K).square().sum((0, 2)).sqrt()
    wn = (wd.reshape(N_OUT, -1, K) / norms[None, :, None]).reshape(N_OUT, -1)
    z = explicit_z(xc, wn, K)
    design = torch.stack([zi.reshape(-1) for zi in z], 1)
    return design, yc.reshape(-1)


def test_lasso_problem_is_the_normalised_centred_gram():
    x, w, y = explicit_problem()
    m = accumulate(x, y)
    design, target = normalised_centred_z(x, w, y)
    t = float(target @ target)
    q_mat, q_vec = lasso_problem(m, w.double(), K)
    torch.testing.assert_close(q_mat, design.T @ design / t, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(q_vec, design.T @ target / t, rtol=1e-5, atol=1e-7)


def first_knot_with(coefs: np.ndarray, n_keep: int) -> int:
    counts = (coefs != 0).sum(0)
    hits = np.flatnonzero(counts == n_keep)
    assert len(hits), f"sklearn's path never has {n_keep} active coefficients"
    return int(hits[0])


@pytest.mark.parametrize("n_keep", [1, 2, 3, 4, 5])
def test_lasso_select_matches_sklearn_on_explicit_design(n_keep):
    x, w, y = explicit_problem()
    m = accumulate(x, y)
    q_mat, q_vec = lasso_problem(m, w.double(), K)
    chosen = lasso_select(q_mat, q_vec, n_keep)
    assert len(chosen) == n_keep
    assert chosen.tolist() == sorted(chosen.tolist())

    design, target = normalised_centred_z(x, w, y)
    alphas, _, coefs = lars_path(design.numpy(), target.numpy(), method="lasso")
    counts = (coefs != 0).sum(0)
    assert np.all(np.diff(counts) >= 0), "fixture should give a path without drops"
    j = first_knot_with(coefs, n_keep)
    lars_set = np.flatnonzero(coefs[:, j]).tolist()
    assert chosen.tolist() == lars_set

    # coordinate descent at a λ inside the segment that ends at that knot: the same support
    alpha = 0.5 * (alphas[j - 1] + alphas[j])
    cd = Lasso(alpha=alpha, fit_intercept=False, tol=1e-12, max_iter=200000).fit(design.numpy(), target.numpy())
    assert np.flatnonzero(np.abs(cd.coef_) > 1e-12).tolist() == lars_set


def test_lasso_select_with_the_true_support_of_the_data():
    # the three channels that build Y with the largest contributions are found first
    x, w, y = explicit_problem(beta=(0.0, 1.0, 0.0, 0.0, 0.0, 0.9, 0.0, 0.8))
    m = accumulate(x, y)
    q_mat, q_vec = lasso_problem(m, w.double(), K)
    assert lasso_select(q_mat, q_vec, 3).tolist() == [1, 5, 7]


def test_lasso_select_respects_candidates_and_returns_all_when_enough():
    x, w, y = explicit_problem()
    m = accumulate(x, y)
    q_mat, q_vec = lasso_problem(m, w.double(), K)
    candidates = torch.tensor([1, 3, 4, 6, 7])
    for n_keep in (1, 2, 4):
        got = lasso_select(q_mat, q_vec, n_keep, candidates=candidates)
        assert len(got) == n_keep and set(got.tolist()) <= set(candidates.tolist())
    assert lasso_select(q_mat, q_vec, 5, candidates=candidates).tolist() == [1, 3, 4, 6, 7]
    assert lasso_select(q_mat, q_vec, 8).tolist() == list(range(8))


@pytest.mark.parametrize("n_keep", [1, 3, 4, 5])
def test_lasso_select_keeps_exactly_n_on_degenerate_problems(n_keep):
    # rank-2 Gram (duplicated and proportional channels): the path stops early, the fallback
    # must still return exactly n_keep distinct channels
    g = torch.Generator().manual_seed(5)
    base = torch.randn(50, 2, generator=g, dtype=torch.float64)
    design = torch.cat([base, base, 2 * base[:, :1], -base[:, 1:]], 1)  # 6 columns, rank 2
    target = base @ torch.tensor([1.0, 0.5], dtype=torch.float64)
    got = lasso_select(design.T @ design, design.T @ target, n_keep)
    assert len(got) == n_keep
    assert len(set(got.tolist())) == n_keep
    assert all(0 <= i < 6 for i in got.tolist())


def explicit_lstsq(x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor, k: int):
    """Least squares with an intercept column on the explicit kept columns (float64)."""
    cols = block_indices(keep, k)
    a = torch.cat([x.double()[:, cols], torch.ones(len(x), 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(a, y.double(), driver="gelsd").solution
    return sol[:-1].T, sol[-1]


@pytest.mark.parametrize("keep", [[0, 2, 5], [1, 3, 4, 6, 7], list(range(C))])
def test_least_squares_matches_lstsq_with_intercept(keep):
    x, _, y = explicit_problem()
    keep = torch.tensor(keep)
    m = accumulate(x, y)
    w_ref, b_ref = explicit_lstsq(x, y, keep, K)
    w, b = least_squares(m, keep, K, ridge=1e-12)
    assert w.shape == (N_OUT, len(keep) * K) and b.shape == (N_OUT,)
    torch.testing.assert_close(w, w_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b, b_ref, rtol=1e-4, atol=1e-5)
    # the default ridge (1e-6 of the mean eigenvalue) is still a close match
    w6, b6 = least_squares(m, keep, K)
    torch.testing.assert_close(w6, w_ref, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(b6, b_ref, rtol=1e-3, atol=1e-4)


def test_least_squares_recovers_noise_free_weights():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(400, 12, generator=g) + 1.0
    w_true = torch.randn(3, 12, generator=g)
    b_true = torch.tensor([0.5, -1.0, 2.0])
    y = x @ w_true.T + b_true
    m = accumulate(x, y)
    w, b = least_squares(m, torch.arange(4), 3)
    torch.testing.assert_close(w, w_true.double(), rtol=0, atol=1e-4)
    torch.testing.assert_close(b, b_true.double(), rtol=0, atol=1e-4)
    assert squared_error(m, torch.arange(4), 3, w, b) <= 1e-6 * m.yty


def explicit_sq_error(x, y, keep, k, w, b) -> float:
    cols = block_indices(keep, k)
    r = y.double() - x.double()[:, cols] @ w.T - b
    return float(r.square().sum())


@pytest.mark.parametrize("keep", [[0, 2, 5], [3], list(range(C))])
def test_squared_error_matches_explicit_residual(keep):
    x, w, y = explicit_problem()
    keep = torch.tensor(keep)
    m = accumulate(x, y)
    cols = block_indices(keep, K)
    # reconstructed weights
    w_ls, b_ls = least_squares(m, keep, K)
    ref = explicit_sq_error(x, y, keep, K, w_ls, b_ls)
    # float32 per-batch products: the moment formula is exact up to ~1e-7 of ||Y||^2 (cancellation)
    assert squared_error(m, keep, K, w_ls, b_ls) == pytest.approx(ref, rel=1e-5, abs=1e-6 * m.yty)
    # not reconstructed: original sliced weights and a bias that is not the optimal one
    w_orig = w.double()[:, cols]
    bad_bias = torch.tensor([0.3, -2.0, 1.0, 0.0, 4.0, -0.5], dtype=torch.float64)
    ref_orig = explicit_sq_error(x, y, keep, K, w_orig, bad_bias)
    got = squared_error(m, keep, K, w_orig, bad_bias)
    assert got == pytest.approx(ref_orig, rel=1e-5)
    assert relative_error(m, keep, K, w_orig, bad_bias) == pytest.approx(
        (ref_orig / float(y.double().square().sum())) ** 0.5, rel=1e-5)
    # least squares is the minimum: never above the original weights with any bias
    assert squared_error(m, keep, K, w_ls, b_ls) <= got
    assert squared_error(m, keep, K, w_ls, b_ls) <= squared_error(m, keep, K, w_orig, b_ls)


def test_squared_error_is_clamped_and_nan_without_samples():
    g = torch.Generator().manual_seed(2)
    x = 3 + torch.randn(200, 6, generator=g)
    w = torch.randn(2, 6, generator=g)
    y = x @ w.T  # a perfect fit
    m = accumulate(x, y)
    zero_b = torch.zeros(2, dtype=torch.float64)
    err = squared_error(m, torch.arange(6), 1, w.double(), zero_b)
    assert 0.0 <= err <= 1e-5 * m.yty
    # push the raw formula below zero (as round-off can): the result is clamped at exactly 0
    m.yty -= 1e-3 * m.yty
    assert squared_error(m, torch.arange(6), 1, w.double(), zero_b) == 0.0
    empty = Moments(6, 2)
    assert np.isnan(squared_error(empty, torch.arange(6), 1, w.double(), zero_b))
    assert np.isnan(relative_error(empty, torch.arange(6), 1, w.double(), zero_b))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reconstruction_never_raises_the_fitted_error(seed):
    x, w, y = explicit_problem(seed=seed)
    m = accumulate(x, y)
    gen = torch.Generator().manual_seed(seed)
    for n_keep in (1, 3, 6):
        keep = torch.randperm(C, generator=gen)[:n_keep].sort().values
        cols = block_indices(keep, K)
        w_orig, b0 = w.double()[:, cols], torch.zeros(N_OUT, dtype=torch.float64)
        w_ls, b_ls = least_squares(m, keep, K)
        before = relative_error(m, keep, K, w_orig, b0)
        after = relative_error(m, keep, K, w_ls, b_ls)
        assert after <= before
        assert after < 0.9 * before  # and here it helps a lot: the original weights ignore the offset


@pytest.mark.parametrize("c, n_keep", [(60, 1), (60, 30), (60, 59), (200, 100), (200, 170)])
def test_lasso_select_stops_early_on_the_same_path(c, n_keep):
    """Following the LASSO path only until n_keep channels are active picks what the whole path does."""
    import numpy as np
    from sklearn.linear_model import lars_path_gram

    g = torch.Generator().manual_seed(c + n_keep)
    z = torch.randn(4 * c, c, generator=g, dtype=torch.float64) @ torch.randn(c, c, generator=g, dtype=torch.float64)
    q_mat, q_vec = z.T @ z, z.T @ torch.randn(4 * c, generator=g, dtype=torch.float64)
    keep = lasso_select(q_mat, q_vec, n_keep)
    gram = q_mat.numpy() + np.eye(c) * 1e-10 * np.trace(q_mat.numpy()) / c
    _, _, coefs = lars_path_gram(Xy=q_vec.numpy(), Gram=gram, n_samples=1, method="lasso", max_iter=8 * c + 50)
    first = np.flatnonzero((coefs != 0).sum(0) == n_keep)[0]
    assert keep.tolist() == np.flatnonzero(coefs[:, first]).tolist()
