"""Evaluation: top-k accuracy on labelled data (the bundled split or a labelled folder) and the
relative error of a model's logits. Batches go to the model's device; results come back on the CPU."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .data import LabelledData, eval_loader


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
    device = model_device(model)
    with evaluating(model):
        return torch.cat([model(images[i : i + batch_size].to(device)).cpu()
                          for i in range(0, len(images), batch_size)])


@torch.no_grad()
def predict_labelled(models: list[nn.Module], data: LabelledData,
                     batch_size: int = 250) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Logits of each of ``models`` in eval mode on every image of ``data``, and the labels; the
    images are read once for all of them (a folder is decoded once)."""
    logits: list[list[torch.Tensor]] = [[] for _ in models]
    labels = []
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(evaluating(model))
        for images, targets in eval_loader(data, batch_size):
            for model, out in zip(models, logits):
                out.append(model(images.to(model_device(model))).cpu())
            labels.append(targets)
    return [torch.cat(out) for out in logits], torch.cat(labels)


def top_k(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Share of images whose label is among the ``k`` highest logits."""
    best = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return float((best == labels[:, None]).any(1).float().mean())


def accuracy(model: nn.Module, data: LabelledData) -> float:
    """Top-1 accuracy of ``model`` on ``data``."""
    (logits,), labels = predict_labelled([model], data)
    return top_k(logits, labels)


def logit_rel_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """||logits - reference||_F / ||reference||_F over a set of images."""
    return float((logits - reference).norm() / reference.norm().clamp_min(1e-12))
