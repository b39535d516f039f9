"""Training loop for the reference models: SGD with linear warm-up then cosine decay.

Warm-up matters: plain lr 0.1 from step one stalls the BN-VGG for several epochs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import Split, labelled_loader
from .evaluate import accuracy


@dataclass
class TrainConfig:
    """Recipe of a training run; stored next to the checkpoint so the run can be repeated."""

    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.05
    warmup_epochs: int = 2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    shift: int = 2
    seed: int = 0


def random_shift(images: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``shift`` pixels (zero padding then a random crop)."""
    if shift == 0:
        return images
    n, _, h, w = images.shape
    padded = nn.functional.pad(images, (shift,) * 4, value=float(images.min()))
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None]).view(n, 1, h, 1)
    cols = (dx[:, None] + torch.arange(w)[None]).view(n, 1, 1, w)
    batch = torch.arange(n).view(n, 1, 1, 1)
    chans = torch.arange(images.shape[1]).view(1, -1, 1, 1)
    return padded[batch, chans, rows, cols]


def train(model: nn.Module, train_split: Split, val_split: Split, config: TrainConfig,
          progress: bool = True) -> dict[str, float]:
    """Train ``model`` in place; returns the final train loss and validation accuracy."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    loader = labelled_loader(train_split, config.batch_size, shuffle=True, seed=config.seed)
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": config.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=config.lr, momentum=config.momentum, nesterov=True)
    total = config.epochs * len(loader)
    warmup = config.warmup_epochs * len(loader)

    def lr_at(step: int) -> float:
        if step < warmup:
            return config.lr * (step + 1) / warmup
        return 0.5 * config.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    step, loss_value = 0, float("nan")
    bar = tqdm(range(config.epochs), desc="train", disable=not progress)
    for _ in bar:
        model.train()
        for images, labels in loader:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            logits = model(random_shift(images, config.shift, generator))
            loss = nn.functional.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_value = float(loss)
        val_acc = accuracy(model, val_split)
        bar.set_postfix(loss=f"{loss_value:.3f}", val_acc=f"{val_acc:.4f}")
    model.eval()
    return {"train_loss": loss_value, "val_accuracy": accuracy(model, val_split)}
