"""Second moments of sampled layer inputs and targets, accumulated without storing samples.

For a reader layer, X holds input patches from the model pruned so far and Y the same layer's
output in the original model (pre-activation, BatchNorm folded) at the same positions. Only
G = X^T X, B = X^T Y, t = ||Y||^2 and the sums of X and Y are kept, in float64, so memory is
O((c*k)^2) whatever the number of images. Per-batch products run in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from .data import iterate_batches
from .graph import ChannelGraph, Reader


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
        return layer.in_channels * math.prod(layer.kernel_size)
    return layer.in_features


class _StopForward(Exception):
    """Raised by a hook once every wanted input has been captured."""


@dataclass
class Targets:
    """Original-model outputs of every reader at sampled positions, per calibration batch.

    Computed once and shared by every pruning run on the same model and calibration images.
    """

    images: torch.Tensor
    batch_size: int
    samples_per_image: int
    positions: dict[str, list[Positions]]
    outputs: dict[str, list[torch.Tensor]]

    def batches(self):
        return iterate_batches(self.images, self.batch_size)


@torch.no_grad()
def record_targets(model: nn.Module, graph: ChannelGraph, images: torch.Tensor, samples_per_image: int = 10,
                   seed: int = 0, batch_size: int = 64) -> Targets:
    """Run the original model once and keep each reader's folded output at sampled positions."""
    readers = {r.name: r for g in graph.prunable() for r in g.readers}
    generators = {name: torch.Generator().manual_seed(seed * 100003 + i) for i, name in enumerate(readers)}
    positions: dict[str, list[Positions]] = {name: [] for name in readers}
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in readers}
    handles = []
    for name, reader in readers.items():
        source = model.get_submodule(reader.bn or reader.name)

        def hook(_m, _inp, out, name=name):
            if out.ndim == 2:
                positions[name].append(Positions(torch.arange(len(out)), torch.zeros(0), torch.zeros(0)))
                outputs[name].append(out.detach().float().clone())
                return
            pos = sample_positions(out.shape[0], out.shape[2], out.shape[3], samples_per_image, generators[name])
            positions[name].append(pos)
            outputs[name].append(out[pos.image, :, pos.row, pos.col].detach().float())

        handles.append(source.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for batch in iterate_batches(images, batch_size):
            model(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return Targets(images, batch_size, samples_per_image, positions, outputs)


@torch.no_grad()
def collect_moments(model: nn.Module, readers: list[Reader], targets: Targets,
                    heldout_every: int = 10) -> dict[str, tuple[Moments, Moments]]:
    """Moments (fitted, held-out) of each reader: inputs from ``model``, targets from ``targets``.

    Every ``heldout_every``-th calibration image is held out of the fit to measure generalisation.
    """
    result: dict[str, tuple[Moments, Moments]] = {}
    layers = {r.name: model.get_submodule(r.name) for r in readers}
    for r in readers:
        dim_y = targets.outputs[r.name][0].shape[1]
        result[r.name] = (Moments(reader_dim(model, r), dim_y), Moments(reader_dim(model, r), dim_y))
    state = {"batch": 0, "offset": 0, "seen": set()}

    def make_hook(name: str):
        def hook(layer, inputs):
            x = inputs[0]
            b = state["batch"]
            pos = targets.positions[name][b]
            y = targets.outputs[name][b]
            if isinstance(layer, nn.Conv2d):
                samples = conv_patches(layer, x, pos)
            else:
                samples = x.reshape(len(x), -1)[pos.image]
            held = ((pos.image + state["offset"]) % heldout_every) == heldout_every - 1
            fit_m, held_m = result[name]
            fit_m.update(samples[~held], y[~held])
            held_m.update(samples[held], y[held])
            state["seen"].add(name)
            if len(state["seen"]) == len(layers):
                raise _StopForward
        return hook

    handles = [layer.register_forward_pre_hook(make_hook(name)) for name, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for b, batch in enumerate(targets.batches()):
            state["batch"], state["seen"] = b, set()
            try:
                model(batch)
            except _StopForward:
                pass
            state["offset"] += len(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return result
