"""FLOPs and parameter counts.

FLOPs are what ``torch.utils.flop_counter`` counts for one image at the model's input size:
convolutions and matrix products (conv, mm, addmm, bmm, ...) at 2 FLOPs per multiply-accumulate.
BatchNorm, activations, pooling and element-wise ops are not counted.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .evaluate import evaluating, model_device


@torch.no_grad()
def flop_breakdown(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, dict[str, int]]:
    """Total FLOPs at batch 1 and the FLOPs of every Conv2d / Linear by qualified name."""
    example = torch.zeros((1, *input_shape[1:]), device=model_device(model))
    with evaluating(model), FlopCounterMode(display=False) as counter:
        model(example)
    counts = counter.get_flop_counts()
    prefix = type(model).__name__
    per_layer = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            per_layer[name] = int(sum(counts.get(f"{prefix}.{name}", {}).values()))
    return int(counter.get_total_flops()), per_layer


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Total FLOPs of ``model`` for one image of ``input_shape`` (batch dimension ignored)."""
    return flop_breakdown(model, input_shape)[0]


def count_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())
