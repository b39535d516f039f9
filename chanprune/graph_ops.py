"""What each traced operation does to the channels it carries: one handler per op, in one registry.

A handler receives the graph builder, the fx node, the tag of its first tensor argument and the
tags of all its tensor inputs, and returns the tag of its output (None when the output carries no
channel group chanprune tracks). A handler either passes channels through, makes a layer follow
or read them, ties, lays side by side or reshapes them, or blocks them with the reason. Ops are
registered by module type (matched along the module's class hierarchy, most specific first), by
function (or by a library function's module and name, so the graph never imports those
libraries) and by tensor method name. An op without a handler blocks what it touches.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from .layers import SelectedConv2d, conv_padding, own_forward
from .outputs import computes_the_same

if TYPE_CHECKING:
    from .graph import ChannelGroup, _Builder

FOLLOWER_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class Tag:
    """What a traced value holds along its channel axis: groups side by side, maybe flattened."""

    segments: tuple[ChannelGroup, ...]
    axis: int = 1
    flat_size: int | None = None  # H*W per channel once flattened

    @property
    def channels(self) -> int:
        return sum(g.root().channels for g in self.segments)


@dataclass(frozen=True)
class Pieces:
    """The tuple ``split`` or ``chunk`` returns: one tag per piece, in order."""

    tags: tuple[Tag, ...]


Handler = Callable[["_Builder", fx.Node, "Tag | None", "list[Tag | None]"], "Tag | None"]


class OpRegistry:
    """Handlers keyed by module type, function, library function (module, name) and method name."""

    def __init__(self) -> None:
        self.modules: dict[type, Handler] = {}
        self.functions: dict[object, Handler] = {}
        self.library_functions: dict[tuple[str, str], Handler] = {}
        self.methods: dict[str, Handler] = {}
        self.take_pieces: set[Handler] = set()  # handlers that accept a split's tuple as an input

    def register(self, modules: Iterable[type] = (), functions: Iterable[object] = (),
                 library_functions: Iterable[tuple[str, str]] = (), methods: Iterable[str] = ()
                 ) -> Callable[[Handler], Handler]:
        """Decorator: ``handler`` handles every op named."""
        def add(handler: Handler) -> Handler:
            for table, keys in ((self.modules, modules), (self.functions, functions),
                                (self.library_functions, library_functions), (self.methods, methods)):
                for key in keys:
                    if table.get(key, handler) is not handler:  # aliases (F.x is torch.x) may repeat
                        raise ValueError(f"{key} already has a handler")
                    table[key] = handler
            return handler
        return add

    def lookup(self, node: fx.Node, module: nn.Module | None) -> Handler | None:
        """The handler of ``node`` (``module``: what a call_module node calls), or None."""
        if node.op == "call_module":
            return next((self.modules[t] for t in type(module).__mro__ if t in self.modules), None)
        if node.op == "call_function":
            target = node.target
            found = self.functions.get(target) if _hashable(target) else None
            key = (getattr(target, "__module__", None), getattr(target, "__name__", None))
            return found or self.library_functions.get(key)
        if node.op == "call_method":
            return self.methods.get(node.target)
        return None


def _hashable(target: object) -> bool:
    try:
        hash(target)
    except TypeError:
        return False
    return True


OPS = OpRegistry()


def call_arg(node: fx.Node, index: int, name: str, default: object = None) -> object:
    """Argument ``index`` of a call, given positionally or as keyword ``name``."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def cut_at(b: _Builder, tag: Tag, at: int, tied: bool = False) -> Tag | None:
    """``tag`` with a segment boundary at channel ``at``: a group that straddles it is cut there
    (:meth:`_Builder.cut_group`, which rewrites every tag that holds it; ``tied``: the caller ties
    the pieces channel by channel); None when it cannot be."""
    offset = 0
    for g in tag.segments:
        old = g.root()
        if offset < at < offset + old.channels:
            pieces = b.cut_group(old, at - offset, tied)
            if pieces is None:
                return None
            return Tag(tuple(p for s in tag.segments for p in (pieces if s.root() is old else (s,))), tag.axis)
        offset += old.channels
    return tag


def _channel_range(b: _Builder, node: fx.Node, tag: Tag, bounds: list[int]) -> list[Tag] | None:
    """The pieces of ``tag`` between consecutive ``bounds`` (channel positions), each a tag of
    whole groups, recorded as a cut that follows the new widths (``node`` takes its sizes from
    its arguments); blocks and returns None when a group cannot be cut."""
    pieces = _pieces(b, node, tag, bounds)
    if pieces is not None:
        b.cuts.append((node, node.args[0], list(bounds)))
    return pieces


def _pieces(b: _Builder, node: fx.Node, tag: Tag, bounds: list[int], tied: bool = False) -> list[Tag] | None:
    """The pieces of ``tag`` between consecutive ``bounds``, its groups cut there (``tied``: the
    caller ties the pieces); blocks and returns None when a group cannot be cut."""
    for at in bounds:
        cut = cut_at(b, tag, at, tied)
        if cut is None:
            b.block(tag, f"{node.name} cuts channels that must stay in blocks or conv groups")
            return None
        tag = cut
    starts = [sum(g.root().channels for g in tag.segments[:i]) for i in range(len(tag.segments))]
    return [Tag(tuple(g for g, at in zip(tag.segments, starts) if lo <= at < hi), tag.axis)
            for lo, hi in zip(bounds, bounds[1:])]


def _plain_channels(tag: Tag | None) -> bool:
    """Channels on axis 1, not flattened: what a conv, a BN or a PReLU can follow or read."""
    return tag is not None and tag.flat_size is None and tag.axis == 1


def _channel_blocks(tag: Tag | None, node: fx.Node) -> bool:
    """Whether ``node``'s input (an image batch) holds each channel of its groups as a block of
    consecutive channels on axis 1: the output of a depthwise conv with a channel multiplier."""
    return tag is not None and tag.flat_size is not None and tag.axis == 1 and \
        len(node.args[0].meta["tensor_meta"].shape) == 4


def _block_follower(b: _Builder, node: fx.Node, main: Tag, size: int, depthwise: bool = False) -> Tag:
    """A channel-wise layer whose output holds ``size`` consecutive channels per channel of its
    groups (a depthwise conv with a channel multiplier; a BatchNorm after one): it loses whole
    blocks, and what follows reads blocks (its input, for the multiplier, one channel each)."""
    name = node.target
    if depthwise:
        b.depthwise.add(name)
    b.follow(name, main)
    for g in main.segments:
        g.root().blocks[name] = size
    return Tag(main.segments, 1, size)


# -- channel-wise ops without parameters: channel c out depends on channel c in ------------------
@OPS.register(
    modules=(nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
             nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Hardtanh, nn.MaxPool2d, nn.AvgPool2d,
             nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout2d, nn.Identity, nn.ZeroPad2d,
             nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d, nn.Upsample),
    functions=(torch.relu, torch.relu_, nn.functional.relu, nn.functional.relu6, nn.functional.gelu,
               nn.functional.silu, nn.functional.hardswish, nn.functional.leaky_relu, nn.functional.elu,
               nn.functional.mish, nn.functional.hardtanh, nn.functional.softplus, torch.sigmoid, torch.tanh,
               nn.functional.sigmoid, nn.functional.hardsigmoid, nn.functional.max_pool2d,
               nn.functional.avg_pool2d, nn.functional.adaptive_avg_pool2d, nn.functional.adaptive_max_pool2d,
               nn.functional.dropout, nn.functional.interpolate, torch.clamp, nn.functional.dropout2d),
    # stochastic depth / drop path scale whole samples (identity in eval mode)
    library_functions=(("torchvision.ops.stochastic_depth", "stochastic_depth"), ("timm.layers.drop", "drop_path")),
    methods=("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "contiguous", "clone", "detach", "clamp", "clamp_",
             "hardtanh_", "float", "to"))
def passthrough(b: _Builder, node: fx.Node, main: Tag | None, in_tags: list[Tag | None]) -> Tag | None:
    return main


@OPS.register(functions=(getattr,), methods=("size", "dim"))
def shape_query(b: _Builder, node: fx.Node, main: Tag | None, in_tags: list[Tag | None]) -> Tag | None:
    return None


# -- layers with weights ---------------------------------------------------------------------
@OPS.register(modules=(SelectedConv2d,))
def selected_conv(b: _Builder, node: fx.Node, main: Tag | None, in_tags: list[Tag | None]) -> Tag | None:
    b.layer_kinds[node.target] = "conv"
    b.block(main, f"{node.target} already reads a channel subset (feature-map sampling)")
    return b.new_group(node)


@OPS.register(modules=(nn.Conv2d,))
def conv(b: _Builder, node: fx.Node, main: Tag | None, in_tags: list[Tag | None]) -> Tag | None:
    """A dense conv reads its input group and writes a new one; a depthwise conv follows its input;
    a grouped conv reads its input group by group (see :class:`Reader`) and writes a group that
    keeps as many channels in each of its conv groups."""
    name, layer = node.target, b.modules[node.target]
    b.layer_kinds[name] = "conv"
    usable = _plain_channels(main)
    if own_forward(layer):
        pads = own_padding(layer, tuple(node.args[0].meta["tensor_meta"].shape))
        if not (layer.groups == layer.in_channels == layer.out_channels and usable and pads is not None):
            return _conv_with_own_forward(b, node, main, pads)
    if layer.groups == 1:
        if usable and layer.padding_mode == "zeros":
            b.read(node, main, "conv")
        elif _channel_blocks(main, node) and layer.padding_mode == "zeros":  # after a channel multiplier
            b.read(node, main, "conv", channel_size=main.flat_size)
        else:
            b.block(main, f"{name} reads channels that are not on axis 1 or pads them non-zero")
        return b.new_group(node)
    if layer.groups == layer.in_channels == layer.out_channels and usable:
        b.depthwise.add(name)
        b.follow(name, main)
        return main
    if layer.groups == layer.in_channels and (usable or _channel_blocks(main, node)):
        # depthwise with a channel multiplier, or depthwise on blocks (after one): blocks of blocks
        multiplier = layer.out_channels // layer.in_channels
        return _block_follower(b, node, main, (main.flat_size or 1) * multiplier, depthwise=True)
    if usable and layer.padding_mode == "zeros" and layer.groups < layer.in_channels:
        b.read(node, main, "conv", groups=layer.groups)  # reconstructed group by group
    else:
        b.block(main, f"{name} is a grouped conv ({layer.groups} groups)")
    out = b.new_group(node)
    if layer.groups < layer.in_channels:  # its outputs are kept as many in every conv group
        out.segments[0].conv_groups = layer.groups
    else:  # depthwise, with a channel multiplier or on channels chanprune does not track
        b.block(out, f"{name} is a grouped conv ({layer.groups} groups): its output channels stay whole")
    return out


def _conv_with_own_forward(b: _Builder, node: fx.Node, main: Tag | None,
                           pads: tuple[int, int, int, int] | None) -> Tag | None:
    """A conv with a forward of its own (timm's Conv2dSame) reads and writes groups like any conv
    once its output is checked to be a convolution of its input with its weights (``pads``, from
    :func:`own_padding`): its samples are taken with that padding (:attr:`Reader.pads`). Otherwise
    both sides stay whole. (As a depthwise conv it follows, see :func:`conv`.)"""
    name, layer = node.target, b.modules[node.target]
    kind = type(layer).__name__
    if pads is None:
        b.block(main, f"{name} ({kind}) is not a plain convolution of its input")
        out = b.new_group(node)
        b.block(out, f"{name} ({kind}) is not a plain convolution of its input")
        return out
    if _plain_channels(main) and layer.groups < layer.in_channels:
        b.read(node, main, "conv", groups=layer.groups, pads=pads)
    else:
        b.block(main, f"{name} ({kind}, {layer.groups} groups) reads channels chanprune cannot follow into it")
    out = b.new_group(node)
    if 1 < layer.groups < layer.in_channels:
        out.segments[0].conv_groups = layer.groups
    elif layer.groups > 1:
        b.block(out, f"{name} is a grouped conv ({layer.groups} groups): its output channels stay whole")
    return out


def own_padding(layer: nn.Conv2d, shape: tuple[int, ...]) -> tuple[int, int, int, int] | None:
    """The (left, right, top, bottom) zero padding with which ``layer`` computes a convolution of a
    random input of ``shape`` with its weights: TensorFlow's 'SAME', or what its settings say
    (checked, not assumed); None when it computes something else."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(layer.weight)
    with torch.no_grad():
        y = layer(x)
        tf_same = []
        for size, k, s, d in zip(reversed(shape[2:]), reversed(layer.kernel_size), reversed(layer.stride),
                                 reversed(layer.dilation)):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            tf_same += [total // 2, total - total // 2]
        paddings = [tuple(tf_same)]
        if layer.padding_mode == "zeros" and not isinstance(layer.padding, str):
            paddings.append(conv_padding(layer))
        for pads in paddings:
            try:
                c = nn.functional.conv2d(nn.functional.pad(x, pads), layer.weight, layer.bias, layer.stride, 0,
                                         layer.dilation, layer.groups)
            except RuntimeError:  # a kernel larger than the padded input
                continue
            if computes_the_same(y, c):
                return pads
    return None


@OPS.register(modules=(nn.Linear,))
def linear(b: _Builder, node: fx.Node, main: Tag | None, in_tags: list[Tag | None]) -> Tag | None:
    """A Linear over the last axis reads the channels there (blocks of H*W after a flatten)."""
    b.layer_kinds[node.target] = "linear"
    if main is not None:
        shape = node.args[0].meta["tensor_meta"].shape
        size = main.flat_size or 1
        if main.axis != len(shape) - 1 or shape[-1] != main.channels * size or len(shape) not in (2, 4):
            b.block(main, f"{node.target} reads a tensor whose last axis is not the channels")
        else:
            b.read(node, main, "linear", size, "nc" if len(shape) == 2 else "nhwc")
    return b.new_group(node, -1)


@OPS.register(modules=FOLLOWER_NORMS)
def batch_norm(b: _Builder, node: fx.Node, main: Tag | None, in_tags: list[Tag | None]) -> Tag | None:
    """A BatchNorm follows its channels; right after a conv or Linear it folds into its targets."""
    module = b.modules[node.target]
    if _channel_blocks(main, node):  # after a depthwise conv with a channel multiplier
        return _block_follower(b, node, main, main.flat_size)
    if not _plain_channels(main):
        return b.unsupported(node, in_tags, type(module).__name__)
    b.follow(node.target, main)
    source = node.args[0]
    if source.op == "call_module" and len(source.users) == 1 and type(module) in FOLLOWER_NORMS and \
            isinstance(b.modules[source.target], (nn.Conv2d, nn.Linear)):
        b.bn_after[source.target] = node
    return main


@OPS.register(modules=(nn.PReLU,))
def prelu(b: _Builder, node: fx.Node, main: Tag | None, in_tags: list[Tag | None]) -> Tag | None:
    """One shared slope passes channels through; one slope per channel follows them."""
    if main is not None and main.flat_size is None:
        if b.modules[node.target].num_parameters == 1:
            return main
        if main.axis == 1:
            b.follow(node.target, main)
            return main
    return b.unsupported(node, in_tags, "PReLU")


@OPS.register(modules=(nn.LayerNorm, nn.LocalResponseNorm))
def coupling_norm(b: _Builder, node: fx.Node, main: Tag | None, in_tags: list[Tag | None]) -> Tag | None:
    b.block(main, f"{node.target} ({type(b.modules[node.target]).__name__}) couples every channel it normalises")
    return None


@OPS.register(modules=(nn.GroupNorm,))
def group_norm(b: _Builder, node: fx.Node, main: Tag | None, in_tags: list[Tag | None]) -> Tag | None:
    """A GroupNorm normalises each of its groups of consecutive channels on their own statistics,
    so removing whole groups leaves the others exact: the channels it reads become blocks of one
    norm group each (see :func:`coarsen`), which it follows."""
    module = b.modules[node.target]
    size = module.num_channels // module.num_groups
    if module.num_groups == 1 or coarsen(b, main, size) is None:
        b.block(main, f"{node.target} ({type(module).__name__}) couples every channel it normalises")
        return None
    return _block_follower(b, node, Tag(main.segments, 1, size), size)


# -- ops on the channel layout ----------------------------------------------------------------
@OPS.register(modules=(nn.Flatten,))
def flatten_module(b: _Builder, node: fx.Node, main: Tag | None, in_tags: list[Tag | None]) -> Tag | None:
    return flatten(b, node, main, b.modules[node.target].start_dim)


@OPS.register(functions=(torch.flatten,))
def flatten_function(b: _Builder, node: fx.Node, main: Tag | None, in_tags: list[Tag | None]) -> Tag | None:
    return flatten(b, node, main, call_arg(node, 1, "start_dim", 0))


@OPS.register(methods=("flatten", "view", "reshape"))
def flatten_method(b: _Builder, node: fx.Node, main: Tag | None, in_tags: list[Tag | None]) -> Tag | None:
    return flatten(b, node, main, None)


def flatten(b: _Builder, node: fx.Node, tag: Tag | None, start_dim: object) -> Tag | None:
    """N,C,H,W to N,C*H*W keeps channel blocks of H*W features; a view that splits the channels
    into paths (N,P*C,H,W to N,P,C,H,W: a selective-kernel or split attention) ties the P pieces
    channel by channel, and one that merges paths back (N,P,1,C to N,P*C) holds P copies of
    them; a no-op reshape keeps the tag; a reshape that keeps channels whole moves the axis;
    anything else blocks."""
    if tag is None:
        return None
    in_shape = tuple(node.args[0].meta["tensor_meta"].shape)
    out_shape = tuple(node.meta["tensor_meta"].shape)
    if (tag.flat_size is None or _channel_blocks(tag, node)) and tag.axis == 1 and len(in_shape) == 4 and \
            len(out_shape) == 2 and out_shape[0] == in_shape[0] and start_dim in (None, 1):
        return Tag(tag.segments, 1, (tag.flat_size or 1) * in_shape[2] * in_shape[3])
    if in_shape == out_shape:
        return tag
    if tag.flat_size is None and start_dim is None:
        split = _split_paths(in_shape, out_shape, tag.axis)
        shuffled = split is not None and any(_moves_axis(u, split[0], len(out_shape)) for u in node.users)
        if split is not None and not shuffled:  # a transpose of the channels after it: a channel shuffle
            return _paths(b, node, tag, *split)
        merged = _merged_paths(in_shape, out_shape, tag.axis)
        if merged is not None and _sized_by_shape(node, merged[0]):
            return Tag(tag.segments * merged[1], merged[0])
        axis = _channel_axis_kept(in_shape, out_shape, tag.axis)
        if axis is not None and _sized_by_shape(node, axis):
            return Tag(tag.segments, axis)
    b.block(tag, f"{node.name} reshapes the channels")
    return None


MAX_PATHS = 64  # a merge of more copies than this is not a split attention's paths


def _split_paths(in_shape: tuple[int, ...], out_shape: tuple[int, ...], axis: int) -> tuple[int, int] | None:
    """(output axis of C, P) of a view that splits the P*C channels into axes that end in one of
    size C, path-major, each (path, channel) keeping its own entries (N,P*C,H,W to N,P,C,H,W or
    N,P*C,1,1 to N,1,P,C); None when the view is not one."""
    before, size, after = math.prod(in_shape[:axis]), in_shape[axis], math.prod(in_shape[axis + 1:])
    found = [(j, size // out_shape[j]) for j in range(2, len(out_shape))
             if 1 < out_shape[j] < size and size % out_shape[j] == 0
             and math.prod(out_shape[:j]) == before * (size // out_shape[j])
             and math.prod(out_shape[j + 1:]) == after
             and any(math.prod(out_shape[:i]) == before for i in range(1, j))]
    return found[0] if len(found) == 1 else None


def _merged_paths(in_shape: tuple[int, ...], out_shape: tuple[int, ...], axis: int) -> tuple[int, int] | None:
    """(output axis, P) of a view that merges the axes before the channel axis (not the batch)
    into it, channels fastest (N,P,1,C to N,P*C): every entry of those axes holds the same
    channels, so the merged axis holds P copies of them; None when the view is not one."""
    before, size, after = math.prod(in_shape[:axis]), in_shape[axis], math.prod(in_shape[axis + 1:])
    found = [(o, out_shape[o] // size) for o in range(1, len(out_shape))
             if out_shape[o] > size and out_shape[o] % size == 0 and out_shape[o] // size <= MAX_PATHS
             and math.prod(out_shape[:o]) * (out_shape[o] // size) == before
             and math.prod(out_shape[o + 1:]) == after
             and any(math.prod(in_shape[:i]) == math.prod(out_shape[:o]) for i in range(1, axis))]
    return found[0] if len(found) == 1 else None


def _moves_axis(node: fx.Node, axis: int, ndim: int) -> bool:
    """Whether ``node`` is a transpose or permute that moves ``axis`` of its ``ndim``-axis input."""
    if node.target in ("transpose", torch.transpose):
        return axis in {call_arg(node, i, name) % ndim for i, name in ((1, "dim0"), (2, "dim1"))}
    if node.target in ("permute", torch.permute):
        dims = node.args[1] if isinstance(node.args[1], (tuple, list)) else node.args[1:]
        return dims[axis] % ndim != axis
    return False


def _view_sizes(node: fx.Node) -> tuple:
    """The sizes a ``view`` / ``reshape`` call asks for, given one by one or as one sequence."""
    return tuple(node.args[1]) if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]


def _sized_by_shape(node: fx.Node, axis: int) -> bool:
    """Whether the view's size at ``axis`` is computed from a tensor's shape (or is -1), so that it
    follows the pruned width rather than the traced one."""
    sizes = _view_sizes(node)
    return len(sizes) > axis and (isinstance(sizes[axis], fx.Node) or sizes[axis] == -1)


def _channel_axis_kept(in_shape: tuple[int, ...], out_shape: tuple[int, ...], axis: int) -> int | None:
    """The output axis that holds the channels of a reshape that leaves them whole: as many
    entries before it as before the input's channel axis and the same size, so each channel's
    entries stay its own (N,C,H,W to N,C,H*W; N,1,C,1 to N,C,1,1); None when there is no single one."""
    before, size = math.prod(in_shape[:axis]), in_shape[axis]
    found = [a for a in range(len(out_shape)) if out_shape[a] == size and math.prod(out_shape[:a]) == before]
    return found[0] if len(found) == 1 and size > 1 else None


@OPS.register(functions=(torch.unsqueeze,), methods=("unsqueeze",))
def unsqueeze(b: _Builder, node: fx.Node, main: Tag | None, in_tags: list[Tag | None]) -> Tag | None:
    """A new axis of size 1 before the channel axis moves it one along."""
    if main is None:
        return None
    dim = call_arg(node, 1, "dim") % len(node.meta["tensor_meta"].shape)
    return Tag(main.segments, main.axis + 1 if dim <= main.axis else main.axis, main.flat_size)


@OPS.register(functions=(operator.matmul, torch.matmul), methods=("matmul",))
def matmul(b: _Builder, node: fx.Node, main: Tag | None, in_tags: list[Tag | None]) -> Tag | None:
    """``a @ b`` keeps channels that are the rows of ``a`` (or the columns of ``b``) when the other
    side holds none (GCNet's attention pooling: each channel's entries weighted by a map);
    channels that are summed over, or on both sides, block."""
    left, right = (b.tags.get(a) if isinstance(a, fx.Node) else None for a in node.args[:2])
    ndim = len(node.meta["tensor_meta"].shape)
    if left is not None and right is None and left.flat_size is None and \
            left.axis == len(node.args[0].meta["tensor_meta"].shape) - 2:
        return Tag(left.segments, ndim - 2)
    if right is not None and left is None and right.flat_size is None and \
            right.axis == len(node.args[1].meta["tensor_meta"].shape) - 1:
        return Tag(right.segments, ndim - 1)
    for t in (left, right):
        b.block(t, f"{node.name} multiplies matrices over its channels")
    return None


def _paths(b: _Builder, node: fx.Node, tag: Tag, axis: int, paths: int) -> Tag | None:
    """The channels viewed as ``paths`` pieces with C on ``axis``: channel c of every path is one
    channel (a softmax over the paths mixes only those), so the pieces are tied. The view must
    take C from the tensor's shape (or -1), so that it follows the pruned width."""
    if len(_view_sizes(node)) != len(node.meta["tensor_meta"].shape) or not _sized_by_shape(node, axis):
        b.block(tag, f"{node.name} views the channels as paths with a fixed width")
        return None
    width = tag.channels // paths
    pieces = _pieces(b, node, tag, [p * width for p in range(paths + 1)], tied=True)
    out = pieces and _tie_all(b, node, pieces)
    return out and Tag(out.segments, axis)


def _tie_all(b: _Builder, node: fx.Node, tags: list[Tag]) -> Tag | None:
    """``tags`` tied channel by channel, as a gating multiply ties two (the pieces or inputs of
    ``node``), in their current groups; None when they do not line up."""
    out = tags[0]
    for tag in tags[1:]:
        out = b.merge(b.current(out), b.current(tag), False, node)
        if out is None:
            return None
    return b.current(out)


@OPS.register(functions=(torch.stack,))
def stack(b: _Builder, node: fx.Node, main: Tag | None, in_tags: list[Tag | None]) -> Tag | None:
    """``stack`` of values that hold the same channels (a selective-kernel block's paths, summed
    later) ties them one to one; a new axis before the channel axis moves it one along."""
    parts = [node.args[0]] if isinstance(node.args[0], fx.Node) else node.args[0]
    tags = [b.tags.get(p) if isinstance(p, fx.Node) else None for p in parts]
    if isinstance(node.args[0], fx.Node) or not all(t is not None and t.flat_size is None for t in tags):
        for t in tags:
            b.block(t, f"{node.name} stacks channels chanprune cannot track")
        return None
    out = _tie_all(b, node, tags)
    if out is None:
        return None
    dim = call_arg(node, 1, "dim", 0) % len(node.meta["tensor_meta"].shape)
    return Tag(out.segments, out.axis + 1 if dim <= out.axis else out.axis)


@OPS.register(functions=(torch.softmax, nn.functional.softmax, torch.log_softmax, nn.functional.log_softmax),
              methods=("softmax", "log_softmax"))
def softmax(b: _Builder, node: fx.Node, main: Tag | None, in_tags: list[Tag | None]) -> Tag | None:
    """A softmax over another axis (the paths of a selective-kernel attention) keeps each channel's
    entries apart; over the channel axis it couples them all."""
    if main is None:
        return None
    dim = call_arg(node, 1, "dim")
    if dim is None or main.flat_size is not None or dim % len(node.meta["tensor_meta"].shape) == main.axis:
        b.block(main, f"{node.name} normalises over the channel axis")
        return None
    return main


@OPS.register(modules=(nn.PixelShuffle,))
def pixel_shuffle_module(b: _Builder, node: fx.Node, main: Tag | None, in_tags: list[Tag | None]) -> Tag | None:
    return pixel_shuffle(b, node, main, b.modules[node.target].upscale_factor)


@OPS.register(functions=(nn.functional.pixel_shuffle, torch.pixel_shuffle))
def pixel_shuffle_function(b: _Builder, node: fx.Node, main: Tag | None, in_tags: list[Tag | None]) -> Tag | None:
    return pixel_shuffle(b, node, main, call_arg(node, 1, "upscale_factor"))


def pixel_shuffle(b: _Builder, node: fx.Node, tag: Tag | None, factor: int) -> Tag | None:
    """Channel c of the output is channels c·r²..(c+1)·r²−1 of the input: the input's group
    becomes one of r²-channel blocks for its writers and followers (nothing may read it before)."""
    if tag is None:
        return None
    group = coarsen(b, tag, factor * factor)
    if group is None:
        b.block(tag, f"{node.name} (pixel shuffle) reads channels that are also used elsewhere")
        return None
    return Tag((group,), 1)


def coarsen(b: _Builder, tag: Tag | None, size: int) -> ChannelGroup | None:
    """Make ``tag``'s group one of ``size``-channel blocks for its writers and followers, and the
    values that hold it say so; None (nothing changed) unless it is a single plain group that
    nothing has read yet, off any trunk and not written by a grouped conv."""
    if tag is None or len(tag.segments) != 1:
        return None
    group = tag.segments[0].root()
    earlier = [t for t in b.tags.values() if t is not None and any(g.root() is group for g in t.segments)]
    if tag.axis != 1 or tag.flat_size is not None or group.readers or group.residual or group.conv_groups > 1 or \
            group.channels % size or any(len(t.segments) != 1 or t.flat_size is not None for t in earlier):
        return None
    group.channels //= size
    for member in dict.fromkeys([*group.writers, *group.followers]):
        group.blocks[member] = group.block_of(member) * size
    for n, t in list(b.tags.items()):  # values that hold the group now hold blocks
        if t in earlier:
            b.tags[n] = Tag(t.segments, t.axis, size)
    return group


@OPS.register(functions=(torch.permute,), methods=("permute",))
def permute(b: _Builder, node: fx.Node, main: Tag | None, in_tags: list[Tag | None]) -> Tag | None:
    """The channel axis moves where the permutation puts it."""
    if main is None:
        return None
    dims = node.args[1:] if not isinstance(node.args[1], (tuple, list)) else node.args[1]
    if main.flat_size is not None:
        b.block(main, f"{node.name} permutes flattened channels")
        return None
    return Tag(main.segments, [d % len(dims) for d in dims].index(main.axis))


@OPS.register(functions=(torch.transpose,), methods=("transpose",))
def transpose(b: _Builder, node: fx.Node, main: Tag | None, in_tags: list[Tag | None]) -> Tag | None:
    """The channel axis moves when it is one of the two swapped, and stays otherwise."""
    if main is None:
        return None
    ndim = len(node.meta["tensor_meta"].shape)
    first, second = (call_arg(node, i, name) % ndim for i, name in ((1, "dim0"), (2, "dim1")))
    if main.flat_size is not None and main.axis in (first, second):
        b.block(main, f"{node.name} transposes flattened channels")
        return None
    swapped = {first: second, second: first}
    return Tag(main.segments, swapped.get(main.axis, main.axis), main.flat_size)


@OPS.register(functions=(torch.mean, torch.sum, torch.amax), methods=("mean", "sum", "amax"))
def reduce(b: _Builder, node: fx.Node, main: Tag | None, in_tags: list[Tag | None]) -> Tag | None:
    """A reduction over other axes keeps the channels (the axis shifts unless ``keepdim``)."""
    if main is None:
        return None
    dims = call_arg(node, 1, "dim")
    ndim = len(node.args[0].meta["tensor_meta"].shape)
    dims = {d % ndim for d in ([dims] if isinstance(dims, int) else list(dims or []))}
    blocks = _channel_blocks(main, node)  # blocks of channels stay blocks when space is reduced
    if (main.flat_size is not None and not blocks) or not dims or main.axis in dims:
        b.block(main, f"{node.name} reduces over the channel axis")
        return None
    keepdim = call_arg(node, 2, "keepdim", False)
    return Tag(main.segments, main.axis if keepdim else main.axis - sum(d < main.axis for d in dims), main.flat_size)


@OPS.register(functions=(nn.functional.pad,))
def pad(b: _Builder, node: fx.Node, main: Tag | None, in_tags: list[Tag | None]) -> Tag | None:
    """``F.pad`` pads the last len(pad) // 2 axes, last axis first: the channels pass through
    unless the channel axis's pair is non-zero, whatever the rank (on an (N, C) tensor it is
    the first pair)."""
    if main is None:
        return None
    widths = list(call_arg(node, 1, "pad"))
    ndim = len(node.args[0].meta["tensor_meta"].shape)
    pair = widths[2 * (ndim - 1 - main.axis):][:2]
    if any(p != 0 for p in pair):
        b.block(main, f"{node.name} pads the channel axis")
        return None
    return main


@OPS.register(functions=(operator.getitem,))
def getitem(b: _Builder, node: fx.Node, main: Tag | Pieces | None, in_tags: list[Tag | None]) -> Tag | None:
    """A piece of a split; or indexing that keeps the channel axis whole (spatial crops) or
    slices a range of it (``x[:, a:b]``, a piece cut from its groups)."""
    index = node.args[1]
    if isinstance(main, Pieces):
        return main.tags[index] if isinstance(index, int) else b.block(main, f"{node.name} indexes a split")
    if main is None:
        return None
    if isinstance(index, tuple) and len(index) > main.axis and main.flat_size is None and \
            all(isinstance(i, slice) or i is Ellipsis for i in index[: main.axis + 1]) and \
            Ellipsis not in index[: main.axis]:
        start, stop, step = index[main.axis].indices(main.channels)
        if step == 1 and (start, stop) == (0, main.channels):
            return main
        if step == 1 and start < stop:
            piece = _channel_range(b, node, main, [start, stop])
            return piece and piece[0]
    b.block(main, f"{node.name} indexes the channel axis")
    return None




@OPS.register(functions=(torch.narrow,), methods=("narrow",))
def narrow(b: _Builder, node: fx.Node, main: Tag | None, in_tags: list[Tag | None]) -> Tag | None:
    """``x.narrow(dim, start, length)``: a channel range when ``dim`` is the channel axis."""
    if main is None:
        return None
    dim, start, length = (call_arg(node, i, n) for i, n in ((1, "dim"), (2, "start"), (3, "length")))
    ndim = len(node.args[0].meta["tensor_meta"].shape)
    if dim % ndim != main.axis:
        return main
    if main.flat_size is not None or not isinstance(start, int):
        b.block(main, f"{node.name} narrows the channel axis")
        return None
    piece = _channel_range(b, node, main, [start % main.channels, start % main.channels + length])
    return piece and piece[0]


@OPS.register(functions=(torch.split, torch.chunk, torch.functional.split), methods=("split", "chunk"))
def split(b: _Builder, node: fx.Node, main: Tag | None, in_tags: list[Tag | None]) -> Pieces | None:
    """``split`` / ``chunk``: along the channel axis each piece is a range of channels cut from the
    input's groups (their sizes from the traced shapes); along another axis every piece carries
    the input's channels."""
    if main is None:
        return None
    dim = call_arg(node, 2, "dim", 0)
    metas = node.meta["tensor_meta"]
    ndim = len(node.args[0].meta["tensor_meta"].shape)
    if dim % ndim != main.axis:
        return Pieces(tuple(main for _ in metas))
    if main.flat_size is not None:
        b.block(main, f"{node.name} splits flattened channels")
        return None
    sizes = [int(meta.shape[main.axis]) for meta in metas]
    pieces = _channel_range(b, node, main, [sum(sizes[:i]) for i in range(len(sizes) + 1)])
    return Pieces(tuple(pieces)) if pieces is not None else None


@OPS.register(functions=(torch.cat,))
def concat(b: _Builder, node: fx.Node, main: Tag | None, in_tags: list[Tag | None]) -> Tag | None:
    """``cat`` along the channel axis (1, or the last axis of channels-last values) lays its
    inputs' groups side by side."""
    parts = node.args[0]
    dim = call_arg(node, 1, "dim", 0)
    held = b.tags.get(parts) if isinstance(parts, fx.Node) else None
    tags = list(held.tags) if isinstance(held, Pieces) else \
        [b.tags.get(p) if isinstance(p, fx.Node) else None for p in parts]
    ndim = len(node.meta["tensor_meta"].shape)
    if all(t is not None and t.flat_size is None and t.axis == dim % ndim for t in tags):  # NCHW, or channels last
        return Tag(tuple(g for t in tags for g in t.segments), dim % ndim)
    if isinstance(held, Pieces):
        b.block(held, f"{node.name} concatenates channels chanprune cannot track")
    for t in tags:
        b.block(t, f"{node.name} concatenates channels chanprune cannot track")
    return None


_ADDS = (operator.add, operator.iadd, torch.add, "add", "add_")


@OPS.register(functions=(operator.add, operator.iadd, torch.add, operator.sub, torch.sub),
              methods=("add", "add_", "sub"))
def residual_tie(b: _Builder, node: fx.Node, main: Tag | None, in_tags: list[Tag | None]) -> Tag | None:
    """A residual add (or subtraction) ties its operands' channels one to one."""
    return tie(b, node, residual=True)


@OPS.register(functions=(operator.mul, operator.imul, torch.mul), methods=("mul", "mul_"))
def gating_tie(b: _Builder, node: fx.Node, main: Tag | None, in_tags: list[Tag | None]) -> Tag | None:
    """A gating multiply (squeeze-excitation) ties its operands; a per-channel parameter scales."""
    return tie(b, node, residual=False)


def tie(b: _Builder, node: fx.Node, residual: bool) -> Tag | None:
    operands = list(node.args[:2])
    tagged = [(a, b.tags.get(a)) for a in operands if isinstance(a, fx.Node) and b.tags.get(a)]
    if len(tagged) == 2:
        out = b.merge(tagged[0][1], tagged[1][1], residual, node)
        if out is not None and residual and node.target in _ADDS:
            b.note_shortcut(*operands)
        return out
    if len(tagged) != 1:
        return None
    arg, tag = tagged[0]
    other = next((a for a in operands if a is not arg), None)
    meta = other.meta.get("tensor_meta") if isinstance(other, fx.Node) else None
    shape = tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else ()
    axis_from_end = len(arg.meta["tensor_meta"].shape) - tag.axis
    if len(shape) < axis_from_end or shape[-axis_from_end] == 1:
        return tag
    path = None if residual else channel_scale(b, other, shape, axis_from_end, tag)
    if path is not None:
        b.layouts[path] = list(tag.segments)
        for g in tag.segments:
            g.root().scales.append(path)
            if tag.flat_size is not None:  # blocks of consecutive entries per channel
                g.root().blocks[path] = tag.flat_size
        return tag
    what = "adds to its channels" if residual else "scales its channels by"
    b.block(tag, f"{node.name} {what} a tensor chanprune does not track (the model's input, or the "
                 "output of an op it cannot follow)")
    return None


def channel_scale(b: _Builder, other: fx.Node, shape: tuple[int, ...], axis_from_end: int, tag: Tag) -> str | None:
    """The attribute path of a per-channel parameter or buffer that ``other`` is (directly, or
    through view / reshape / unsqueeze / indexing) when it broadcasts along the channel axis
    only; None otherwise."""
    entries = tag.channels * (tag.flat_size or 1)
    if shape[-axis_from_end] != entries or \
            any(d != 1 for i, d in enumerate(shape) if i != len(shape) - axis_from_end):
        return None
    source = other
    while source.op in ("call_method", "call_function") and (
            source.target in ("view", "reshape", "unsqueeze") or source.target is operator.getitem):
        source = source.args[0]
    if source.op != "get_attr":
        return None
    value = operator.attrgetter(source.target)(b.gm)
    if not isinstance(value, torch.Tensor) or sorted(value.shape)[:-1] != [1] * (value.ndim - 1) or \
            max(value.shape, default=0) != entries or source.target in b.layouts:
        return None
    return source.target


OPS.take_pieces.update((getitem, concat))  # a split's tuple may be indexed or concatenated whole
