"""Shared tiny models, data and helpers for the chanprune tests.

The model classes live here (not in a test module) so that ``chanprune.io.checkpoint`` can rebuild
them by their import reference ``conftest:<Class>`` when a pruned model is loaded again.
Every model takes no constructor arguments; ``make_*`` helpers give them seeded, non-trivial
weights and BatchNorm statistics (eval-mode BN is then a real affine map, not the identity).
"""

from __future__ import annotations

import copy
import math
import os
from collections import OrderedDict

import pytest
import torch
from torch import nn

from chanprune import load_model, save_model
from chanprune.errors import ChanpruneError
from chanprune.export import check_onnx, export_onnx
from chanprune.folding import FOLD_OP
from chanprune.functional_convs import CONV_MODULE_OP
from chanprune.graph import build_graph
from chanprune.io.libraries import import_library
from chanprune.config import PruneConfig
from chanprune.engine.calibration import Calibration, Sampling
from chanprune.engine.store import BatchStore
from chanprune.engine.run import PruneRun, prune_units
from chanprune.surgery import replay
from chanprune.units import pruning_units

IMAGE_SHAPE = (3, 8, 8)

# The tests run tiny tensors, where intra-op threads cost more than they give (several times slower
# on a busy 2-core machine); one thread keeps the suite fast and its timings steady.
torch.set_num_threads(1)


class TinyCNN(nn.Sequential):
    """conv(3->8)+BN+ReLU -> conv(8->12)+BN+ReLU -> pool -> conv(12->16)+ReLU (no BN, no bias)
    -> pool -> flatten (16 x 2x2) -> fc1 -> ReLU -> fc2, for 3x8x8 inputs."""

    def __init__(self):
        super().__init__(OrderedDict(
            conv1=nn.Conv2d(3, 8, 3, padding=1, bias=False), bn1=nn.BatchNorm2d(8), relu1=nn.ReLU(),
            conv2=nn.Conv2d(8, 12, 3, padding=1, bias=False), bn2=nn.BatchNorm2d(12), relu2=nn.ReLU(inplace=True),
            pool1=nn.MaxPool2d(2),
            conv3=nn.Conv2d(12, 16, 3, padding=1, bias=False), relu3=nn.ReLU(),
            pool2=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            fc1=nn.Linear(16 * 2 * 2, 24), relu4=nn.ReLU(),
            fc2=nn.Linear(24, 5),
        ))


class OddCNN(nn.Sequential):
    """Convs with stride 2, dilation 2, non-square kernels and a conv with a bias, for 3x9x10 inputs."""

    def __init__(self):
        super().__init__(OrderedDict(
            conv1=nn.Conv2d(3, 6, (3, 2), stride=2, padding=1, bias=False), bn1=nn.BatchNorm2d(6), relu1=nn.ReLU(),
            conv2=nn.Conv2d(6, 10, (2, 3), dilation=2, padding=(1, 2), bias=True), relu2=nn.ReLU(),
            conv3=nn.Conv2d(10, 8, 1), bn3=nn.BatchNorm2d(8), relu3=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            fc=nn.Linear(8, 4),
        ))


ODD_SHAPE = (3, 9, 10)


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # timm never reaches for the network in tests


def vision_libraries() -> tuple[object, object | None]:
    """(torchvision, timm or None) imported as chanprune imports them; skips where torchvision is
    not installed (``make test`` installs it, so CI never skips)."""
    try:
        torchvision = import_library("torchvision")
    except ChanpruneError as err:
        if "not installed" in str(err):
            pytest.skip(str(err))
        raise
    try:
        timm = import_library("timm")
    except ChanpruneError as err:
        if "not installed" not in str(err):
            raise
        timm = None
    return torchvision, timm


def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Seeded weights, biases and BatchNorm statistics; returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
    return model.eval()


def make_tiny(seed: int = 0) -> TinyCNN:
    return randomise(TinyCNN(), seed)


def make_odd(seed: int = 0) -> OddCNN:
    return randomise(OddCNN(), seed)


def random_images(n: int, shape: tuple[int, ...] = IMAGE_SHAPE, seed: int = 1) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def outputs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model.eval()(images)


def prune_groups_directly(model: nn.Module, images: torch.Tensor, widths: dict[str, int],
                          method: str = "lasso", samples_per_image: int = 10, recipe: str = "paper", **cfg_options):
    """The pruner's loop without its ``width < channels`` filter: every unit named in ``widths``
    goes through ``PruneRun.prune_unit`` (so full widths exercise the reconstruction too). The
    paper's recipe by default: trunks kept, read through channel selects."""
    original = model.eval()
    graph = build_graph(original, images[:1])
    cfg = PruneConfig(speedup=None, widths=widths, method=method, samples_per_image=samples_per_image,
                      recipe=recipe, **cfg_options)
    run = PruneRun(graph, cfg)
    units = [u for u in pruning_units(graph, cfg) if u.name in widths]
    with BatchStore(2**30, torch.device("cpu")) as store:
        calibration = Calibration(graph, run.work, copy.deepcopy(graph.gm), images, cfg.batch_size,
                                  Sampling(samples_per_image, cfg.seed, cfg.heldout_every),
                                  [r for u in units for r in u.readers], store, images.shape[1])
        prune_units(run, calibration, units, widths)
    return run.result(original), run.errors, run.plan, graph


@pytest.fixture
def tiny_model() -> TinyCNN:
    return make_tiny(0)


@pytest.fixture
def tiny_images() -> torch.Tensor:
    return random_images(200)


def assert_round_trips(pruned: nn.Module, fresh: nn.Module, x: torch.Tensor, folder, onnx: bool = True) -> None:
    """``pruned`` saved and loaded onto ``fresh`` (an unpruned instance of its architecture)
    computes what it computes on ``x``; with ``onnx``, its ONNX export agrees with it."""
    save_model(pruned, folder / "m.safetensors")
    again = load_model(folder / "m.safetensors", model=fresh)
    with torch.no_grad():
        torch.testing.assert_close(again(x), pruned(x))
    if onnx:
        export_onnx(pruned, folder / "m.onnx", tuple(x.shape[1:]))
        assert check_onnx(pruned, folder / "m.onnx", tuple(x.shape[1:]))["ok"]


def zeroed_reference(model: nn.Module, plan) -> tuple[nn.Module, int]:
    """A copy of ``model`` whose layers read zeros wherever the plan removed one of their input
    channels, and the number of input channels zeroed.

    ``keep_inputs`` / ``select_inputs`` indices (and the ``permute_inputs`` orders of a rewritten
    channel shuffle) are in the layer's input coordinates at the time of the op; composing them in
    order gives the kept channels in the original coordinates. Convs the plan folds (weight
    standardization) or makes modules (functional convs) are so in the copy first, since the zeros
    go into their weights there.
    """
    reference = replay(copy.deepcopy(model), [op for op in plan if op.op in (CONV_MODULE_OP, FOLD_OP)])
    kept: dict[str, tuple[torch.Tensor, int]] = {}
    for op in plan:
        if op.op not in ("keep_inputs", "select_inputs", "permute_inputs"):
            continue
        layer = reference.get_submodule(op.layer)
        if op.layer not in kept:  # a channel owns channel_size features (Linear) or input channels (conv)
            n = (layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels) // op.channel_size
            kept[op.layer] = (torch.arange(n), op.channel_size)
        index, size = kept[op.layer]
        assert size == op.channel_size, f"{op.layer}: channel size changed between plan operations"
        kept[op.layer] = (index[torch.tensor(op.keep, dtype=torch.long)], size)
    zeroed = 0
    with torch.no_grad():
        for name, (index, size) in kept.items():
            layer = reference.get_submodule(name)
            assert isinstance(layer, (nn.Conv2d, nn.Linear)), name
            n = (layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels) // size
            removed = torch.ones(n, dtype=torch.bool)
            removed[index] = False
            zeroed += int(removed.sum())
            removed = removed.repeat_interleave(size)
            if isinstance(layer, nn.Linear):
                layer.weight[:, removed] = 0
            else:  # conv group j's filters read input j * width + i as their column i
                width, filters = layer.in_channels // layer.groups, layer.out_channels // layer.groups
                for c in removed.nonzero().flatten().tolist():
                    layer.weight[(c // width) * filters:(c // width + 1) * filters, c % width] = 0
    return reference, zeroed


def assert_exact_against_zeroed(model: nn.Module, pruned: nn.Module, x: torch.Tensor, zeroed: int) -> None:
    """``pruned`` (no reconstruction) computes in float64 what ``model`` computes with the removed
    input channels zeroed (``zeroed`` of them), and that differs from ``model`` itself."""
    from chanprune.io.provenance import provenance

    reference, count = zeroed_reference(model, provenance(pruned).plan)
    assert count == zeroed
    torch.testing.assert_close(in_float64(pruned, x), in_float64(reference, x), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(in_float64(model, x), in_float64(reference, x), rtol=1e-4)


def in_float64(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` computed in float64 on a copy (the model keeps its dtype): comparisons of
    outputs that should be equal then differ only by summation order."""
    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double())
