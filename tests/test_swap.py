"""Exchange search after greedy elimination (``method="swap"``) against brute force."""

from __future__ import annotations

import itertools

import torch

from chanprune.pruner import prune
from chanprune.solvers import backward_elimination, swap_search

from test_coverage_gaps import integer_problem, lstsq_sse, moments_of

CASES = [(seed, c, k) for seed in range(6) for c in (7, 8) for k in (1, 3)]


def test_exchanges_never_raise_the_error_and_often_reach_the_optimum():
    improved = optimal_greedy = optimal_swap = total = 0
    for seed, c, k in CASES:
        x, y = integer_problem(seed, c, k, mixing=0.6)
        m = moments_of(x, y)
        for n in range(2, c - 1):
            best = min(lstsq_sse(x, y, s, k) for s in itertools.combinations(range(c), n))
            greedy = backward_elimination([(m, 1.0)], k, n, ridge=0.0)
            kept, swaps = swap_search([(m, 1.0)], k, greedy, ridge=0.0)
            e_greedy, e_swap = lstsq_sse(x, y, greedy.tolist(), k), lstsq_sse(x, y, kept.tolist(), k)
            assert len(kept) == n and kept.tolist() == sorted(set(kept.tolist()))
            assert e_swap <= e_greedy * (1 + 1e-9) + 1e-9, (seed, c, k, n)
            assert (swaps > 0) == (e_swap < e_greedy * (1 - 1e-9)), (seed, c, k, n, swaps)
            improved += swaps > 0
            # a local optimum: no single exchange of a kept and a dropped channel does better
            others = [j for j in range(c) if j not in kept.tolist()]
            assert all(lstsq_sse(x, y, sorted(set(kept.tolist()) - {i} | {j}), k) >= e_swap * (1 - 1e-9)
                       for i in kept.tolist() for j in others), (seed, c, k, n)
            optimal_greedy += e_greedy <= best * (1 + 1e-9)
            optimal_swap += e_swap <= best * (1 + 1e-9)
            total += 1
    print(f"greedy optimal {optimal_greedy}/{total}, after exchanges {optimal_swap}/{total}, improved {improved}")
    assert improved > 0 and optimal_swap > optimal_greedy and optimal_swap >= 0.95 * total


def test_a_set_with_no_better_exchange_is_left_alone():
    x, y = integer_problem(0, 6, 2)
    m = moments_of(x, y)
    best = min(itertools.combinations(range(6), 3), key=lambda s: lstsq_sse(x, y, s, 2))
    kept, swaps = swap_search([(m, 1.0)], 2, torch.tensor(best), ridge=0.0)
    assert swaps == 0 and kept.tolist() == list(best)


def test_swap_is_a_method_of_prune(tiny_model, tiny_images):
    _, greedy = prune(tiny_model, tiny_images, 2.0, "greedy", progress=False)
    _, swap = prune(tiny_model, tiny_images, 2.0, "swap", progress=False)
    fitted = [(g.rel_error, s.rel_error) for g, s in zip(greedy.layers, swap.layers) if g.rel_error is not None]
    assert fitted and swap.config["method"] == "swap"
    # the first layer sees the same inputs in both runs: its fitted error cannot be worse
    assert fitted[0][1] <= fitted[0][0] + 1e-9
