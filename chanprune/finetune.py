"""Fine-tuning a pruned model, and the from-scratch baseline with the same widths.

Fine-tuning reuses the training loop (SGD or AdamW, cosine schedule, optional distillation from
the unpruned model). The baseline answers "was pruning worth it?": the pruned architecture,
randomly re-initialised, trained for a stated epoch budget.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import nn

from .data import Split
from .train import TrainConfig, train

FINETUNE_DEFAULTS = TrainConfig(epochs=2, lr=0.01, warmup_epochs=0)


def finetune(model: nn.Module, train_split: Split, val_split: Split, config: TrainConfig = FINETUNE_DEFAULTS,
             teacher: nn.Module | None = None, progress: bool = True) -> dict[str, float]:
    """Fine-tune ``model`` in place (its pruning plan is kept); returns loss and validation accuracy."""
    return train(model, train_split, val_split, config, progress, teacher)


def reinitialised(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``model`` (same widths, same channel selects) with fresh random weights and
    reset BatchNorm statistics."""
    fresh = copy.deepcopy(model)
    torch.manual_seed(seed)
    for m in fresh.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return fresh


def train_from_scratch(model: nn.Module, train_split: Split, val_split: Split, config: TrainConfig,
                       progress: bool = True) -> tuple[nn.Module, dict[str, float]]:
    """The baseline: the pruned architecture re-initialised and trained for ``config.epochs``."""
    fresh = reinitialised(model, config.seed)
    return fresh, train(fresh, train_split, val_split, replace(config, distill=0.0), progress)
