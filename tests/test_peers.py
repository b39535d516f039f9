"""The Torch-Pruning peer of the results suite: FLOPs matched to the target, every criterion."""

from __future__ import annotations

import pytest
import torch

from benchmarks.peers import CRITERIA, tp_prune
from chanprune.data import calibration_indices, mnist_split
from chanprune.errors import ChanpruneError
from chanprune.flops import count_flops
from chanprune.models import create_model

pytest.importorskip("torch_pruning")


@pytest.fixture(scope="module")
def calibration() -> tuple[torch.Tensor, torch.Tensor]:
    train = mnist_split("train")
    idx = calibration_indices(len(train.images), 64, 0)
    return train.images[idx], train.labels[idx]


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("speedup", [2.0, 4.0])
def test_torch_pruning_meets_the_flops_target_with_every_criterion(criterion, speedup, calibration):
    images, labels = calibration
    model = create_model("resnet20-mnist")
    net, reached = tp_prune(model, criterion, speedup, images, labels)
    shape = (1, 1, 32, 32)
    assert reached == pytest.approx(count_flops(model, shape) / count_flops(net, shape))
    assert abs(reached / speedup - 1) <= 0.03
    assert net(images[:3]).shape == (3, 10)
    assert sum(p.numel() for p in net.parameters()) < sum(p.numel() for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())  # the original is untouched


def test_unknown_criterion_and_unreachable_speedup_are_refused(calibration):
    images, labels = calibration
    model = create_model("resnet20-mnist")
    with pytest.raises(ChanpruneError, match="unknown Torch-Pruning criterion"):
        tp_prune(model, "hessian", 2.0, images, labels)
    with pytest.raises(ChanpruneError, match="not 5000"):
        tp_prune(model, "l1", 5000.0, images, labels)
