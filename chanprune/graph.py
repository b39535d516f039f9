"""Channel dependency graph: which layers write a set of channels and which layers read it.

The model is traced with ``torch.fx`` and shapes are propagated with an example input. Every
dense Conv2d or Linear starts a *channel group* (its output channels). Channel-wise layers
(BatchNorm, per-channel PReLU, depthwise convs) *follow* a group: their channel i is the
group's channel i, and so does a per-channel parameter that multiplies it (layer scale), a
*scale*. Parameter-free channel-wise ops (activations, pooling, dropout, spatial
slicing and padding, reductions over space) pass it through. ``flatten`` turns it into blocks
of H*W features, ``permute`` moves the channel axis (a Linear over the last axis reads it).
``pixel_shuffle`` by r makes each channel a block of r² consecutive channels of what its
writer and followers produce (they lose whole blocks).
``cat`` along channels lays several groups side by side; a residual ``add`` or a gating ``mul``
(squeeze-excitation) ties two groups channel by channel, so they merge into one group with
several writers. A dense Conv2d or Linear that reads a group is a *reader*.

Pruning a group keeps a subset of its channels: every writer loses filters, every follower
loses entries and every reader loses input channels. A group that meets an operation this
module cannot reason about is marked unprunable with the reason and the node's name, never
pruned wrongly.
"""

from __future__ import annotations

import operator
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import ChanpruneError
from .layers import SelectedConv2d

# Modules whose output channel c depends only on input channel c and has no parameters.
PASSTHROUGH_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Hardtanh,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
    nn.Dropout, nn.Dropout2d, nn.Identity, nn.ZeroPad2d, nn.Upsample,
)
PASSTHROUGH_FUNCTIONS = {
    torch.relu, torch.relu_, nn.functional.relu, nn.functional.relu6, nn.functional.gelu,
    nn.functional.silu, nn.functional.hardswish, nn.functional.leaky_relu, nn.functional.elu,
    nn.functional.mish, nn.functional.hardtanh, nn.functional.softplus, torch.sigmoid, torch.tanh,
    nn.functional.sigmoid, nn.functional.hardsigmoid, nn.functional.max_pool2d, nn.functional.avg_pool2d,
    nn.functional.adaptive_avg_pool2d, nn.functional.adaptive_max_pool2d, nn.functional.dropout,
    nn.functional.interpolate, torch.clamp, torch.nn.functional.dropout2d,
}
# Functions of model libraries that treat each sample (row) as a whole, so channel c passes through:
# stochastic depth / drop path (identity in eval mode). Matched by module and name: the graph never
# imports these libraries.
PASSTHROUGH_LIBRARY_FUNCTIONS = {("torchvision.ops.stochastic_depth", "stochastic_depth"),
                                 ("timm.layers.drop", "drop_path")}
PASSTHROUGH_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "contiguous", "clone", "detach",
                       "clamp", "clamp_", "hardtanh_", "float", "to"}
TIE_FUNCTIONS = {operator.add: True, operator.iadd: True, torch.add: True, operator.sub: True,
                 torch.sub: True, operator.mul: False, operator.imul: False, torch.mul: False}
TIE_METHODS = {"add": True, "add_": True, "sub": True, "mul": False, "mul_": False}
REDUCTIONS = {torch.mean: "mean", torch.sum: "sum", torch.amax: "amax"}
FOLLOWER_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
COUPLING_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
SHAPE_QUERIES = {"size", "dim"}
OUTPUT_REASON = "its channels are a model output"


@dataclass
class Reader:
    """A dense Conv2d or Linear reading a group.

    ``channel_size`` input features belong to one channel (H*W for a Linear after flatten);
    ``layout`` says where the channel axis is ("nchw", "nc" or "nhwc"); ``bn`` is a BatchNorm
    applied directly to the reader's output (folded into its targets); ``shortcut`` names the fx
    node added to the reader's (BN's) output by a residual add, when there is one.
    """

    name: str
    kind: str
    channel_size: int = 1
    layout: str = "nchw"
    bn: str | None = None
    shortcut: str | None = None
    input_node: str = ""
    output_node: str = ""


@dataclass(eq=False)
class ChannelGroup:
    """A set of channels with the layers that write, follow and read it."""

    name: str
    channels: int
    writers: list[str] = field(default_factory=list)
    followers: list[str] = field(default_factory=list)
    readers: list[Reader] = field(default_factory=list)
    blocked_by: list[str] = field(default_factory=list)
    residual: bool = False  # tied to other writers by a residual add: a trunk
    parent: "ChannelGroup | None" = field(default=None, repr=False)
    blocks: dict[str, int] = field(default_factory=dict)  # writer/follower -> its channels per group channel
    scales: list[str] = field(default_factory=list)  # per-channel parameters multiplying it (layer scale)

    def block_of(self, member: str) -> int:
        """Consecutive channels of ``member`` per channel of the group (r² before a pixel shuffle)."""
        return self.blocks.get(member, 1)

    @property
    def prunable(self) -> bool:
        return not self.blocked_by and bool(self.readers)

    @property
    def writer(self) -> str:
        return self.writers[0]

    @property
    def members(self) -> list[str]:
        return [*self.writers, *self.followers, *(r.name for r in self.readers)]

    def root(self) -> "ChannelGroup":
        group = self
        while group.parent is not None:
            group = group.parent
        return group


@dataclass(frozen=True)
class NodeLayout:
    """The channel groups a traced value holds side by side along ``axis`` (H*W features per
    channel when ``flat_size`` is set): what to slice when one of those groups is pruned."""

    groups: tuple[str, ...]
    axis: int
    flat_size: int | None = None


@dataclass
class ChannelGraph:
    """Channel groups of a model, the traced module, and the channel layout of every member.

    ``layouts[name]`` lists the groups laid side by side along a follower's or reader's channel
    axis (one entry unless the input is a concatenation); ``depthwise`` holds depthwise convs
    (followers whose FLOPs scale with their channels); ``order`` ranks modules by execution;
    ``node_layouts`` gives the channel layout of every traced value that carries groups.
    """

    groups: list[ChannelGroup]
    input_shape: tuple[int, ...]
    layer_kinds: dict[str, str]
    gm: fx.GraphModule
    layouts: dict[str, list[str]]
    depthwise: set[str]
    order: dict[str, int]
    node_layouts: dict[str, NodeLayout] = field(default_factory=dict)

    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def group(self, name: str) -> ChannelGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def first_use(self, group: ChannelGroup) -> int:
        """Execution rank of the group's first reader: groups are pruned in this order."""
        return min(self.order[r.name] for r in group.readers)


@dataclass(frozen=True)
class _Tag:
    """What a traced value holds along its channel axis: groups side by side, maybe flattened."""

    segments: tuple[ChannelGroup, ...]
    axis: int = 1
    flat_size: int | None = None  # H*W per channel once flattened

    @property
    def channels(self) -> int:
        return sum(g.root().channels for g in self.segments)


class _Tracer(fx.Tracer):
    """torch.fx tracer that keeps chanprune's own layers as leaves, and subclasses of BatchNorm
    and Linear from other libraries (timm's BatchNormAct2d: BN then a channel-wise activation)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (SelectedConv2d, nn.Linear, *FOLLOWER_NORMS)) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model``; a clear error if torch.fx cannot."""
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # fx raises many types on dynamic control flow
        raise ChanpruneError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(err).__name__}: {_first_line(err)}); "
            "remove data-dependent control flow from forward() or wrap it in a leaf module") from err
    return fx.GraphModule(model, graph, type(model).__name__)


def build_graph(model: nn.Module, example: torch.Tensor, warn: bool = True) -> ChannelGraph:
    """Trace ``model`` on ``example`` (a batch of 1 is enough) and find its channel groups."""
    gm = trace(model)
    check_runs(gm, example)
    try:
        ShapeProp(gm).propagate(example)
    except Exception as err:
        raise ChanpruneError(f"the model does not run on an input of shape {tuple(example.shape)} "
                             f"({type(err).__name__}: {_first_line(err)}); pass the right --input-size") from err
    builder = _Builder(gm)
    for node in gm.graph.nodes:
        builder.visit(node)
    return builder.finish(tuple(example.shape), warn)


PROBE_SIZES = (8, 16, 32, 64, 128, 224, 256, 512)


def check_runs(gm: fx.GraphModule, example: torch.Tensor) -> None:
    """Raise a clear error when the model does not run on ``example``: images too small for its
    pooling, or the wrong size for a Linear after a flatten. The message names a square size the
    model does run on, when one of :data:`PROBE_SIZES` does. (Checked before ShapeProp, which
    prints a traceback of its own when a node fails.)"""
    try:
        with torch.no_grad():
            gm(example)
    except Exception as err:
        height, width = example.shape[-2:]
        reason = f"{type(err).__name__}: {_first_line(err)}"
        size = _size_that_runs(gm, example)
        if size is None:
            raise ChanpruneError(f"the model does not run on images of {height}x{width} ({reason}); check the "
                                 "image size and channel count (--input-size H W resizes a folder of images)") from err
        problem = (f"images of {height}x{width} are too small for this model" if size > max(height, width)
                   else f"the model does not run on images of {height}x{width}")
        raise ChanpruneError(f"{problem} ({reason}); it runs on {size}x{size} images: resize them "
                             f"(--input-size {size} {size} for a folder of images)") from err


def _size_that_runs(gm: fx.GraphModule, example: torch.Tensor) -> int | None:
    """The smallest of :data:`PROBE_SIZES` (square) the model runs on, or None."""
    for size in PROBE_SIZES:
        probe = example.new_zeros((1, example.shape[1], size, size))
        try:
            with torch.no_grad():
                gm(probe)
        except Exception:  # any failure means: not this size
            continue
        return size
    return None


def _first_line(err: BaseException) -> str:
    """The first line of an exception's message (torch's often run to many lines)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""


class _Builder:
    """Walks the traced graph once, tagging every value with the channel groups it carries."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.tags: dict[fx.Node, _Tag | None] = {}
        self.created: list[ChannelGroup] = []
        self.layouts: dict[str, list[ChannelGroup]] = {}
        self.layer_kinds: dict[str, str] = {}
        self.depthwise: set[str] = set()
        self.order: dict[str, int] = {}
        self.readers: dict[str, tuple[Reader, list[ChannelGroup]]] = {}
        self.bn_after: dict[str, fx.Node] = {}  # conv/linear -> the plain BN node right after it
        calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        self.shared = {name for name, count in calls.items() if count > 1}

    # -- bookkeeping ---------------------------------------------------------------------
    def block(self, tag: _Tag | None, why: str) -> None:
        if tag is None:
            return
        for g in tag.segments:
            root = g.root()
            if why not in root.blocked_by:
                root.blocked_by.append(why)

    def new_group(self, node: fx.Node, axis: int = 1) -> _Tag:
        shape = node.meta["tensor_meta"].shape
        group = ChannelGroup(name=node.target, channels=int(shape[axis]), writers=[node.target])
        self.created.append(group)
        return _Tag((group,), axis % len(shape))

    def merge(self, a: _Tag, b: _Tag, residual: bool, node: fx.Node) -> _Tag | None:
        """Tie two tags channel by channel (residual add, gating multiply)."""
        sizes_a = [g.root().channels for g in a.segments]
        sizes_b = [g.root().channels for g in b.segments]
        if sizes_a != sizes_b or a.axis != b.axis or a.flat_size or b.flat_size:
            why = f"{node.name} combines channels that do not line up"
            self.block(a, why)
            self.block(b, why)
            return None
        for ga, gb in zip(a.segments, b.segments):
            ra, rb = sorted((ga.root(), gb.root()), key=self.created.index)
            if ra is not rb:
                rb.parent = ra
                ra.writers += [w for w in rb.writers if w not in ra.writers]
                ra.followers += [f for f in rb.followers if f not in ra.followers]
                ra.readers += rb.readers
                ra.blocked_by += [w for w in rb.blocked_by if w not in ra.blocked_by]
                ra.residual = ra.residual or rb.residual
                ra.blocks.update(rb.blocks)
                ra.scales += [a for a in rb.scales if a not in ra.scales]
            ra.residual = ra.residual or residual
        return a

    def follow(self, name: str, tag: _Tag) -> None:
        self.layouts[name] = list(tag.segments)
        for g in tag.segments:
            g.root().followers.append(name)

    def read(self, node: fx.Node, tag: _Tag, reader: Reader) -> None:
        if len({g.root() for g in tag.segments}) != len(tag.segments):
            self.block(tag, f"{node.target} reads the same channels twice")
            return
        reader.input_node = node.args[0].name
        reader.output_node = node.name
        self.readers[reader.name] = (reader, list(tag.segments))
        for g in tag.segments:
            g.root().readers.append(reader)

    def unsupported(self, node: fx.Node, in_tags: list[_Tag | None], what: str) -> None:
        for t in in_tags:
            self.block(t, f"{node.name} ({what}) is not supported")

    # -- the walk ------------------------------------------------------------------------
    def visit(self, node: fx.Node) -> None:
        in_tags = [self.tags.get(a) for a in node.all_input_nodes]
        main = self.tags.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if node.op == "call_module":
            self.order.setdefault(node.target, len(self.order))
            out = self.visit_module(node, main, in_tags)
        elif node.op == "call_function":
            out = self.visit_function(node, main, in_tags)
        elif node.op == "call_method":
            out = self.visit_method(node, main, in_tags)
        elif node.op == "output":
            for t in in_tags:
                self.block(t, OUTPUT_REASON)
            out = None
        else:
            out = None
        self.tags[node] = out

    def visit_module(self, node: fx.Node, main: _Tag | None, in_tags: list[_Tag | None]) -> _Tag | None:
        name, module = node.target, self.modules[node.target]
        if name in self.shared and isinstance(module, (nn.Conv2d, nn.Linear, *FOLLOWER_NORMS, nn.PReLU)):
            for t in in_tags:
                self.block(t, f"{name} is called more than once")
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                out = self.new_group(node, -1 if isinstance(module, nn.Linear) else 1)
                self.block(out, f"{name} is called more than once")
                return out
            return None
        if isinstance(module, SelectedConv2d):
            self.layer_kinds[name] = "conv"
            self.block(main, f"{name} already reads a channel subset (feature-map sampling)")
            return self.new_group(node)
        if isinstance(module, nn.Conv2d):
            return self.visit_conv(node, module, main)
        if isinstance(module, nn.Linear):
            self.layer_kinds[name] = "linear"
            self.visit_linear(node, main)
            return self.new_group(node, -1)
        if isinstance(module, FOLLOWER_NORMS) and main is not None and main.flat_size is None and main.axis == 1:
            self.follow(name, main)
            source = node.args[0]
            if source.op == "call_module" and len(source.users) == 1 and type(module) in FOLLOWER_NORMS and \
                    isinstance(self.modules[source.target], (nn.Conv2d, nn.Linear)):
                self.bn_after[source.target] = node  # a plain BN folds into its producer's targets
            return main
        if isinstance(module, nn.PReLU) and main is not None and main.flat_size is None:
            if module.num_parameters == 1:
                return main
            if main.axis == 1:
                self.follow(name, main)
                return main
        if isinstance(module, COUPLING_NORMS):
            self.block(main, f"{name} ({type(module).__name__}) couples every channel it normalises")
            return None
        if isinstance(module, PASSTHROUGH_MODULES):
            return main
        if isinstance(module, nn.Flatten) and main is not None:
            return self.flatten(node, main, module.start_dim)
        if isinstance(module, nn.PixelShuffle) and main is not None:
            return self.pixel_shuffle(node, main, module.upscale_factor)
        self.unsupported(node, in_tags, type(module).__name__)
        return None

    def visit_conv(self, node: fx.Node, conv: nn.Conv2d, main: _Tag | None) -> _Tag | None:
        name = node.target
        self.layer_kinds[name] = "conv"
        usable = main is not None and main.flat_size is None and main.axis == 1
        if conv.groups == 1:
            if usable and conv.padding_mode == "zeros":
                self.read(node, main, Reader(name, "conv"))
            else:
                self.block(main, f"{name} reads channels that are not on axis 1 or pads them non-zero")
            return self.new_group(node)
        if conv.groups == conv.in_channels == conv.out_channels and usable:
            self.depthwise.add(name)
            self.follow(name, main)
            return main
        self.block(main, f"{name} is a grouped conv ({conv.groups} groups)")
        out = self.new_group(node)
        self.block(out, f"{name} is a grouped conv ({conv.groups} groups)")
        return out

    def visit_linear(self, node: fx.Node, main: _Tag | None) -> None:
        if main is None:
            return
        shape = node.args[0].meta["tensor_meta"].shape
        size = main.flat_size or 1
        if main.axis != len(shape) - 1 or shape[-1] != main.channels * size or len(shape) not in (2, 4):
            self.block(main, f"{node.target} reads a tensor whose last axis is not the channels")
            return
        self.read(node, main, Reader(node.target, "linear", size, "nc" if len(shape) == 2 else "nhwc"))

    def visit_function(self, node: fx.Node, main: _Tag | None, in_tags: list[_Tag | None]) -> _Tag | None:
        target = node.target
        if target in PASSTHROUGH_FUNCTIONS or \
                (getattr(target, "__module__", None), getattr(target, "__name__", None)) in PASSTHROUGH_LIBRARY_FUNCTIONS:
            return main
        if target is torch.flatten and main is not None:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            return self.flatten(node, main, start)
        if target in TIE_FUNCTIONS:
            return self.tie(node, TIE_FUNCTIONS[target])
        if target is torch.cat:
            return self.concat(node)
        if target in REDUCTIONS and main is not None:
            return self.reduce(node, main, node.args[1] if len(node.args) > 1 else node.kwargs.get("dim"))
        if target is torch.permute and main is not None:
            return self.permute(node, main, node.args[1])
        if target is nn.functional.pad and main is not None:
            return self.pad(node, main)
        if target in (nn.functional.pixel_shuffle, torch.pixel_shuffle) and main is not None:
            factor = node.args[1] if len(node.args) > 1 else node.kwargs["upscale_factor"]
            return self.pixel_shuffle(node, main, factor)
        if target is operator.getitem:
            return self.getitem(node, main)
        if target is getattr:
            return None
        self.unsupported(node, in_tags, getattr(target, "__name__", str(target)))
        return None

    def visit_method(self, node: fx.Node, main: _Tag | None, in_tags: list[_Tag | None]) -> _Tag | None:
        target = node.target
        if target in PASSTHROUGH_METHODS:
            return main
        if target in SHAPE_QUERIES:
            return None
        if target in TIE_METHODS:
            return self.tie(node, TIE_METHODS[target])
        if target in {"mean", "sum", "amax"} and main is not None:
            return self.reduce(node, main, node.args[1] if len(node.args) > 1 else node.kwargs.get("dim"))
        if target == "permute" and main is not None:
            dims = node.args[1:] if not isinstance(node.args[1], (tuple, list)) else node.args[1]
            return self.permute(node, main, dims)
        if target in {"flatten", "view", "reshape"} and main is not None:
            return self.flatten(node, main, None)
        self.unsupported(node, in_tags, f".{target}")
        return None

    # -- operations on tags ----------------------------------------------------------------
    def tie(self, node: fx.Node, residual: bool) -> _Tag | None:
        operands = [a for a in node.args[:2]]
        tagged = [(a, self.tags.get(a)) for a in operands if isinstance(a, fx.Node) and self.tags.get(a)]
        if len(tagged) == 2:
            out = self.merge(tagged[0][1], tagged[1][1], residual, node)
            if out is not None and residual and node.target in (operator.add, operator.iadd, torch.add, "add", "add_"):
                self.note_shortcut(*operands)
            return out
        if len(tagged) == 1:
            tag = tagged[0][1]
            other = next((a for a in operands if a is not tagged[0][0]), None)
            meta = other.meta.get("tensor_meta") if isinstance(other, fx.Node) else None
            shape = tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else ()
            axis_from_end = len(tagged[0][0].meta["tensor_meta"].shape) - tag.axis
            if len(shape) < axis_from_end or shape[-axis_from_end] == 1:
                return tag
            path = None if residual else self.channel_scale(other, shape, axis_from_end, tag)
            if path is not None:
                self.layouts[path] = list(tag.segments)
                for g in tag.segments:
                    g.root().scales.append(path)
                return tag
            what = "adds to its channels" if residual else "scales its channels by"
            self.block(tag, f"{node.name} {what} a tensor chanprune does not track (the model's input, or the "
                            "output of an op it cannot follow)")
            return None
        return None

    def channel_scale(self, other: fx.Node, shape: tuple[int, ...], axis_from_end: int, tag: _Tag) -> str | None:
        """The attribute path of a per-channel parameter or buffer that ``other`` is (directly, or
        through view / reshape / unsqueeze / indexing) when it broadcasts along the channel axis
        only; None otherwise."""
        if tag.flat_size is not None or shape[-axis_from_end] != tag.channels or \
                any(d != 1 for i, d in enumerate(shape) if i != len(shape) - axis_from_end):
            return None
        source = other
        while source.op in ("call_method", "call_function") and (
                source.target in ("view", "reshape", "unsqueeze") or source.target is operator.getitem):
            source = source.args[0]
        if source.op != "get_attr":
            return None
        value = operator.attrgetter(source.target)(self.gm)
        if not isinstance(value, torch.Tensor) or sorted(value.shape)[:-1] != [1] * (value.ndim - 1) or \
                max(value.shape, default=0) != tag.channels or source.target in self.layouts:
            return None
        return source.target

    def note_shortcut(self, a: fx.Node, b: fx.Node) -> None:
        """When one operand of a residual add is a reader's (BN'd) output, remember the other."""
        for branch, shortcut in ((a, b), (b, a)):
            source = branch
            if source.op == "call_module" and type(self.modules[source.target]) in FOLLOWER_NORMS:
                source = source.args[0]
                if len(source.users) != 1:
                    continue
            if source.op != "call_module" or len(branch.users) != 1:
                continue
            entry = self.readers.get(source.target)
            if entry is not None and entry[0].shortcut is None:
                entry[0].shortcut = shortcut.name
                entry[0].output_node = branch.name
                return

    def concat(self, node: fx.Node) -> _Tag | None:
        parts = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        tags = [self.tags.get(p) if isinstance(p, fx.Node) else None for p in parts]
        ndim = len(node.meta["tensor_meta"].shape)
        if all(t is not None and t.axis == 1 and t.flat_size is None for t in tags) and dim % ndim == 1:
            return _Tag(tuple(g for t in tags for g in t.segments))
        for t in tags:
            self.block(t, f"{node.name} concatenates channels chanprune cannot track")
        return None

    def reduce(self, node: fx.Node, tag: _Tag, dims) -> _Tag | None:
        ndim = len(node.args[0].meta["tensor_meta"].shape)
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        dims = {d % ndim for d in dims}
        if tag.flat_size is not None or not dims or tag.axis in dims:
            self.block(tag, f"{node.name} reduces over the channel axis")
            return None
        keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        return _Tag(tag.segments, tag.axis if keepdim else tag.axis - sum(d < tag.axis for d in dims))

    def permute(self, node: fx.Node, tag: _Tag, dims) -> _Tag | None:
        if tag.flat_size is not None:
            self.block(tag, f"{node.name} permutes flattened channels")
            return None
        ndim = len(dims)
        return _Tag(tag.segments, [d % ndim for d in dims].index(tag.axis))

    def pad(self, node: fx.Node, tag: _Tag) -> _Tag | None:
        """``F.pad`` pads the last len(pad) // 2 axes, last axis first: the channels pass through
        unless the channel axis's pair is non-zero, whatever the rank (on an (N, C) tensor it is
        the first pair)."""
        pad = list(node.args[1] if len(node.args) > 1 else node.kwargs["pad"])
        ndim = len(node.args[0].meta["tensor_meta"].shape)
        pair = pad[2 * (ndim - 1 - tag.axis):][:2]
        if any(p != 0 for p in pair):
            self.block(tag, f"{node.name} pads the channel axis")
            return None
        return tag

    def getitem(self, node: fx.Node, tag: _Tag | None) -> _Tag | None:
        index = node.args[1]
        if tag is None:
            return None
        if isinstance(index, tuple) and len(index) > tag.axis and tag.flat_size is None and \
                all(isinstance(i, slice) or i is Ellipsis for i in index[: tag.axis + 1]) and \
                index[tag.axis] == slice(None) and Ellipsis not in index[: tag.axis]:
            return tag
        self.block(tag, f"{node.name} indexes the channel axis")
        return None

    def flatten(self, node: fx.Node, tag: _Tag, start_dim) -> _Tag | None:
        """N,C,H,W to N,C*H*W keeps channel blocks of H*W features; anything else blocks."""
        in_shape = tuple(node.args[0].meta["tensor_meta"].shape)
        out_shape = tuple(node.meta["tensor_meta"].shape)
        if tag.flat_size is None and tag.axis == 1 and len(in_shape) == 4 and len(out_shape) == 2 and \
                out_shape[0] == in_shape[0] and start_dim in (None, 1):
            return _Tag(tag.segments, 1, in_shape[2] * in_shape[3])
        if in_shape == out_shape:
            return tag
        return self.flatten_blocked(node, tag)

    def pixel_shuffle(self, node: fx.Node, tag: _Tag, factor: int) -> _Tag | None:
        """Channel c of the output is channels c·r²..(c+1)·r²−1 of the input: the input's group
        becomes one of r²-channel blocks for its writers and followers (nothing may read it before)."""
        group = tag.segments[0].root()
        earlier = [t for t in self.tags.values() if t is not None and any(g.root() is group for g in t.segments)]
        if len(tag.segments) != 1 or tag.axis != 1 or tag.flat_size is not None or group.readers or \
                group.residual or any(len(t.segments) != 1 or t.flat_size is not None for t in earlier):
            self.block(tag, f"{node.name} (pixel shuffle) reads channels that are also used elsewhere")
            return None
        size = factor * factor
        group.channels //= size
        for member in dict.fromkeys([*group.writers, *group.followers]):
            group.blocks[member] = group.block_of(member) * size
        for n, t in list(self.tags.items()):  # values before the shuffle hold blocks of r² channels
            if t in earlier:
                self.tags[n] = _Tag(t.segments, t.axis, size)
        return _Tag((group,), 1)

    def flatten_blocked(self, node: fx.Node, tag: _Tag) -> None:
        self.block(tag, f"{node.name} reshapes the channels")
        return None

    # -- result ----------------------------------------------------------------------------
    def finish(self, input_shape: tuple[int, ...], warn: bool) -> ChannelGraph:
        groups = [g for g in self.created if g.parent is None]
        for name, (reader, _) in self.readers.items():
            if name in self.bn_after:  # targets are taken after the BN the reader's weights fold into
                reader.bn, reader.output_node = self.bn_after[name].target, self.bn_after[name].name
        layouts = {name: [g.root().name for g in segs] for name, segs in self.layouts.items()}
        layouts.update({name: [g.root().name for g in segs] for name, (_, segs) in self.readers.items()})
        for g in groups:
            g.followers = list(dict.fromkeys(g.followers))
            unsupported = [why for why in g.blocked_by if why != OUTPUT_REASON]
            if not g.readers and not g.blocked_by:
                g.blocked_by.append("no layer reads it")
            if warn and unsupported:
                warnings.warn(f"channels of {g.writer} stay unpruned: {'; '.join(unsupported)}", stacklevel=3)
        order = {name: i for i, name in enumerate(self.order)}
        groups.sort(key=lambda g: min((order[r.name] for r in g.readers), default=len(order)))
        node_layouts = {node.name: NodeLayout(tuple(g.root().name for g in tag.segments), tag.axis, tag.flat_size)
                        for node, tag in self.tags.items() if tag is not None}
        return ChannelGraph(groups, input_shape, self.layer_kinds, self.gm, layouts, self.depthwise, order,
                            node_layouts)

