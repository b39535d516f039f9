"""Multi-branch machinery: residual correction, feature-map sampling, joint trunks, SE gates,
depthwise convs, channels-last Linear layers; exact when nothing is dropped, right shapes when
something is."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chanprune.io.checkpoint import load_model, save_model
from chanprune.graph import build_graph
from chanprune.layers import SelectedConv2d
from chanprune.pruner import prune

from conftest import outputs, prune_groups_directly, randomise, rel_error


class Block(nn.Module):
    """A basic residual block with a 1x1-conv shortcut where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        self.sum = nn.Identity()  # a handle on the block's output before its ReLU

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(self.sum(out + (x if self.downsample is None else self.downsample(x))))


class MiniResNet(nn.Module):
    def __init__(self, width: int = 12):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(Block(width, width), Block(width, width))
        self.layer2 = nn.Sequential(Block(width, 2 * width, 2), Block(2 * width, 2 * width))
        self.fc = nn.Linear(2 * width, 4)

    def forward(self, x):
        x = self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(c, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class MBConvNet(nn.Module):
    """Expand -> depthwise -> BN -> per-channel PReLU -> SE -> project, plus a residual add."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.expand = nn.Conv2d(8, 24, 1)
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.bn = nn.BatchNorm2d(24)
        self.act = nn.PReLU(24)
        self.se = SqueezeExcite(24, 6)
        self.project = nn.Conv2d(24, 8, 1)
        self.head = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = x + self.project(self.se(self.act(self.bn(self.dw(self.expand(x))))))
        return self.fc(F.relu(self.head(x)).mean((2, 3)))


class ChannelsLastMLP(nn.Module):
    """A ConvNeXt-style block: depthwise conv, permute to NHWC, LayerNorm, Linear MLP, permute back."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw1 = nn.Linear(c, 4 * c)
        self.pw2 = nn.Linear(4 * c, c)
        self.fc = nn.Linear(c, 4)

    def forward(self, x):
        x = self.stem(x)
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.pw2(F.gelu(self.pw1(y))).permute(0, 3, 1, 2)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x + y, 1), 1))


def make(cls, seed: int = 0) -> nn.Module:
    """A random model with non-trivial BatchNorm statistics, in eval mode."""
    return randomise(cls(), seed)


def images(n: int = 80, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def quiet_prune(model, x, speedup, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return prune(model, x, speedup, progress=False, samples_per_image=16, **options)


def full_widths(model: nn.Module, x: torch.Tensor, **options) -> dict[str, int]:
    """Every unit of a run at its full width."""
    from chanprune.config import PruneConfig
    from chanprune.units import pruning_units

    graph = build_graph(model, x[:1], warn=False)
    return {u.name: u.channels for u in pruning_units(graph, PruneConfig(**options))}


def test_resnet_graph_has_one_trunk_per_stage_with_every_writer_and_reader():
    graph = build_graph(make(MiniResNet), images(1))
    trunks = [g for g in graph.groups if g.residual]
    assert [g.name for g in trunks] == ["conv1", "layer2.0.conv2"]
    stage1, stage2 = trunks
    assert stage1.writers == ["conv1", "layer1.0.conv2", "layer1.1.conv2"]
    assert sorted(r.name for r in stage1.readers) == ["layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1",
                                                       "layer2.0.downsample.0"]
    assert stage2.writers == ["layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"]
    assert sorted(r.name for r in stage2.readers) == ["fc", "layer2.1.conv1"]
    shortcuts = {r.name: r.shortcut for g in graph.groups for r in g.readers if r.shortcut}
    assert set(shortcuts) == {"layer1.0.conv2", "layer1.1.conv2", "layer2.0.conv2", "layer2.1.conv2"}
    assert shortcuts["layer2.0.conv2"] == "layer2_0_downsample_1"


def block_sum(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last block's output before its ReLU (what its last conv is fitted to)."""
    captured = []
    handle = model.layer2[1].sum.register_forward_hook(lambda _m, _i, out: captured.append(out))
    outputs(model, x)
    handle.remove()
    return captured[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_residual_correction_lowers_the_block_output_error(seed):
    model, x = make(MiniResNet, seed), images(120, seed=seed + 5)
    errors = {}
    for correction in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            pruned, _ = prune(model, x, 2.0, progress=False, samples_per_image=64, residual_correction=correction,
                              recipe="paper")
        errors[correction] = rel_error(block_sum(pruned, x), block_sum(model, x))
    assert errors[True] < errors[False]


def test_feature_map_sampling_with_every_channel_kept_leaves_outputs_unchanged():
    model, x = make(MiniResNet), images(60)
    widths = {name: c for name, c in full_widths(model, x, recipe="paper").items() if name.startswith("select:")}
    assert sorted(widths) == ["select:layer1.0.conv1", "select:layer1.1.conv1", "select:layer2.0.conv1",
                              "select:layer2.0.downsample.0", "select:layer2.1.conv1"]
    pruned, _, _, _ = prune_groups_directly(model, x, widths, samples_per_image=16)
    # every channel kept: no select (it would copy the trunk for nothing), the conv reads all 12
    assert not isinstance(pruned.layer1[0].conv1, SelectedConv2d) and pruned.layer1[0].conv1.in_channels == 12
    assert rel_error(outputs(pruned, x), outputs(model, x)) < 1e-4


def test_feature_map_sampling_reads_subsets_and_survives_save_and_load(tmp_path):
    model, x = make(MiniResNet), images(60)
    pruned, report = quiet_prune(model, x, 1.6, recipe="paper")
    selects = [layer for layer in report.layers if layer.kind == "conv+select"]
    assert {layer.name for layer in selects} >= {"layer1.0.conv1", "layer1.1.conv1", "layer2.1.conv1"}
    conv = pruned.layer1[1].conv1
    assert isinstance(conv, SelectedConv2d) and conv.in_channels == len(conv.index) < 12
    assert pruned.conv1.out_channels == 12  # the trunk keeps every channel
    save_model(pruned, tmp_path / "p.safetensors")
    loaded = load_model(tmp_path / "p.safetensors", model=MiniResNet())
    torch.testing.assert_close(outputs(loaded, x), outputs(pruned, x))


@pytest.mark.parametrize("keep", [5, 9])
def test_joint_trunk_keeps_the_requested_count_in_every_writer_and_reader(keep):
    model, x = make(MiniResNet), images(60)
    pruned, report = quiet_prune(model, x, None, trunk="joint", widths={"group:conv1": keep})
    for name in ("conv1", "layer1.0.conv2", "layer1.1.conv2"):
        assert pruned.get_submodule(name).out_channels == keep
    for name in ("bn1", "layer1.0.bn2", "layer1.1.bn2"):
        assert pruned.get_submodule(name).num_features == keep
    for name in ("layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0"):
        assert pruned.get_submodule(name).in_channels == keep
    assert pruned.layer2[0].conv2.out_channels == 24
    trunk = [layer for layer in report.layers if layer.kind == "trunk"]
    assert [(t.name, t.in_channels_after, len(t.kept_indices)) for t in trunk] == [("trunk:conv1", keep, keep)]
    assert outputs(pruned, x).shape == (60, 4)


def test_joint_trunk_at_full_width_leaves_outputs_unchanged():
    model, x = make(MiniResNet), images(60)
    widths = full_widths(model, x, trunk="joint")
    assert {"conv1", "layer2.0.conv2", "layer1.0.conv1"} <= set(widths)
    pruned, _, _, _ = prune_groups_directly(model, x, widths, samples_per_image=16, trunk="joint", ridge=1e-10)
    assert rel_error(outputs(pruned, x), outputs(model, x)) < 1e-4


def test_se_depthwise_and_prelu_follow_the_expanded_channels():
    model, x = make(MBConvNet), images(60)
    graph = build_graph(model, x[:1], warn=False)
    expanded = graph.group("expand")
    assert expanded.writers == ["expand", "se.fc2"]
    assert expanded.followers == ["dw", "bn", "act"]
    assert sorted(r.name for r in expanded.readers) == ["project", "se.fc1"]
    assert graph.depthwise == {"dw"}
    same, _, _, _ = prune_groups_directly(model, x, full_widths(model, x), samples_per_image=16)
    assert rel_error(outputs(same, x), outputs(model, x)) < 1e-4
    pruned, _ = quiet_prune(model, x, None, widths={"project": 10})
    assert pruned.expand.out_channels == pruned.se.fc2.out_channels == pruned.dw.out_channels == 10
    assert pruned.dw.groups == 10 and pruned.bn.num_features == 10 and pruned.act.num_parameters == 10
    assert pruned.se.fc1.in_channels == pruned.project.in_channels == 10
    assert outputs(pruned, x).shape == outputs(model, x).shape


def test_channels_last_linear_reads_the_permuted_channels():
    model, x = make(ChannelsLastMLP), images(40)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = build_graph(model, x[:1])
    hidden = graph.group("pw1")
    assert [(r.name, r.layout) for r in hidden.readers] == [("pw2", "nhwc")]
    assert hidden.prunable
    stem = graph.group("stem")
    assert not stem.prunable and any("LayerNorm" in why for why in stem.blocked_by)
    assert any("LayerNorm" in str(w.message) for w in caught)
    same, _, _, _ = prune_groups_directly(model, x, {"pw1": 32}, samples_per_image=16)
    assert rel_error(outputs(same, x), outputs(model, x)) < 1e-4
    pruned, _ = quiet_prune(model, x, None, widths={"pw2": 12}, feature_map_sampling=False)
    assert pruned.pw1.out_features == 12 and pruned.pw2.in_features == 12
    assert outputs(pruned, x).shape == (40, 4)
