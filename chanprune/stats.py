"""Second moments of sampled layer inputs and targets, accumulated without storing samples.

For a reader layer, X holds input patches from the model pruned so far and Y the same layer's
output in the original model (pre-activation, BatchNorm folded) at the same positions. Only
G = X^T X, B = X^T Y, t = ||Y||^2 and the sums of X and Y are kept, in float64, so memory is
O((c*k)^2) whatever the number of images. Per-batch products run in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import fx, nn
from torch.nn.modules.utils import _pair

from .data import iterate_batches
from .graph import ChannelGraph, Reader
from .layers import SelectedConv2d


@dataclass
class Moments:
    """Running sums over samples: count, sum x, sum y, X^T X, X^T Y and ||Y||^2 (float64)."""

    dim_x: int
    dim_y: int
    count: int = 0
    sum_x: torch.Tensor = field(init=False)
    sum_y: torch.Tensor = field(init=False)
    xtx: torch.Tensor = field(init=False)
    xty: torch.Tensor = field(init=False)
    yty: float = 0.0

    def __post_init__(self) -> None:
        f64 = torch.float64
        self.sum_x = torch.zeros(self.dim_x, dtype=f64)
        self.sum_y = torch.zeros(self.dim_y, dtype=f64)
        self.xtx = torch.zeros(self.dim_x, self.dim_x, dtype=f64)
        self.xty = torch.zeros(self.dim_x, self.dim_y, dtype=f64)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add samples x (P, dim_x) and y (P, dim_y); products in float32, sums in float64."""
        if len(x) == 0:
            return
        x, y = x.float(), y.float()
        self.count += len(x)
        self.sum_x += x.sum(0).double()
        self.sum_y += y.sum(0).double()
        self.xtx += (x.T @ x).double()
        self.xty += (x.T @ y).double()
        self.yty += float(y.double().square().sum())

    def restrict(self, cols: torch.Tensor) -> "Moments":
        """The moments of the input features ``cols`` only (shares nothing with ``self``)."""
        sub = Moments(len(cols), self.dim_y)
        sub.count, sub.yty = self.count, self.yty
        sub.sum_x, sub.sum_y = self.sum_x[cols], self.sum_y.clone()
        sub.xtx, sub.xty = self.xtx[cols][:, cols], self.xty[cols]
        return sub

    def residual(self, cols: torch.Tensor, other: torch.Tensor, w_other: torch.Tensor) -> "Moments":
        """Moments of input features ``cols`` against the residual Y - X[:, other] w_otherᵀ: what is
        left to explain once the features ``other`` contribute with weights ``w_other`` (n, |other|)."""
        sub = self.restrict(cols)
        if len(other) == 0:
            return sub
        g_oo = self.xtx[other][:, other]
        b_o = self.xty[other]
        sub.xty = sub.xty - self.xtx[cols][:, other] @ w_other.T
        sub.sum_y = self.sum_y - w_other @ self.sum_x[other]
        sub.yty = self.yty - 2 * float((w_other * b_o.T).sum()) + float(((w_other @ g_oo) * w_other).sum())
        return sub

    @property
    def mean_x(self) -> torch.Tensor:
        return self.sum_x / max(self.count, 1)

    @property
    def mean_y(self) -> torch.Tensor:
        return self.sum_y / max(self.count, 1)

    def centred(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Scatter matrices about the means: (X-x̄)^T(X-x̄), (X-x̄)^T(Y-ȳ), ||Y-ȳ||^2."""
        n = self.count
        mx, my = self.mean_x, self.mean_y
        return (self.xtx - n * torch.outer(mx, mx), self.xty - n * torch.outer(mx, my),
                self.yty - n * float(my @ my))


@dataclass
class Positions:
    """Sampled output positions of one reader for one batch: image index in batch, row, column."""

    image: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor


def sample_positions(batch: int, height: int, width: int, per_image: int,
                     generator: torch.Generator) -> Positions:
    """``per_image`` distinct positions per image (all of them when the map is smaller)."""
    hw = height * width
    take = min(per_image, hw)
    if take == hw:
        flat = torch.arange(hw).repeat(batch, 1)
    else:
        flat = torch.rand(batch, hw, generator=generator).argsort(1)[:, :take]
    image = torch.arange(batch).repeat_interleave(take)
    flat = flat.reshape(-1)
    return Positions(image, flat // width, flat % width)


def conv_patches(conv: nn.Conv2d, x: torch.Tensor, pos: Positions) -> torch.Tensor:
    """Input patches of ``conv`` at output positions ``pos``: (P, c*kh*kw), channel-major like the weight."""
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    x = nn.functional.pad(x, _conv_padding(conv))
    rows = pos.row[:, None] * sh + torch.arange(kh)[None] * dh  # (P, kh)
    cols = pos.col[:, None] * sw + torch.arange(kw)[None] * dw  # (P, kw)
    patches = x[pos.image[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (P, kh, kw, c)
    return patches.permute(0, 3, 1, 2).reshape(len(pos.image), -1)


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding as the conv applies it ('same' puts any odd extra
    row or column at the bottom / right, as PyTorch does)."""
    if conv.padding == "valid":
        return 0, 0, 0, 0
    if conv.padding == "same":
        (th, tw) = (d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size))
        return tw // 2, tw - tw // 2, th // 2, th - th // 2
    ph, pw = _pair(conv.padding)
    return pw, pw, ph, ph


def reader_dim(model: nn.Module, reader: Reader) -> int:
    """Length of one input sample of ``reader``: c*kh*kw for a conv, in_features for a linear."""
    layer = model.get_submodule(reader.name)
    if isinstance(layer, nn.Conv2d):
        channels = len(layer.index) if isinstance(layer, SelectedConv2d) else layer.in_channels
        return channels * math.prod(layer.kernel_size)
    return layer.in_features


class _StopForward(Exception):
    """Raised once every wanted value of a batch has been captured."""


class _Recorder(fx.Interpreter):
    """Runs a traced model and hands the values of chosen nodes to a callback."""

    def __init__(self, gm: fx.GraphModule, wanted: set[str], callback: Callable[[str, torch.Tensor], None]):
        super().__init__(gm)
        self.wanted, self.callback, self.seen = wanted, callback, set()

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if n.name in self.wanted:
            self.callback(n.name, result)
            self.seen.add(n.name)
            if self.seen == self.wanted:
                raise _StopForward
        return result


def run_capturing(gm: fx.GraphModule, batch: torch.Tensor, wanted: set[str],
                  callback: Callable[[str, torch.Tensor], None]) -> None:
    """Forward ``batch`` through ``gm`` (eval mode) until every node in ``wanted`` has been seen."""
    was_training = gm.training
    gm.eval()
    try:
        _Recorder(gm, wanted, callback).run(batch)
    except _StopForward:
        pass
    finally:
        gm.train(was_training)


def sample_output(value: torch.Tensor, layout: str, pos: Positions) -> torch.Tensor:
    """Rows (P, channels) of a layer output at positions ``pos``."""
    if layout == "nc":
        return value[pos.image]
    if layout == "nhwc":
        return value[pos.image, pos.row, pos.col]
    return value[pos.image, :, pos.row, pos.col]


@dataclass
class Targets:
    """Original-model outputs of every reader at sampled positions, per calibration batch.

    ``outputs`` hold each reader's (BN-folded) output; ``shortcuts`` the value a residual add
    sums with it. Computed once and shared by every pruning run on the same model and images.
    """

    images: torch.Tensor
    batch_size: int
    samples_per_image: int
    positions: dict[str, list[Positions]]
    outputs: dict[str, list[torch.Tensor]]
    shortcuts: dict[str, list[torch.Tensor]]

    def batches(self):
        return iterate_batches(self.images, self.batch_size)


@torch.no_grad()
def record_targets(graph: ChannelGraph, images: torch.Tensor, samples_per_image: int = 10,
                   seed: int = 0, batch_size: int = 64) -> Targets:
    """Run the original (traced) model once and keep each reader's output at sampled positions."""
    readers = {r.name: r for g in graph.groups for r in g.readers}
    generators = {name: torch.Generator().manual_seed(seed * 100003 + i) for i, name in enumerate(readers)}
    positions: dict[str, list[Positions]] = {name: [] for name in readers}
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in readers}
    shortcuts: dict[str, list[torch.Tensor]] = {name: [] for name, r in readers.items() if r.shortcut}
    by_node: dict[str, list[tuple[str, Reader]]] = {}
    for name, r in readers.items():
        by_node.setdefault(r.output_node, []).append(("output", r))
        if r.shortcut:
            by_node.setdefault(r.shortcut, []).append(("shortcut", r))

    batch_positions: dict[str, Positions] = {}

    def capture(node: str, value: torch.Tensor) -> None:
        for role, r in by_node[node]:
            if r.name not in batch_positions:  # the shortcut may run before the reader
                batch_positions[r.name] = _positions(value, r.layout, samples_per_image, generators[r.name])
            rows = sample_output(value, r.layout, batch_positions[r.name]).float().clone()
            (outputs if role == "output" else shortcuts)[r.name].append(rows)

    for batch in iterate_batches(images, batch_size):
        batch_positions.clear()
        run_capturing(graph.gm, batch, set(by_node), capture)
        for name in readers:
            positions[name].append(batch_positions[name])
    return Targets(images, batch_size, samples_per_image, positions, outputs, shortcuts)


def _positions(value: torch.Tensor, layout: str, per_image: int, generator: torch.Generator) -> Positions:
    if layout == "nc":
        return Positions(torch.arange(len(value)), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    h, w = (value.shape[1], value.shape[2]) if layout == "nhwc" else (value.shape[2], value.shape[3])
    return sample_positions(value.shape[0], h, w, per_image, generator)


def reader_samples(layer: nn.Module, reader: Reader, x: torch.Tensor, pos: Positions) -> torch.Tensor:
    """Input rows (P, dim) of ``reader`` at its output positions: conv patches or Linear inputs."""
    if isinstance(layer, nn.Conv2d):
        if isinstance(layer, SelectedConv2d):
            x = x.index_select(1, layer.index)
        return conv_patches(layer, x, pos)
    if reader.layout == "nhwc":
        return x[pos.image, pos.row, pos.col]
    return x.reshape(len(x), -1)[pos.image]


@torch.no_grad()
def collect_moments(work: fx.GraphModule, readers: list[Reader], targets: Targets, heldout_every: int = 10,
                    kept_outputs: dict[str, torch.Tensor] | None = None,
                    residual_correction: bool = False) -> dict[str, tuple[Moments, Moments]]:
    """Moments (fitted, held-out) of each reader: inputs from ``work``, targets from ``targets``.

    ``kept_outputs`` restricts a reader's targets to the output channels it still has. With
    ``residual_correction`` a reader whose output feeds a residual add targets Y2 + Y1 - Y1'
    (its original output plus the original shortcut minus the current one), so it also makes
    up for error that reached the shortcut. Every ``heldout_every``-th calibration image is held
    out of the fit to measure generalisation.
    """
    kept_outputs = kept_outputs or {}
    result: dict[str, tuple[Moments, Moments]] = {}
    layers = {r.name: work.get_submodule(r.name) for r in readers}
    by_node: dict[str, list[tuple[str, Reader]]] = {}
    for r in readers:
        dim_y = layers[r.name].weight.shape[0]
        result[r.name] = (Moments(reader_dim(work, r), dim_y), Moments(reader_dim(work, r), dim_y))
        by_node.setdefault(r.input_node, []).append(("input", r))
        if residual_correction and r.shortcut:
            by_node.setdefault(r.shortcut, []).append(("shortcut", r))
    state = {"batch": 0, "offset": 0}
    current_shortcut: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}

    def capture(node: str, value: torch.Tensor) -> None:
        for role, r in by_node[node]:
            pos = targets.positions[r.name][state["batch"]]
            if role == "shortcut":
                current_shortcut[r.name] = sample_output(value, r.layout, pos).float()
            else:
                inputs[r.name] = reader_samples(layers[r.name], r, value, pos)

    for b, batch in enumerate(targets.batches()):
        state["batch"] = b
        run_capturing(work, batch, set(by_node), capture)
        for r in readers:
            pos = targets.positions[r.name][b]
            keep = kept_outputs.get(r.name)
            y = targets.outputs[r.name][b]
            if residual_correction and r.shortcut:
                y = y + targets.shortcuts[r.name][b]
            if keep is not None:
                y = y[:, keep]
            if residual_correction and r.shortcut:
                y = y - current_shortcut[r.name]
            held = ((pos.image + state["offset"]) % heldout_every) == heldout_every - 1
            fit_m, held_m = result[r.name]
            fit_m.update(inputs[r.name][~held], y[~held])
            held_m.update(inputs[r.name][held], y[held])
        state["offset"] += len(batch)
    return result
