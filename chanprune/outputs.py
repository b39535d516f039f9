"""A model's output, whatever containers hold it, as the tensors in it: what comparisons of two
models' outputs read."""

from __future__ import annotations

import torch


def computes_the_same(expected: torch.Tensor, actual: torch.Tensor) -> bool:
    """Whether ``actual`` is ``expected`` up to float32 rounding (same shape, relative 1e-4 and an
    absolute 1e-5 of the largest entry): how a rewritten piece of a model is checked against it."""
    return actual.shape == expected.shape and bool(
        torch.allclose(actual, expected, rtol=1e-4, atol=1e-5 * (1 + float(expected.abs().max()))))


def output_tensors(output: object) -> list[torch.Tensor] | None:
    """The tensors in ``output`` (a tensor, or tuples, lists and dicts of them), in order; None
    when it holds anything else."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if not isinstance(output, (tuple, list)):
        return None
    parts = [output_tensors(o) for o in output]
    return None if any(p is None for p in parts) else [t for p in parts for t in p]
