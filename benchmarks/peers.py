"""Torch-Pruning (the `torch-pruning` package) as the peer, at FLOPs matched to a target speed-up.

Torch-Pruning removes the same fraction of channels from every dependency group it finds
(residual trunks included), ranked by an importance criterion. Its pruning ratio is found by
bisection until the FLOPs speed-up (counted the way chanprune counts it) is within ``tolerance``
of the target. The outputs of the final layer (the last Linear, else the last conv: an image
model's output channels) are never pruned.

Criteria: ``l1`` / ``l2`` group magnitude, ``bn_scale`` (|γ| of the BatchNorm after each conv)
and ``taylor`` (|w · ∂loss/∂w| with the cross-entropy on the labelled calibration images).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from chanprune.errors import ChanpruneError
from chanprune.flops import count_flops

CRITERIA = ("l1", "l2", "bn_scale", "taylor")


def _importance(criterion: str) -> object:
    import torch_pruning as tp

    return {
        "l1": lambda: tp.importance.MagnitudeImportance(p=1),
        "l2": lambda: tp.importance.MagnitudeImportance(p=2),
        "bn_scale": tp.importance.BNScaleImportance,
        "taylor": tp.importance.TaylorImportance,
    }[criterion]()


def require_torch_pruning() -> None:
    """Fail early, with the fix, when the optional peer package is missing."""
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        raise ChanpruneError("the peer comparison needs Torch-Pruning: pip install torch-pruning==1.6.1") from None


def _pruned_at(model: nn.Module, criterion: str, ratio: float, example: torch.Tensor,
               gradient_batch: Callable[[nn.Module], None], ignored: tuple[str, ...]) -> nn.Module:
    import torch_pruning as tp

    net = copy.deepcopy(model).eval()
    final = [m for m in net.modules() if isinstance(m, nn.Linear)][-1:] or \
        [m for m in net.modules() if isinstance(m, nn.Conv2d)][-1:]
    pruner = tp.pruner.MetaPruner(net, example, importance=_importance(criterion), pruning_ratio=ratio,
                                  ignored_layers=final + [net.get_submodule(name) for name in ignored])
    if criterion == "taylor":
        gradient_batch(net)
    pruner.step()
    net.zero_grad(set_to_none=True)
    return net


def tp_prune(model: nn.Module, criterion: str, speedup: float, images: torch.Tensor, labels: torch.Tensor | None,
             tolerance: float = 0.03, steps: int = 20, ignored: tuple[str, ...] = ()) -> tuple[nn.Module, float]:
    """Torch-Pruning's model at ``speedup`` (± ``tolerance``) and the FLOPs speed-up it reached;
    the layers named in ``ignored`` keep their output channels (besides the final layer)."""
    if criterion not in CRITERIA:
        raise ChanpruneError(f"unknown Torch-Pruning criterion {criterion!r}; use one of {', '.join(CRITERIA)}")
    require_torch_pruning()
    shape = (1, *images.shape[1:])
    example = images[:1]
    flops0 = count_flops(model, shape)

    def gradient_batch(net: nn.Module) -> None:
        net.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(images), labels).backward()

    low, high = 0.0, 0.99
    best: tuple[float, nn.Module, float] | None = None
    for _ in range(steps):
        ratio = 0.5 * (low + high)
        net = _pruned_at(model, criterion, ratio, example, gradient_batch, ignored)
        reached = flops0 / count_flops(net, shape)
        if best is None or abs(reached / speedup - 1) < abs(best[2] / speedup - 1):
            best = (ratio, net, reached)
        if abs(reached / speedup - 1) <= tolerance / 2:
            break
        low, high = (ratio, high) if reached < speedup else (low, ratio)
    assert best is not None
    if abs(best[2] / speedup - 1) > tolerance:
        raise ChanpruneError(f"Torch-Pruning ({criterion}) reached {best[2]:.2f}x, not {speedup}x within "
                             f"{tolerance:.0%}")
    return best[1], best[2]
