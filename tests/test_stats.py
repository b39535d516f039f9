"""Patch sampling and moment collection against explicit unfold / forward passes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chanprune.graph import build_graph
from chanprune.engine.calibration import Calibration, Sampling, unpruned_moments
from chanprune.engine.store import BatchStore
from chanprune.stats import Moments, Positions, block_indices, conv_patches, sample_positions
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
    return sample_positions(torch.arange(batch), h, w, h * w, 0)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_patches_equal_unfold_columns(case):
    conv = make_conv(case)
    x = random_images(3, (case[0], 11, 9), seed=4)
    with torch.no_grad():
        out = conv(x)
    h, w = out.shape[2:]
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    assert cols.shape[2] == h * w
    pos = sample_positions(torch.arange(3), h, w, 7, 1)
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
    pos = sample_positions(torch.arange(4), 5, 6, 7, 0)
    assert len(pos.image) == 28
    assert pos.image.tolist() == [i for i in range(4) for _ in range(7)]
    assert int(pos.row.min()) >= 0 and int(pos.row.max()) < 5
    assert int(pos.col.min()) >= 0 and int(pos.col.max()) < 6
    for i in range(4):
        sel = pos.image == i
        flat = (pos.row[sel] * 6 + pos.col[sel]).tolist()
        assert len(set(flat)) == 7
    # a map smaller than per_image: every position exactly once
    small = sample_positions(torch.arange(2), 2, 3, 50, 0)
    assert len(small.image) == 12
    assert sorted(zip(small.image.tolist(), small.row.tolist(), small.col.tolist())) == \
        [(i, r, c) for i in range(2) for r in range(2) for c in range(3)]
    # an image's positions depend on its index and the key, not on its batch
    a = sample_positions(torch.arange(10, 16), 8, 8, 5, 9)
    b = sample_positions(torch.arange(13, 16), 8, 8, 5, 9)
    assert torch.equal(a.row[15:], b.row) and torch.equal(a.col[15:], b.col)
    c = sample_positions(torch.arange(13, 16), 8, 8, 5, 10)
    assert not (torch.equal(c.row, b.row) and torch.equal(c.col, b.col))
    # spread: over many images every position is drawn about equally often
    many = sample_positions(torch.arange(4000), 4, 4, 2, 3)
    counts = torch.bincount(many.row * 4 + many.col, minlength=16).double()
    assert float(counts.std() / counts.mean()) < 0.1


def calibrated(model, images, readers, samples_per_image, seed, batch_size):
    """A Calibration of the unpruned ``model`` on ``images`` (both frontiers on the same model)."""
    graph = build_graph(model, images[:1])
    chosen = [r for g in graph.groups for r in g.readers if r.name in readers]
    store = BatchStore(2**30, torch.device("cpu"))
    calibration = Calibration(graph, copy.deepcopy(graph.gm), copy.deepcopy(graph.gm), images, batch_size,
                              Sampling(samples_per_image, seed, 10), chosen, store, images.shape[1])
    return calibration, chosen


def _explicit_reader_data(model, images, reader: str, calibration, batch_size):
    """Explicit X (patches of the reader's input) and Y (the reader's folded output) at the
    calibration's sampled positions."""
    inputs, outs = [], []
    layer = model.get_submodule(reader)
    bn = model.bn2 if reader == "conv2" else None
    h1 = layer.register_forward_pre_hook(lambda m, i: inputs.append(i[0].clone()))
    h2 = (bn or layer).register_forward_hook(lambda m, i, o: outs.append(o.clone()))
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            model(images[start:start + batch_size])
    h1.remove(), h2.remove()
    r = next(r for g in calibration.graph.groups for r in g.readers if r.name == reader)
    xs, ys = [], []
    for b, (x, out) in enumerate(zip(inputs, outs)):
        pos = calibration.positions(r, b)
        if isinstance(layer, nn.Conv2d):
            cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                            stride=layer.stride)
            w_out = (x.shape[3] + 2 * layer.padding[1] - layer.dilation[1] * (layer.kernel_size[1] - 1) - 1) \
                // layer.stride[1] + 1
            xs.append(cols[pos.image, :, pos.row * w_out + pos.col])
            ys.append(out[pos.image, :, pos.row, pos.col])
        else:
            xs.append(x.reshape(len(x), -1)[pos.image])
            ys.append(out[pos.image])
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("reader", ["conv2", "conv3", "fc1"])
def test_moments_equal_explicit_sample_matrices(reader):
    model = make_tiny(0)
    images = random_images(50)
    calibration, readers = calibrated(model, images, {reader}, samples_per_image=5, seed=3, batch_size=16)
    fit, held = calibration.moments(readers, {}, False)[reader]
    fit.fold(), held.fold()
    x, y = _explicit_reader_data(model, images, reader, calibration, 16)
    per_image = 5 if reader != "fc1" else 1
    assert fit.count + held.count == len(x) == 50 * per_image
    assert held.count == 5 * per_image  # images 9, 19, 29, 39, 49
    xd, yd = x.double(), y.double()
    torch.testing.assert_close(fit.xtx + held.xtx, xd.T @ xd, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fit.xty + held.xty, xd.T @ yd, rtol=1e-5, atol=1e-4)
    assert fit.yty + held.yty == pytest.approx(float(yd.square().sum()), rel=1e-6)
    # the held-out images are every 10th image across batches of 16
    r = readers[0]
    image_ids = torch.cat([calibration.positions(r, b).image + 16 * b for b in range(4)])
    held_rows = image_ids % 10 == 9
    torch.testing.assert_close(held.sum_x, xd[held_rows].sum(0), rtol=1e-5, atol=1e-4)


def test_targets_are_folded_pre_activation_outputs():
    model = make_tiny(0)
    images = random_images(20)
    calibration, readers = calibrated(model, images, {"conv2"}, samples_per_image=4, seed=0, batch_size=8)
    r = readers[0]
    calibration.record_targets(calibration.original.index[r.output_node] + 1)
    # conv2 is followed by bn2: its targets are conv2 + bn2 as one affine map, before the ReLU
    w, b = folded_weight(model.conv2, model.bn2)
    with torch.no_grad():
        a1 = model.relu1(model.bn1(model.conv1(images)))
        folded = F.conv2d(a1.double(), w.reshape(model.conv2.weight.shape), b, padding=1)
    got = torch.cat([calibration.store.get(i, "targets")["output:conv2"] for i in range(3)]).double()
    pos = [calibration.positions(r, i) for i in range(3)]
    expected = torch.cat([folded[8 * i:8 * i + 8][p.image, :, p.row, p.col] for i, p in enumerate(pos)])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (got < 0).any(), "targets are taken before the ReLU"
    assert all(len(p.image) == min(8, 20 - 8 * i) * 4 for i, p in enumerate(pos))


def _exact_moments(x: torch.Tensor, y: torch.Tensor) -> Moments:
    """Moments summed in float64 (batches under MIN_SHIFT_SAMPLES) of data exact in float32."""
    m = Moments(x.shape[1], y.shape[1])
    for start in range(0, len(x), 50):
        m.update(x[start:start + 50], y[start:start + 50])
    return m


@pytest.mark.parametrize("channels, k", [([0, 2, 5], 1), ([4], 3), (list(range(6)), 2), ([5, 1], 2)])
def test_residual_moments_equal_the_explicit_residual(channels, k):
    """Restricting to some channels moves what the others contribute (with their weights) into
    the target: every sum equals the one of X[:, cols] against Y - X[:, o] W[:, o]ᵀ, also when
    the cached terms of the whole weight serve a second restriction and a changed weight."""
    g = torch.Generator().manual_seed(3)
    # small integers and eighths: every sample, product and sum is exact, so the sums must agree
    x = torch.randint(-3, 6, (300, 6 * k), generator=g).double()
    w = torch.randint(-16, 17, (4, 6 * k), generator=g).double() / 8
    y = x @ w.T + torch.randint(-2, 3, (300, 4), generator=g)
    m = _exact_moments(x, y)
    for weight in (w, w + 0.5, w):
        for chosen in (channels, channels[::-1]):
            cols = block_indices(torch.tensor(chosen), k)
            other = torch.ones(6 * k, dtype=torch.bool)
            other[cols] = False
            target = y - x[:, other] @ weight[:, other].T
            want, got = _exact_moments(x[:, cols], target), m.residual(cols, weight)
            assert got.count == want.count
            for name in ("xtx", "xty", "sum_x", "sum_y", "yy"):
                torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-9, atol=1e-7)
            assert got.yty == pytest.approx(want.yty, rel=1e-9)


class Concatenating(nn.Module):
    """conv3 reads every earlier output through a concatenation, as a dense block's readers do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1)
        self.conv3, self.head = nn.Conv2d(7, 5, 1), nn.Conv2d(12, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.conv1(x))
        b = torch.relu(self.conv2(a))
        c = torch.relu(self.conv3(torch.cat([a, b], 1)))
        return self.head(torch.cat([a, b, c], 1))


def test_a_reader_in_several_sets_has_the_moments_of_a_run_of_its_own():
    """The unpruned statistics sum a reader read by several units once and hand the same sums to
    every set; they equal what a run that asks for that set alone collects."""
    torch.manual_seed(0)
    model, images = Concatenating().eval(), random_images(40)
    graph = build_graph(model, images[:1])
    sets = [graph.group(name).readers for name in ("conv1", "conv2", "conv3")]
    assert [[r.name for r in s] for s in sets] == [["conv2", "conv3", "head"], ["conv3", "head"], ["head"]]
    with BatchStore(2**30, torch.device("cpu")) as store:
        shared = unpruned_moments(graph, images, 16, Sampling(6, 0, 4), sets, store, 3)
    for i, readers in enumerate(sets):
        with BatchStore(2**30, torch.device("cpu")) as store:
            alone, = unpruned_moments(graph, images, 16, Sampling(6, 0, 4), [readers], store, 3)
        for r in readers:
            for got, want in zip(shared[i][r.name], alone[r.name]):
                assert got.count == want.count > 0
                assert torch.equal(got.xtx, want.xtx) and torch.equal(got.xty, want.xty)
    assert shared[0]["head"][0] is shared[2]["head"][0]  # summed once
