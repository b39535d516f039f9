"""Fine-tuning, distillation and the from-scratch baseline."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from chanprune.data import Split
from chanprune.errors import ChanpruneError
from chanprune.evaluate import accuracy
from chanprune.finetune import finetune, reestimate_batchnorm, reinitialised, renormalize_batchnorm, train_from_scratch
from chanprune.layers import SelectedConv2d
from chanprune.train import TrainConfig, distillation_loss

from conftest import make_tiny, randomise


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
    finetune(student, train_split, val_split, TrainConfig(epochs=3, lr=lr, warmup_epochs=0, shift=0, batch_size=32,
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


def bn_net(seed: int) -> nn.Sequential:
    """conv + BN + ReLU + dropout + conv + BN + mean pooling, BN with stale (made-up) running
    statistics."""
    return randomise(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.5),
                                   nn.Conv2d(6, 5, 3), nn.BatchNorm2d(5), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                     seed)


def input_stats(net: nn.Sequential, index: int, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        x = net[:index].eval()(images).double()
    return x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)


def test_renormalize_batchnorm_keeps_the_eval_function_and_makes_train_mode_agree():
    images = torch.randn(64, 3, 8, 8)
    net = bn_net(0)
    with torch.no_grad():
        before = net(images)
        renormalize_batchnorm(net, images, batch_size=16)
        after = net.eval()(images)
    assert torch.allclose(before, after, atol=1e-4)
    for index in (1, 5):
        mean, var = input_stats(net, index, images)
        assert torch.allclose(net[index].running_mean.double(), mean, atol=1e-4)
        assert torch.allclose(net[index].running_var.double(), var, atol=1e-4)
    net.train()
    net[3].eval()  # dropout off: train-mode BN on the whole set now computes the same function
    with torch.no_grad():
        assert torch.allclose(net(images), after, atol=1e-3)


def test_reestimate_batchnorm_uses_the_data_and_restores_momentum_and_mode():
    images = torch.randn(64, 3, 8, 8)
    net = bn_net(1)
    reestimate_batchnorm(net, images, batch_size=16)
    assert not net.training and net[1].momentum == 0.1
    mean, _ = input_stats(net, 1, images)
    assert torch.allclose(net[1].running_mean.double(), mean, atol=1e-4)
    with torch.no_grad():  # a cumulative average of the per-batch (unbiased) variances
        x = net[:1](images).double()
    batch_vars = [x[i : i + 16].var((0, 2, 3), unbiased=True) for i in range(0, 64, 16)]
    assert torch.allclose(net[1].running_var.double(), torch.stack(batch_vars).mean(0), rtol=1e-4)
    behind_dropout = nn.Sequential(nn.Dropout(0.9), nn.BatchNorm2d(3))
    reestimate_batchnorm(behind_dropout, images)
    assert torch.allclose(behind_dropout[1].running_mean, images.mean((0, 2, 3)), atol=1e-4)


def test_finetune_starts_from_the_renormalised_function():
    train_split, val_split = toy_split(200, 0), toy_split(100, 1)
    net = bn_net(2)
    with torch.no_grad():
        before = net(train_split.images)
    finetune(net, train_split, val_split, TrainConfig(epochs=0, lr=0.01))
    with torch.no_grad():
        assert torch.allclose(net.eval()(train_split.images), before, atol=1e-4)
    mean, _ = input_stats(net, 1, train_split.images)
    assert torch.allclose(net[1].running_mean.double(), mean, atol=1e-4)


def test_finetuning_never_lowers_validation_accuracy():
    """A learning rate that wrecks the model: every epoch is worse than epoch 0, so the model ends
    computing what it computed before and says so."""
    train_split, val_split = toy_split(400, 0), toy_split(100, 1)
    model = make_tiny(0)
    finetune(model, train_split, val_split, TrainConfig(epochs=3, lr=0.05, warmup_epochs=0, shift=0, batch_size=32),
             progress=False, lr_grid=(1.0,))
    before = accuracy(model, val_split)
    with torch.no_grad():
        outputs = model.eval()(val_split.images)
    result = finetune(model, train_split, val_split, TrainConfig(epochs=2, lr=1e4, warmup_epochs=0, shift=0,
                                                                 batch_size=32), progress=False)
    assert result["best_epoch"] == 0 and result["val_accuracy"] == pytest.approx(before)
    assert accuracy(model, val_split) == pytest.approx(before)
    with torch.no_grad():  # the same function (BatchNorm was only renormalised)
        assert torch.allclose(model.eval()(val_split.images), outputs, atol=1e-4)


def test_finetune_chooses_the_learning_rate_on_validation():
    train_split, val_split = toy_split(400, 0), toy_split(100, 1)
    results = {}
    for grid in ((1.0,), (1e-4, 1.0, 1e4)):
        model = make_tiny(0)
        results[grid] = finetune(model, train_split, val_split, TrainConfig(epochs=2, lr=0.05, warmup_epochs=0,
                                                                           shift=0, batch_size=32),
                                 progress=False, lr_grid=grid)
    assert results[(1e-4, 1.0, 1e4)]["lr"] == pytest.approx(0.05)  # the tiny and the huge rate lose
    assert results[(1e-4, 1.0, 1e4)]["val_accuracy"] == pytest.approx(results[(1.0,)]["val_accuracy"])
