"""Second moments of sampled layer inputs and targets, accumulated without storing samples.

For a reader layer, X holds input patches from the model pruned so far and Y the same layer's
output in the original model (pre-activation, BatchNorm folded) at the same positions. Only
G = X^T X, B = X^T Y, ||Y||^2 (in total and per output) and the sums of X and Y are kept, in
float64, so memory is O((c*k)^2) whatever the number of images. Per-batch products run in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .graph import Reader
from .layers import SelectedConv2d, conv_padding


def block_indices(channels: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices of the k features owned by each of ``channels``."""
    return (channels[:, None] * k + torch.arange(k)[None]).reshape(-1)


FOLD_EVERY = 16384  # samples summed in float32 before they are folded into the float64 totals
MIN_SHIFT_SAMPLES = 64  # a batch that sets the float32 shift must have at least this many samples


@dataclass
class Moments:
    """Running sums over samples: count, sum x, sum y, X^T X, X^T Y and ||Y||^2 (``yty``), also
    per output (``yy``: what a writer that drops an output loses, see ``trunk="fine"``).

    A pure, additive value: ``a.merge(b)`` is the moments of both sample sets, which is what
    ranks all-reduce. Products run in float32 (the fast BLAS path) into float32 buffers that are
    folded into the float64 totals every :data:`FOLD_EVERY` samples, so the float64 cost is paid
    once per fold rather than once per batch. The float32 products are taken about a shift (the
    first batch's mean), so that inputs with large means (after a ReLU) lose no digits when the
    solvers centre them; the fold turns them back into raw float64 sums exactly.
    """

    dim_x: int
    dim_y: int
    count: int = 0
    device: torch.device | str = "cpu"
    sum_x: torch.Tensor = field(init=False)
    sum_y: torch.Tensor = field(init=False)
    yty: float = 0.0

    def __post_init__(self) -> None:
        f64, dev = torch.float64, torch.device(self.device)
        self.device = dev
        self.sum_x = torch.zeros(self.dim_x, dtype=f64, device=dev)
        self.sum_y = torch.zeros(self.dim_y, dtype=f64, device=dev)
        self.yy = torch.zeros(self.dim_y, dtype=f64, device=dev)
        self._xtx = torch.zeros(self.dim_x, self.dim_x, dtype=f64, device=dev)
        self._xty = torch.zeros(self.dim_x, self.dim_y, dtype=f64, device=dev)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._pending_count = 0
        self._pending_sums = (torch.zeros_like(self.sum_x), torch.zeros_like(self.sum_y))  # of x - shift
        self._shift: tuple[torch.Tensor, torch.Tensor] | None = None
        self._centred: tuple[tuple, tuple[torch.Tensor, torch.Tensor, float]] | None = None
        self._projected: tuple[tuple, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add samples x (P, dim_x) and y (P, dim_y)."""
        if len(x) == 0:
            return
        x, y = x.float(), y.float()
        self.count += len(x)
        if self._shift is None and len(x) < MIN_SHIFT_SAMPLES:  # too few to estimate a shift: exact float64
            xd, yd = x.double(), y.double()
            self.sum_x += xd.sum(0)
            self.sum_y += yd.sum(0)
            self.yy += yd.square().sum(0)
            self.yty += float(yd.square().sum())
            self._xtx.addmm_(xd.T, xd)
            self._xty.addmm_(xd.T, yd)
            return
        if self._shift is None:  # on a 1/16 grid: data exact in float32 (integers) stays exact
            self._shift = ((x.mean(0) * 16).round() / 16, (y.mean(0) * 16).round() / 16)
        sx, sy = (s.double() for s in self._shift)
        x, y = x - self._shift[0], y - self._shift[1]
        dx, dy = x.sum(0).double(), y.sum(0).double()  # float32 pairwise sums of the shifted samples
        self.sum_x += dx + len(x) * sx
        self.sum_y += dy + len(x) * sy
        squares = y.square()
        self.yty += float(squares.sum()) + 2 * float(sy @ dy) + len(x) * float(sy @ sy)
        self.yy += squares.sum(0).double() + 2 * sy * dy + len(x) * sy * sy
        self._pending_sums[0].add_(dx)
        self._pending_sums[1].add_(dy)
        if self._pending is None:
            self._pending = (x.T @ x, x.T @ y)
        else:
            self._pending[0].addmm_(x.T, x)
            self._pending[1].addmm_(x.T, y)
        self._pending_count += len(x)
        if self._pending_count >= FOLD_EVERY:
            self.fold()

    def fold(self) -> "Moments":
        """Add the float32 partial sums into the float64 totals (returns ``self``)."""
        if self._pending is not None:
            m = self._pending_count
            sx, sy = (s.double() for s in self._shift)
            dx, dy = self._pending_sums
            # sum x x^T = sum (x-s)(x-s)^T + s (sum (x-s))^T + (sum (x-s)) s^T + m s s^T
            self._xtx += self._pending[0]
            self._xtx.addr_(sx, dx).addr_(dx, sx).addr_(sx, sx, alpha=m)
            self._xty += self._pending[1]
            self._xty.addr_(sx, dy).addr_(dx, sy).addr_(sx, sy, alpha=m)
            self._pending, self._pending_count = None, 0
            dx.zero_()
            dy.zero_()
        return self

    @property
    def xtx(self) -> torch.Tensor:
        """X^T X in float64 (every sample so far included)."""
        return self.fold()._xtx

    @xtx.setter
    def xtx(self, value: torch.Tensor) -> None:
        self.fold()._xtx = value

    @property
    def xty(self) -> torch.Tensor:
        """X^T Y in float64 (every sample so far included)."""
        return self.fold()._xty

    @xty.setter
    def xty(self, value: torch.Tensor) -> None:
        self.fold()._xty = value

    def merge(self, other: "Moments") -> "Moments":
        """Add ``other``'s samples into these moments (returns ``self``)."""
        self.count += other.count
        self.sum_x += other.sum_x.to(self.device)
        self.sum_y += other.sum_y.to(self.device)
        self.xtx += other.xtx.to(self.device)
        self.xty += other.xty.to(self.device)
        self.yty += other.yty
        self.yy += other.yy.to(self.device)
        return self

    def all_reduce(self) -> "Moments":
        """Sum these moments over every process of the default torch.distributed group (in place):
        they are sums, so each rank then holds the moments of all ranks' samples."""
        import torch.distributed as dist

        self.fold()
        scalars = torch.tensor([float(self.count), self.yty], dtype=torch.float64, device=self.device)
        for tensor in (self.sum_x, self.sum_y, self.yy, self._xtx, self._xty, scalars):
            dist.all_reduce(tensor)
        self.count, self.yty = int(round(float(scalars[0]))), float(scalars[1])
        return self

    def to(self, device: torch.device | str) -> "Moments":
        """These moments on ``device`` (folded; a new value unless already there)."""
        self.fold()
        if torch.device(device) == self.device:
            return self
        moved = Moments(self.dim_x, self.dim_y, self.count, "meta")
        moved.device = torch.device(device)
        moved.sum_x, moved.sum_y = self.sum_x.to(device), self.sum_y.to(device)
        moved.xtx, moved.xty, moved.yty = self.xtx.to(device), self.xty.to(device), self.yty
        moved.yy = self.yy.to(device)
        return moved

    def restrict(self, cols: torch.Tensor) -> "Moments":
        """The moments of the input features ``cols`` only (shares nothing with ``self``)."""
        self.fold()
        sub = Moments(len(cols), self.dim_y, device="meta")
        sub.device = self.device
        sub.count, sub.yty, sub.yy = self.count, self.yty, self.yy.clone()
        sub.sum_x, sub.sum_y = self.sum_x[cols], self.sum_y.clone()
        sub.xtx, sub.xty = self.xtx[cols[:, None], cols], self.xty[cols]
        return sub

    def residual(self, cols: torch.Tensor, weight: torch.Tensor) -> "Moments":
        """Moments of input features ``cols`` against the residual Y - X[:, o] W[:, o]ᵀ, ``o`` every
        feature outside ``cols``: what is left to explain once the other features contribute with
        their weights in ``weight`` (n, dim_x). The terms of the whole weight (G Wᵀ, and per output
        w G wᵀ and w·B) are computed once per weight and reused, so each restriction costs
        O(|cols|² n) rather than O(|o|² n): a reader of a long concatenation is restricted to
        every group it reads."""
        sub = self.restrict(cols)
        if len(cols) == self.dim_x:
            return sub
        g_w, quad, cross = self._projection(weight)
        w_c, g_cc, b_c = weight[:, cols], sub.xtx, sub.xty
        g_co_wo = g_w[cols] - g_cc @ w_c.T  # G[cols, o] W[:, o]ᵀ
        cross_o = cross - (w_c * b_c.T).sum(1)  # per output: w_o · B[o]
        quad_o = quad - ((w_c @ g_cc) * w_c).sum(1) - 2 * (w_c * g_co_wo.T).sum(1)  # per output: w_o G_oo w_oᵀ
        sub.xty = b_c - g_co_wo
        sub.sum_y = self.sum_y - (weight @ self.sum_x - w_c @ self.sum_x[cols])
        sub.yy = self.yy - 2 * cross_o + quad_o
        sub.yty = self.yty - float((2 * cross_o - quad_o).sum())
        return sub

    def _projection(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """G Wᵀ (dim_x, n), w_j G w_jᵀ and w_j · B[:, j] of every output j, kept while the weight
        and the moments stay the same (the weight is compared by value: readers rebuild it)."""
        key = (self.count, self.yty, id(self.xtx), id(self.xty))
        cached = self._projected
        if cached is not None and cached[0] == key and torch.equal(cached[1], weight):
            return cached[2]
        g_w = self.xtx @ weight.T
        terms = (g_w, (weight * g_w.T).sum(1), (weight * self.xty.T).sum(1))
        self._projected = (key, weight.clone(), terms)
        return terms

    @property
    def mean_x(self) -> torch.Tensor:
        return self.sum_x / max(self.count, 1)

    @property
    def mean_y(self) -> torch.Tensor:
        return self.sum_y / max(self.count, 1)

    def centred(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Scatter matrices about the means: (X-x̄)^T(X-x̄), (X-x̄)^T(Y-ȳ), ||Y-ȳ||^2 (computed once
        per set of samples: the solvers ask for them many times)."""
        key = (self.count, self.yty, id(self._xtx), id(self._xty))
        if self._centred is None or self._centred[0] != key or self._pending is not None:
            n = self.count
            mx, my = self.mean_x, self.mean_y
            xtx = torch.addr(self.xtx, mx, mx, alpha=-n)
            xty = torch.addr(self.xty, mx, my, alpha=-n)
            self._centred = (key, (xtx, xty, self.yty - n * float(my @ my)))
        return self._centred[1]

    def centred_yy(self) -> torch.Tensor:
        """||Y_j - ȳ_j||^2 of every output j."""
        return (self.yy - self.count * self.mean_y.square()).clamp_min(0.0)


@dataclass
class Positions:
    """Sampled output positions of one reader for one batch: image index in batch, row, column."""

    image: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor


def _scramble(x: torch.Tensor) -> torch.Tensor:
    """A fixed integer hash of int64 values (xor-shift-multiply rounds; shifts masked to be logical)."""
    x = x ^ ((x >> 31) & (2**33 - 1))
    x = x * 0x2545F4914F6CDD1D
    x = x ^ ((x >> 29) & (2**35 - 1))
    x = x * 0x1CE4E5B9
    return x ^ ((x >> 32) & (2**32 - 1))


def sample_positions(image_ids: torch.Tensor, height: int, width: int, per_image: int, key: int) -> Positions:
    """``per_image`` distinct positions per image (all of them when the map is smaller).

    The positions of an image depend only on ``key`` (seed and layer) and the image's index in the
    calibration set ``image_ids``, not on how the images are batched or which pass asks for them.
    """
    batch, hw = len(image_ids), height * width
    take = min(per_image, hw)
    if take == hw:
        flat = torch.arange(hw).repeat(batch, 1)
    else:
        codes = (key * 1_000_003 + image_ids.long())[:, None] * hw + torch.arange(hw)[None]
        flat = _scramble(codes).topk(take, 1, largest=False, sorted=False).indices.sort(1).values
    image = torch.arange(batch).repeat_interleave(take)
    flat = flat.reshape(-1)
    return Positions(image, flat // width, flat % width)


def conv_patches(conv: nn.Conv2d, x: torch.Tensor, pos: Positions,
                 pads: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Input patches of ``conv`` at output positions ``pos``: (P, c*kh*kw), channel-major like the
    weight; ``pads`` (left, right, top, bottom) for a conv that pads in its own forward."""
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    left, _, top, _ = pads if pads is not None else conv_padding(conv)
    device = x.device
    # positions in the unpadded input; those in the zero padding read a clamped pixel, then zeroed
    # (no padded copy of the whole map is made)
    rows = (pos.row[:, None] * sh + torch.arange(kh)[None] * dh - top).to(device)  # (P, kh)
    cols = (pos.col[:, None] * sw + torch.arange(kw)[None] * dw - left).to(device)  # (P, kw)
    inside = ((rows >= 0) & (rows < x.shape[2]))[:, :, None] & ((cols >= 0) & (cols < x.shape[3]))[:, None, :]
    image = pos.image.to(device)[:, None, None]
    patches = x[image, :, rows.clamp(0, x.shape[2] - 1)[:, :, None], cols.clamp(0, x.shape[3] - 1)[:, None, :]]
    patches = patches * inside[..., None]  # (P, kh, kw, c)
    return patches.permute(0, 3, 1, 2).reshape(len(pos.image), -1)


@dataclass
class GroupedMoments:
    """Moments of a grouped conv, one :class:`Moments` per conv group: group j's input features
    (the j-th block of the sample's columns) only explain its own outputs (the j-th block of
    the targets), so its G small problems never need the full (c·k)² matrix."""

    parts: list[Moments]

    @classmethod
    def empty(cls, dim_x: int, dim_y: int, groups: int, device: torch.device | str) -> "GroupedMoments":
        return cls([Moments(dim_x // groups, dim_y // groups, device=device) for _ in range(groups)])

    @property
    def count(self) -> int:
        return self.parts[0].count

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add samples x (P, c·k) and y (P, n), split by conv group."""
        for j, part in enumerate(self.parts):
            part.update(x[:, j * part.dim_x:(j + 1) * part.dim_x], y[:, j * part.dim_y:(j + 1) * part.dim_y])

    def all_reduce(self) -> "GroupedMoments":
        for part in self.parts:
            part.all_reduce()
        return self

    def to(self, device: torch.device | str) -> "GroupedMoments":
        return GroupedMoments([part.to(device) for part in self.parts])


def reader_dim(model: nn.Module, reader: Reader) -> int:
    """Length of one input sample of ``reader``: c*kh*kw for a conv, in_features for a linear."""
    layer = model.get_submodule(reader.name)
    if isinstance(layer, nn.Conv2d):
        channels = len(layer.index) if isinstance(layer, SelectedConv2d) else layer.in_channels
        return channels * math.prod(layer.kernel_size)
    return layer.in_features


def sample_output(value: torch.Tensor, layout: str, pos: Positions) -> torch.Tensor:
    """Rows (P, channels) of a layer output at positions ``pos``."""
    if layout == "nc":
        return value[pos.image]
    if layout == "nhwc":
        return value[pos.image, pos.row, pos.col]
    return value[pos.image, :, pos.row, pos.col]


def reader_samples(layer: nn.Module, reader: Reader, x: torch.Tensor, pos: Positions) -> torch.Tensor:
    """Input rows (P, dim) of ``reader`` at its output positions: conv patches or Linear inputs."""
    if isinstance(layer, nn.Conv2d):
        if isinstance(layer, SelectedConv2d):
            x = x.index_select(1, layer.index)
        return conv_patches(layer, x, pos, reader.pads)
    if reader.layout == "nhwc":
        return x[pos.image, pos.row, pos.col]
    return x.reshape(len(x), -1)[pos.image]
