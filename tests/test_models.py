"""The bundled ResNet / Xception reference models: structure, sizes, and the shipped checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from chanprune.io.provenance import input_shape
from chanprune.io.state_file import load_state_file
from chanprune.data import mnist_split
from chanprune.evaluate import accuracy
from chanprune.flops import count_flops, count_params
from chanprune.models import BUNDLED, create_model

# name -> (parameters, FLOPs at 1x1x32x32, blocks with a projection shortcut)
EXPECTED = {
    "resnet20-mnist": (272_186, 81_036_544, ("layer2.0", "layer3.0")),
    "resnet56-mnist": (855_482, 250_905_856, ("layer2.0", "layer3.0")),
    "resnet50-mnist": (1_483_898, 162_310_144, ("layer1.0", "layer2.0", "layer3.0", "layer4.0")),
    "xception50-mnist": (865_546, 97_228_800, ("layer1.0", "layer2.0", "layer3.0", "layer4.0")),
}
NAMES = list(EXPECTED)
BLOCKS = {"resnet20-mnist": (3, 3, 3), "resnet56-mnist": (9, 9, 9), "resnet50-mnist": (3, 4, 6, 3),
          "xception50-mnist": (3, 4, 6, 3)}


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: create_model(name, pretrained=False) for name in NAMES}


def _blocks(model: nn.Module):
    for i in range(1, model.num_stages + 1):
        for j, block in enumerate(getattr(model, f"layer{i}")):
            yield f"layer{i}.{j}", block


@pytest.mark.parametrize("name", NAMES)
def test_registered(name):
    entry = BUNDLED[name]
    assert (entry.dataset, entry.input_size, entry.in_chans) == ("mnist", (32, 32), 1)
    assert entry.checkpoint.name == f"{name}.safetensors"


@pytest.mark.parametrize("name", NAMES)
def test_forward_shape(models, name):
    model = models[name]
    assert not model.training
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert input_shape(model) == (1, 32, 32)


@pytest.mark.parametrize("name", NAMES)
def test_size(models, name):
    params, flops, _ = EXPECTED[name]
    assert count_params(models[name]) == params
    assert count_flops(models[name], (1, 1, 32, 32)) == flops


@pytest.mark.parametrize("name", NAMES)
def test_torchvision_names(models, name):
    model = models[name]
    for attr, kind in [("conv1", nn.Conv2d), ("bn1", nn.BatchNorm2d), ("relu", nn.ReLU),
                       ("avgpool", nn.AdaptiveAvgPool2d), ("fc", nn.Linear)]:
        assert isinstance(getattr(model, attr), kind)
    assert model.conv1.stride == (1, 1) and model.conv1.kernel_size == (3, 3)
    assert tuple(len(getattr(model, f"layer{i}")) for i in range(1, model.num_stages + 1)) == BLOCKS[name]
    mid = {"resnet20-mnist": ["conv2"], "resnet56-mnist": ["conv2"], "resnet50-mnist": ["conv2", "conv3"],
           "xception50-mnist": ["conv2_dw", "bn2_dw", "conv2_pw", "conv3"]}[name]
    for _, block in _blocks(model):
        for child in ["conv1", "bn1", "bn2", *mid]:
            assert hasattr(block, child), child


@pytest.mark.parametrize("name", NAMES)
def test_downsample(models, name):
    model = models[name]
    with_projection = [n for n, block in _blocks(model) if block.downsample is not None]
    assert tuple(with_projection) == EXPECTED[name][2]
    strides = {"layer1": 1, "layer2": 2, "layer3": 2, "layer4": 2}
    for n in with_projection:
        down = model.get_submodule(f"{n}.downsample")
        assert isinstance(down, nn.Sequential) and [k for k, _ in down.named_children()] == ["0", "1"]
        conv, bn = down[0], down[1]
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        assert conv.kernel_size == (1, 1) and conv.bias is None
        assert conv.stride == (strides[n.split(".")[0]],) * 2
        assert bn.num_features == conv.out_channels


@pytest.mark.parametrize("name", ["resnet50-mnist", "xception50-mnist"])
def test_bottleneck_stride_on_middle_conv(models, name):
    widths = {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}
    for n, block in _blocks(models[name]):
        mid = block.conv2_dw if hasattr(block, "conv2_dw") else block.conv2
        first = n.endswith(".0") and not n.startswith("layer1")
        assert block.conv1.stride == (1, 1) and block.conv3.stride == (1, 1)
        assert mid.stride == ((2, 2) if first else (1, 1))
        assert block.conv3.out_channels == widths[n.split(".")[0]] == 4 * block.conv1.out_channels


@pytest.mark.parametrize("name", NAMES)
def test_depthwise_convs(models, name):
    convs = {n: m for n, m in models[name].named_modules() if isinstance(m, nn.Conv2d)}
    grouped = {n: m for n, m in convs.items() if m.groups != 1}
    if name != "xception50-mnist":
        assert not grouped
        return
    assert sorted(grouped) == sorted(n for n in convs if n.endswith("conv2_dw"))
    assert len(grouped) == 16
    for n, conv in grouped.items():
        assert conv.groups == conv.in_channels == conv.out_channels and conv.kernel_size == (3, 3), n
        pointwise = convs[n.replace("conv2_dw", "conv2_pw")]
        assert pointwise.kernel_size == (1, 1) and pointwise.in_channels == conv.out_channels


@pytest.mark.parametrize("name", NAMES)
def test_shortcut_add_takes_bn_output(models, name):
    """Every residual add reads the branch's last BN directly (the pruner looks for bn -> add)."""
    model = models[name]
    last_bn = "bn2" if name in ("resnet20-mnist", "resnet56-mnist") else "bn3"
    traced = fx.symbolic_trace(model)
    adds = [node for node in traced.graph.nodes if node.op == "call_function" and "add" in str(node.target)]
    assert len(adds) == sum(BLOCKS[name])
    for node, (block_name, block) in zip(adds, _blocks(model)):
        branch, identity = node.args
        assert branch.op == "call_module" and branch.target == f"{block_name}.{last_bn}"
        if block.downsample is not None:
            assert identity.op == "call_module" and identity.target == f"{block_name}.downsample.1"


@pytest.mark.parametrize("name", NAMES)
def test_pretrained_checkpoint(name):
    model = create_model(name, pretrained=True)
    state, meta = load_state_file(BUNDLED[name].checkpoint)
    assert meta["model"] == name and meta["command"].startswith(f"chanprune train --model {name} ")
    assert set(state) == set(model.state_dict())
    assert accuracy(model, mnist_split("test")) >= 0.97
