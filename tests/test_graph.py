"""Channel groups: who writes, follows and reads each set of channels; unsupported ops block."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chanprune.errors import ChanpruneError
from chanprune.graph import build_graph
from chanprune.models import create_model
from chanprune.pruner import prune

from conftest import make_tiny, outputs, prune_groups_directly, random_images, rel_error

VGG_CONVS = [f"features.conv{s}_{i}" for s, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)) for i in range(1, n + 1)]
VGG_WIDTHS = [32, 32, 64, 64, 128, 128, 128, 256, 256, 256, 256, 256, 256]


@pytest.fixture(scope="module")
def vgg_graph():
    model = create_model("vgg16-mnist", pretrained=False)
    return build_graph(model, torch.zeros(1, 1, 32, 32))


def test_vgg_groups_writers_followers_readers(vgg_graph):
    groups = vgg_graph.groups
    assert len(groups) == 15
    for i, (conv, width) in enumerate(zip(VGG_CONVS, VGG_WIDTHS)):
        g = groups[i]
        assert g.name == g.writer == f"{conv}.conv"
        assert g.channels == width
        assert g.followers == [f"{conv}.bn"]
        assert g.prunable and g.blocked_by == []
        assert len(g.readers) == 1
        reader = g.readers[0]
        if i + 1 < len(VGG_CONVS):
            nxt = VGG_CONVS[i + 1]
            assert (reader.name, reader.kind, reader.channel_size, reader.bn) == (f"{nxt}.conv", "conv", 1, f"{nxt}.bn")
        else:  # 32 / 2^5 = a 1x1 map: fc1 reads one feature per channel
            assert (reader.name, reader.kind, reader.channel_size, reader.bn) == ("classifier.fc1", "linear", 1, None)
    fc1, fc2 = groups[13], groups[14]
    assert (fc1.writer, fc1.channels, fc1.followers) == ("classifier.fc1", 256, [])
    assert [(r.name, r.kind) for r in fc1.readers] == [("classifier.fc2", "linear")]
    assert fc1.prunable
    assert fc2.channels == 10 and not fc2.prunable and fc2.readers == []
    assert "model output" in " ".join(fc2.blocked_by)
    assert len(vgg_graph.prunable()) == 14
    assert vgg_graph.group("features.conv3_2.conv").channels == 128
    with pytest.raises(KeyError):
        vgg_graph.group("nope")
    assert vgg_graph.layer_kinds["classifier.fc1"] == "linear"
    assert vgg_graph.layer_kinds["features.conv1_1.conv"] == "conv"


def test_linear_after_flatten_of_a_2x2_map():
    model = make_tiny(0)
    images = random_images(120)
    graph = build_graph(model, images[:1])
    g = graph.group("conv3")
    assert [(r.name, r.kind, r.channel_size) for r in g.readers] == [("fc1", "linear", 4)]
    assert g.followers == []
    pruned, errors, _, _ = prune_groups_directly(model, images, {"conv3": 6})
    kept = errors["fc1"]["kept_indices"]
    assert len(kept) == 6
    assert pruned.conv3.out_channels == 6
    assert pruned.fc1.in_features == 24 and pruned.fc1.weight.shape == (24, 24)
    assert outputs(pruned, images[:4]).shape == (4, 5)
    # fc1 keeps the 4 columns of every kept channel, in order (before the least-squares rewrite)
    plain, _, _, _ = prune_groups_directly(model, images, {"conv3": 6}, reconstruct=False)
    cols = torch.tensor([4 * c + j for c in kept for j in range(4)])
    assert torch.equal(plain.fc1.weight, model.fc1.weight[:, cols])


class ViewHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 5, 3, stride=2, padding=1)
        self.fc = nn.Linear(5 * 4 * 4, 3)
        self.fc_bad = nn.Linear(4, 3)

    def forward(self, x):
        y = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(y.view(y.size(0), -1)) + 0 * self.fc_bad(y).sum()


def test_view_flatten_reader_and_linear_on_last_axis():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        graph = build_graph(ViewHead().eval(), torch.zeros(1, 3, 8, 8))
    g = graph.group("conv2")
    # fc reads the 4x4 map flattened: 16 features per channel; fc_bad reads the width axis, not the
    # channels, so the group is blocked
    assert [(r.name, r.channel_size) for r in g.readers] == [("fc", 16)]
    assert not g.prunable
    assert any("fc_bad" in why for why in g.blocked_by)
    assert graph.group("conv1").prunable


class WithAdd(nn.Module):
    """A residual add on conv1's channels; conv3 -> conv4 is an ordinary chain."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 6, 3, padding=1)
        self.conv4 = nn.Conv2d(6, 5, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x) + x)
        x = torch.relu(self.conv4(torch.relu(self.conv3(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class WithShuffle(nn.Module):
    """A channel shuffle (view / transpose / reshape) on conv1's channels, which conv2 reads."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 6, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        x = self.conv3(torch.relu(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class WithCat(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 4, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 1)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        x = torch.relu(self.conv2(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def seeded(cls) -> nn.Module:
    torch.manual_seed(0)
    return cls().eval()


def graph_with_warnings(model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = build_graph(model, torch.zeros(1, 3, 8, 8))
    return graph, [str(w.message) for w in caught]


def prune_one_group(model, reader: str, keep: int, **options):
    """prune() keeping ``keep`` input channels of ``reader`` (and of every layer sharing them)."""
    images = random_images(60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return prune(model, images, None, widths={reader: keep}, samples_per_image=8, progress=False,
                     feature_map_sampling=False, **options), images


def test_residual_add_ties_both_writers_into_one_trunk_group():
    model = seeded(WithAdd)
    graph, messages = graph_with_warnings(model)
    trunk = graph.group("conv1")
    assert messages == []
    assert trunk.residual and trunk.prunable and trunk.writers == ["conv1", "conv2"]
    assert [r.name for r in trunk.readers] == ["conv2", "conv3"]
    assert trunk.readers[0].shortcut == "relu"  # conv2's output is added to relu(conv1(x))
    assert not graph.group("conv3").residual
    (pruned, report), images = prune_one_group(model, "conv2", 5, trunk="joint")
    assert pruned.conv1.out_channels == pruned.conv2.in_channels == pruned.conv2.out_channels == 5
    assert pruned.conv3.in_channels == 5 and pruned.conv3.out_channels == 6
    assert [layer.kind for layer in report.layers if layer.name.startswith("trunk:")] == ["trunk"]
    assert torch.isfinite(outputs(pruned, images)).all()
    assert rel_error(outputs(pruned, images), outputs(model, images)) < 0.5


def test_trunk_keep_leaves_the_residual_channels_whole():
    model = seeded(WithAdd)
    (pruned, _), _ = prune_one_group(model, "conv4", 3, trunk="keep")
    assert pruned.conv1.out_channels == pruned.conv2.out_channels == pruned.conv3.in_channels == 8
    assert pruned.conv3.out_channels == 3 and pruned.conv4.in_channels == 3


def test_channel_shuffle_is_rewritten_so_its_group_prunes():
    """The shuffle becomes slices of conv1's output and conv2's input columns follow the new order
    (``chanprune.shuffle``): conv1's channels prune like any other, and keeping them all is exact."""
    model = seeded(WithShuffle)
    graph, messages = graph_with_warnings(model)
    assert messages == []
    assert [(r.op, r.layer) for r in graph.rewrites] == [("slice_shuffle", "reshape"), ("permute_inputs", "conv2")]
    assert graph.group("conv1").prunable and graph.group("conv2").prunable
    (pruned, _), images = prune_one_group(model, "conv2", 4)
    assert pruned.conv1.out_channels == 4 and pruned.conv2.in_channels == 4
    assert pruned.conv2.out_channels == 8 and pruned.conv3.in_channels == 8
    assert outputs(pruned, images).shape == outputs(model, images).shape
    same, _, _, _ = prune_groups_directly(model, random_images(40), {"conv2": 8})
    assert rel_error(outputs(same, images), outputs(model, images)) < 1e-4


def test_concat_lays_groups_side_by_side_for_their_reader():
    model = seeded(WithCat)
    graph, messages = graph_with_warnings(model)
    assert messages == []
    assert graph.layouts["conv2"] == ["a", "b"]
    for name in ("a", "b"):
        assert graph.group(name).prunable and [r.name for r in graph.group(name).readers] == ["conv2"]
    (pruned, report), images = prune_one_group(model, "group:b", 2)
    assert pruned.a.out_channels == 4 and pruned.b.out_channels == 2 and pruned.conv2.in_channels == 6
    assert torch.isfinite(outputs(pruned, images)).all()
    same, _, _, _ = prune_groups_directly(model, random_images(40), {"a": 4, "b": 4})
    assert rel_error(outputs(same, images), outputs(model, images)) < 1e-4


def test_concat_reader_shares_the_kept_set_of_the_group_it_reads():
    model = seeded(WithCat)
    g1 = build_graph(model, torch.zeros(1, 3, 8, 8)).group("conv1")
    assert g1.prunable and sorted(r.name for r in g1.readers) == ["a", "b"]
    (pruned, report), images = prune_one_group(model, "a", 5)
    assert pruned.conv1.out_channels == 5 and pruned.a.in_channels == 5 and pruned.b.in_channels == 5
    assert pruned.a.out_channels == 4 and pruned.b.out_channels == 4 and pruned.conv2.in_channels == 8
    # both readers of the shared channels get the same kept set
    kept = {layer.name: layer.kept_indices for layer in report.layers if layer.kept_indices}
    assert kept["a"] == kept["b"] and len(kept["a"]) == 5
    assert torch.isfinite(outputs(pruned, images)).all()


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return x


def test_untraceable_or_wrong_input_size_is_a_chanprune_error():
    with pytest.raises(ChanpruneError, match="trace"):
        build_graph(DataDependent(), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ChanpruneError, match="input"):
        build_graph(make_tiny(0), torch.zeros(1, 3, 16, 16))  # fc1 expects a 2x2 map


def test_no_warning_for_a_plain_chain():
    _, messages = graph_with_warnings(make_tiny(0))
    assert messages == []
