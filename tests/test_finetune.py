"""Fine-tuning, distillation and the from-scratch baseline."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from chanprune.data import Split
from chanprune.errors import ChanpruneError
from chanprune.evaluate import accuracy
from chanprune.finetune import finetune, reinitialised, train_from_scratch
from chanprune.layers import SelectedConv2d
from chanprune.train import TrainConfig, distillation_loss

from conftest import make_tiny


def toy_split(n: int, seed: int) -> Split:
    """A learnable 5-class problem on 3x8x8 inputs: the class is the brightest quadrant/centre."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (n,), generator=g)
    images = 0.3 * torch.randn(n, 3, 8, 8, generator=g)
    corners = [(slice(0, 4), slice(0, 4)), (slice(0, 4), slice(4, 8)), (slice(4, 8), slice(0, 4)),
               (slice(4, 8), slice(4, 8)), (slice(2, 6), slice(2, 6))]
    for i, label in enumerate(labels.tolist()):
        rows, cols = corners[label]
        images[i, :, rows, cols] += 1.0
    return Split(images, labels)


def test_distillation_loss_is_zero_for_equal_logits_and_positive_otherwise():
    logits = torch.randn(6, 5)
    assert float(distillation_loss(logits, logits.clone(), 4.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(logits, torch.randn(6, 5), 4.0)) > 0.01


def test_finetune_trains_a_random_model_and_keeps_its_shape():
    train_split, val_split = toy_split(600, 0), toy_split(200, 1)
    model = make_tiny(0)
    config = TrainConfig(epochs=3, lr=0.05, warmup_epochs=0, shift=0, batch_size=32)
    before = accuracy(model, val_split)
    result = finetune(model, train_split, val_split, config, progress=False)
    assert result["val_accuracy"] == pytest.approx(accuracy(model, val_split))
    assert result["val_accuracy"] > max(0.6, before + 0.2)
    assert model.conv2.out_channels == 12


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_distillation_from_a_teacher_pulls_the_student_towards_it(optimizer):
    train_split, val_split = toy_split(400, 2), toy_split(100, 3)
    teacher = make_tiny(1)
    finetune(teacher, train_split, val_split, TrainConfig(epochs=3, lr=0.05, warmup_epochs=0, shift=0,
                                                          batch_size=32), progress=False)
    student = make_tiny(2)
    with torch.no_grad():
        gap_before = float(distillation_loss(student(val_split.images), teacher(val_split.images), 4.0))
    lr = 0.01 if optimizer == "adamw" else 0.05
    finetune(student, train_split, val_split, TrainConfig(epochs=2, lr=lr, warmup_epochs=0, shift=0, batch_size=32,
                                                          optimizer=optimizer, distill=1.0), teacher, progress=False)
    with torch.no_grad():
        gap_after = float(distillation_loss(student(val_split.images), teacher(val_split.images), 4.0))
    assert gap_after < 0.5 * gap_before


def test_distillation_without_a_teacher_or_a_bad_recipe_is_refused():
    split = toy_split(20, 0)
    with pytest.raises(ChanpruneError, match="teacher"):
        finetune(make_tiny(0), split, split, TrainConfig(epochs=1, distill=0.5), progress=False)
    with pytest.raises(ChanpruneError, match="optimizer"):
        finetune(make_tiny(0), split, split, TrainConfig(epochs=1, optimizer="lbfgs"), progress=False)


def test_reinitialised_keeps_widths_and_selects_but_not_weights():
    model = make_tiny(0)
    model.conv2 = SelectedConv2d(torch.tensor([0, 2, 5]), 12, 3, padding=1, bias=False)
    model.bn1.running_mean.fill_(0.7)
    fresh = reinitialised(model, seed=3)
    assert fresh.conv2.index.tolist() == [0, 2, 5] and fresh.conv2.weight.shape == model.conv2.weight.shape
    assert not torch.equal(fresh.conv1.weight, model.conv1.weight)
    assert float(fresh.bn1.running_mean.abs().sum()) == 0.0
    assert float(model.bn1.running_mean[0]) == pytest.approx(0.7)  # the original is untouched


def test_from_scratch_baseline_trains_the_same_architecture():
    train_split, val_split = toy_split(400, 4), toy_split(100, 5)
    model = make_tiny(0)
    fresh, result = train_from_scratch(model, train_split, val_split,
                                       TrainConfig(epochs=3, lr=0.05, warmup_epochs=0, shift=0, batch_size=32),
                                       progress=False)
    assert fresh is not model
    assert [p.shape for p in fresh.parameters()] == [p.shape for p in model.parameters()]
    assert result["val_accuracy"] > 0.6
    assert isinstance(fresh.fc2, nn.Linear)
