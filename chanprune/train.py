"""Training loop for reference models and fine-tuning: SGD or AdamW, linear warm-up then cosine
decay, optional knowledge distillation from a teacher (the unpruned model).

Warm-up matters: plain lr 0.1 from step one stalls the BN-VGG for several epochs.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from .data import LabelledData, labelled_loader
from .distributed import shard
from .evaluate import accuracy, model_device


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
    optimizer: str = "sgd"  # "sgd" (nesterov) or "adamw"
    distill: float = 0.0  # weight of the distillation loss (0: labels only, 1: teacher only)
    temperature: float = 4.0

    def validate(self) -> None:
        from .errors import ChanpruneError

        if self.optimizer not in ("sgd", "adamw"):
            raise ChanpruneError(f"unknown optimizer {self.optimizer!r}; use sgd or adamw")
        if not 0.0 <= self.distill <= 1.0:
            raise ChanpruneError(f"distillation weight must be in [0, 1], got {self.distill}")
        if self.epochs < 0 or self.lr <= 0 or self.temperature <= 0:
            raise ChanpruneError("epochs must be >= 0 and lr and temperature > 0")


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


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.: KL(teacher || student) of temperature-softened outputs, scaled by T²."""
    log_student = nn.functional.log_softmax(logits / temperature, 1)
    log_teacher = nn.functional.log_softmax(teacher_logits / temperature, 1)
    return nn.functional.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * temperature ** 2


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (nesterov) or AdamW; no weight decay on biases and BatchNorm parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)


def train(model: nn.Module, train_split: LabelledData, val_split: LabelledData, config: TrainConfig,
          progress: bool = True, teacher: nn.Module | None = None, keep_best: bool = False) -> dict[str, float]:
    """Train ``model`` in place; returns the final train loss and validation accuracy.

    With a ``teacher`` and ``config.distill`` > 0 the loss mixes cross-entropy on the labels with
    the distillation loss towards the teacher's outputs on the same (shifted) images. With
    ``keep_best`` the model ends with the weights of its best validation epoch, epoch 0 (before
    any step) included, so training never leaves it worse on validation than it started;
    ``best_epoch`` says which.
    """
    config.validate()
    if config.distill > 0 and teacher is None:
        from .errors import ChanpruneError

        raise ChanpruneError("distillation needs a teacher model")
    if teacher is not None:
        teacher.eval()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    loader = labelled_loader(train_split, config.batch_size, shuffle=True, seed=config.seed)
    optimizer = make_optimizer(model, config)
    total = config.epochs * len(loader)
    warmup = config.warmup_epochs * len(loader)

    def lr_at(step: int) -> float:
        if step < warmup:
            return config.lr * (step + 1) / warmup
        return 0.5 * config.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    step, loss_value = 0, float("nan")
    device = model_device(model)
    # several processes (torchrun): gradients averaged by DDP, each rank on its share of the data
    net = nn.parallel.DistributedDataParallel(model) if shard()[1] > 1 else model
    best = (accuracy(model, val_split), 0, copy.deepcopy(model.state_dict())) if keep_best else None
    bar = tqdm(range(config.epochs), desc="train", disable=not progress or config.epochs == 0)
    for epoch in bar:
        model.train()
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        for images, labels in loader:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            images = random_shift(images, config.shift, generator).to(device)
            labels = labels.to(device)
            logits = net(images)
            loss = nn.functional.cross_entropy(logits, labels)
            if config.distill > 0:
                with torch.no_grad():
                    teacher_logits = teacher(images)
                loss = (1 - config.distill) * loss + \
                    config.distill * distillation_loss(logits, teacher_logits, config.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_value = float(loss.detach())
        val_acc = accuracy(model, val_split)
        bar.set_postfix(loss=f"{loss_value:.3f}", val_acc=f"{val_acc:.4f}")
        if best is not None and val_acc > best[0]:
            best = (val_acc, epoch + 1, copy.deepcopy(model.state_dict()))
    model.eval()
    if best is None:
        return {"train_loss": loss_value, "val_accuracy": accuracy(model, val_split)}
    model.load_state_dict(best[2])
    return {"train_loss": loss_value, "val_accuracy": best[0], "best_epoch": best[1]}
