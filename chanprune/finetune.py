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

from .data import LabelledData, first_images
from .evaluate import model_device
from .train import TrainConfig, train

FINETUNE_DEFAULTS = TrainConfig(epochs=2, lr=0.01, warmup_epochs=0)
LR_GRID = (1 / 3, 1.0, 3.0)  # multiples of the configured learning rate a fine-tune chooses from, on validation
RENORMALIZE_IMAGES = 1000  # training images that set the BN statistics before fine-tuning


def finetune(model: nn.Module, train_split: LabelledData, val_split: LabelledData, config: TrainConfig = FINETUNE_DEFAULTS,
             teacher: nn.Module | None = None, progress: bool = True, renormalize: bool = True,
             lr_grid: tuple[float, ...] = LR_GRID) -> dict[str, float]:
    """Fine-tune ``model`` in place (its pruning plan is kept); returns loss, validation accuracy,
    the chosen learning rate and the best epoch.

    One run per learning rate ``config.lr * m`` for m in ``lr_grid`` (``(1.0,)``: the configured
    rate alone), each keeping its best validation epoch, epoch 0 included; the model ends with
    the best of them. Fine-tuning
    therefore never lowers validation accuracy; the test split is never looked at.

    With ``renormalize`` the BatchNorm layers are first given the statistics their inputs really
    have (:func:`renormalize_batchnorm`, on up to 1000 training images) without changing what the
    model computes in eval mode. Reconstructed weights were fitted through the original running
    statistics; training-mode BatchNorm would otherwise normalise them by batch statistics and
    start fine-tuning from a different, worse function.
    """
    if renormalize:
        renormalize_batchnorm(model, first_images(train_split, RENORMALIZE_IMAGES))
    best: tuple[dict[str, float], dict[str, torch.Tensor]] | None = None
    for lr in (config.lr * m for m in lr_grid):
        trial = copy.deepcopy(model)
        result = train(trial, train_split, val_split, replace(config, lr=lr), progress, teacher, keep_best=True)
        if best is None or result["val_accuracy"] > best[0]["val_accuracy"]:
            best = ({**result, "lr": lr}, trial.state_dict())
    model.load_state_dict(best[1])
    model.eval()
    return best[0]


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def renormalize_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int = 250) -> nn.Module:
    """Set every affine BatchNorm's running statistics to those of its inputs on ``images`` and
    rescale its weight and bias so that the model's eval-mode output is unchanged, in place.

    With μ, σ the old and μ', σ' the new statistics: γ' = γ·σ'/σ and β' = β + γ·(μ' − μ)/σ, so
    γ'(z − μ')/σ' + β' = γ(z − μ)/σ + β for every z. Afterwards training-mode batch statistics
    agree with the running ones and fine-tuning starts from the function pruning produced.
    """
    norms = [m for m in _batchnorms(model) if m.affine and m.track_running_stats]
    sums: dict[nn.Module, tuple[int, torch.Tensor, torch.Tensor]] = {}  # count, Σx, Σx² per channel

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].double().transpose(0, 1).reshape(inputs[0].shape[1], -1)
        count, total, squares = sums.get(module, (0, 0.0, 0.0))
        sums[module] = (count + x.shape[1], total + x.sum(1), squares + (x * x).sum(1))

    handles = [m.register_forward_pre_hook(hook) for m in norms]
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(images), batch_size):
            model(images[start : start + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for m, (count, total, squares) in sums.items():
        mean = total / count
        var = (squares / count - mean * mean).clamp_min(0)
        old_std = (m.running_var.double() + m.eps).sqrt()
        new_std = (var + m.eps).sqrt()
        gamma = m.weight.double()
        m.bias.copy_(m.bias.double() + gamma * (mean - m.running_mean.double()) / old_std)
        m.weight.copy_(gamma * new_std / old_std)
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
    return model


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int = 128) -> nn.Module:
    """Recompute every BatchNorm's running mean and variance on ``images``, in place.

    Forward passes without gradients, only the BatchNorm layers in train mode (dropout stays
    off), with a cumulative average over the batches (momentum None), so the result does not
    depend on the stale statistics. Pruning that does not look at data (filter magnitudes) leaves
    them describing channels that no longer add up the same way; this gives such a model the same
    calibration images chanprune sees.
    """
    norms = _batchnorms(model)
    saved = [(m, m.momentum) for m in norms]
    device = model_device(model)
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.eval()
    for m in norms:
        m.train()
    try:
        for start in range(0, len(images), batch_size):
            model(images[start : start + batch_size].to(device))
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
    return model


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


def train_from_scratch(model: nn.Module, train_split: LabelledData, val_split: LabelledData, config: TrainConfig,
                       progress: bool = True) -> tuple[nn.Module, dict[str, float]]:
    """The baseline: the pruned architecture re-initialised and trained for ``config.epochs``."""
    fresh = reinitialised(model, config.seed)
    return fresh, train(fresh, train_split, val_split, replace(config, distill=0.0), progress)
