"""Evaluation: accuracy on a labelled split and the relative error of a model's logits."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .data import Split


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the duration, each module's own training flag restored afterwards,
    so that measuring or pruning a model never changes the caller's."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes:
            module.training = mode


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """Logits of ``model`` in eval mode for all ``images``."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
    model.train(was_training)
    return out


def accuracy(model: nn.Module, split: Split) -> float:
    """Top-1 accuracy of ``model`` on ``split``."""
    return float((predict(model, split.images).argmax(1) == split.labels).float().mean())


def logit_rel_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """||logits - reference||_F / ||reference||_F over a set of images."""
    return float((logits - reference).norm() / reference.norm().clamp_min(1e-12))
