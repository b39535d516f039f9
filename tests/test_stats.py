"""Patch sampling and moment collection against explicit unfold / forward passes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chanprune.graph import build_graph
from chanprune.stats import Positions, collect_moments, conv_patches, record_targets, sample_positions
from chanprune.surgery import folded_weight

from conftest import make_tiny, random_images

# (in, out, kernel, stride, padding, dilation)
CONV_CASES = [
    (3, 5, (3, 2), 2, 1, 2),
    (4, 3, (1, 3), (2, 1), (0, 1), (1, 2)),
    (2, 4, 3, 1, 0, 1),
    (3, 2, (2, 4), 3, (2, 0), (2, 1)),
    (5, 4, (5, 3), 1, 2, 1),
]


def make_conv(case, seed=0, bias=True) -> nn.Conv2d:
    torch.manual_seed(seed)
    cin, cout, k, s, p, d = case
    return nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, bias=bias)


def all_positions(batch: int, h: int, w: int) -> Positions:
    return sample_positions(batch, h, w, h * w, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_patches_equal_unfold_columns(case):
    conv = make_conv(case)
    x = random_images(3, (case[0], 11, 9), seed=4)
    with torch.no_grad():
        out = conv(x)
    h, w = out.shape[2:]
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    assert cols.shape[2] == h * w
    pos = sample_positions(3, h, w, 7, torch.Generator().manual_seed(1))
    patches = conv_patches(conv, x, pos)
    assert patches.shape == (len(pos.image), case[0] * conv.kernel_size[0] * conv.kernel_size[1])
    expected = cols[pos.image, :, pos.row * w + pos.col]
    assert torch.equal(patches, expected)
    # and the patches reproduce the conv's output at those positions
    with torch.no_grad():
        y = patches @ conv.weight.reshape(conv.out_channels, -1).T + conv.bias
    torch.testing.assert_close(y, out[pos.image, :, pos.row, pos.col], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel, dilation", [((3, 5), (1, 2)), ((1, 3), 1)])
def test_conv_patches_same_and_valid_padding_odd_kernels(kernel, dilation):
    for padding in ("same", "valid"):
        conv = nn.Conv2d(3, 4, kernel, padding=padding, dilation=dilation)
        x = random_images(2, (3, 10, 12), seed=5)
        with torch.no_grad():
            out = conv(x)
        pos = all_positions(2, *out.shape[2:])
        with torch.no_grad():
            y = conv_patches(conv, x, pos) @ conv.weight.reshape(4, -1).T + conv.bias
        torch.testing.assert_close(y, out[pos.image, :, pos.row, pos.col], rtol=1e-5, atol=1e-5)


def test_conv_patches_same_padding_even_kernel():
    conv = nn.Conv2d(3, 4, (2, 4), padding="same")
    x = random_images(2, (3, 6, 7), seed=5)
    with torch.no_grad():
        out = conv(x)
        pos = all_positions(2, *out.shape[2:])
        y = conv_patches(conv, x, pos) @ conv.weight.reshape(4, -1).T + conv.bias
    torch.testing.assert_close(y, out[pos.image, :, pos.row, pos.col], rtol=1e-5, atol=1e-5)


def test_sample_positions_distinct_and_in_range():
    g = torch.Generator().manual_seed(0)
    pos = sample_positions(4, 5, 6, 7, g)
    assert len(pos.image) == 28
    assert pos.image.tolist() == [i for i in range(4) for _ in range(7)]
    assert int(pos.row.min()) >= 0 and int(pos.row.max()) < 5
    assert int(pos.col.min()) >= 0 and int(pos.col.max()) < 6
    for i in range(4):
        sel = pos.image == i
        flat = (pos.row[sel] * 6 + pos.col[sel]).tolist()
        assert len(set(flat)) == 7
    # a map smaller than per_image: every position exactly once
    small = sample_positions(2, 2, 3, 50, g)
    assert len(small.image) == 12
    assert sorted(zip(small.image.tolist(), small.row.tolist(), small.col.tolist())) == \
        [(i, r, c) for i in range(2) for r in range(2) for c in range(3)]
    # seeded: the same generator state gives the same positions
    a = sample_positions(3, 4, 4, 5, torch.Generator().manual_seed(9))
    b = sample_positions(3, 4, 4, 5, torch.Generator().manual_seed(9))
    assert torch.equal(a.row, b.row) and torch.equal(a.col, b.col)


def _explicit_reader_data(model, images, reader: str, targets):
    """Explicit X (patches of the reader's input at the recorded positions) and Y (recorded targets)."""
    inputs = []
    handle = model.get_submodule(reader).register_forward_pre_hook(lambda m, i: inputs.append(i[0].clone()))
    with torch.no_grad():
        for batch in targets.batches():
            model(batch)
    handle.remove()
    layer = model.get_submodule(reader)
    xs = []
    for b, x in enumerate(inputs):
        pos = targets.positions[reader][b]
        if isinstance(layer, nn.Conv2d):
            cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                            stride=layer.stride)
            w_out = (x.shape[3] + 2 * layer.padding[1] - layer.dilation[1] * (layer.kernel_size[1] - 1) - 1) \
                // layer.stride[1] + 1
            xs.append(cols[pos.image, :, pos.row * w_out + pos.col])
        else:
            xs.append(x.reshape(len(x), -1)[pos.image])
    return torch.cat(xs), torch.cat(targets.outputs[reader])


@pytest.mark.parametrize("reader", ["conv2", "conv3", "fc1"])
def test_collect_moments_equal_explicit_sample_matrices(reader):
    model = make_tiny(0)
    images = random_images(50)
    graph = build_graph(model, images[:1])
    targets = record_targets(graph, images, samples_per_image=5, seed=3, batch_size=16)
    readers = [r for g in graph.prunable() for r in g.readers if r.name == reader]
    fit, held = collect_moments(graph.gm, readers, targets, heldout_every=10)[reader]
    x, y = _explicit_reader_data(model, images, reader, targets)
    per_image = 5 if reader != "fc1" else 1
    assert fit.count + held.count == len(x) == 50 * per_image
    assert held.count == 5 * per_image  # images 9, 19, 29, 39, 49
    xd, yd = x.double(), y.double()
    torch.testing.assert_close(fit.xtx + held.xtx, xd.T @ xd, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fit.xty + held.xty, xd.T @ yd, rtol=1e-5, atol=1e-4)
    assert fit.yty + held.yty == pytest.approx(float(yd.square().sum()), rel=1e-6)
    # the held-out images are every 10th image across batches of 16
    image_ids = torch.cat([pos.image + 16 * b for b, pos in enumerate(targets.positions[reader])])
    held_rows = image_ids % 10 == 9
    torch.testing.assert_close(held.sum_x, xd[held_rows].sum(0), rtol=1e-5, atol=1e-4)


def test_targets_are_folded_pre_activation_outputs():
    model = make_tiny(0)
    images = random_images(20)
    graph = build_graph(model, images[:1])
    targets = record_targets(graph, images, samples_per_image=4, seed=0, batch_size=8)
    # conv2 is followed by bn2: its targets are conv2 + bn2 as one affine map, before the ReLU
    w, b = folded_weight(model.conv2, model.bn2)
    with torch.no_grad():
        a1 = model.relu1(model.bn1(model.conv1(images)))
        folded = F.conv2d(a1.double(), w.reshape(model.conv2.weight.shape), b, padding=1)
    got = torch.cat(targets.outputs["conv2"]).double()
    pos = targets.positions["conv2"]
    expected = torch.cat([folded[8 * i:8 * i + 8][p.image, :, p.row, p.col] for i, p in enumerate(pos)])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (got < 0).any(), "targets are taken before the ReLU"
    assert all(len(p.image) == min(8, 20 - 8 * i) * 4 for i, p in enumerate(pos))
