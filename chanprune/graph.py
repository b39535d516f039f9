"""Channel dependency graph: which layer writes a set of channels and which layers read it.

The model is traced with ``torch.fx`` and shapes are propagated with an example input. Every
dense Conv2d or Linear starts a *channel group* (its output channels). Channel-wise layers
(BatchNorm, activations, pooling, dropout, identity) pass the group through; ``flatten`` turns
it into blocks of H*W features; a Conv2d or Linear that reads it is a *reader*. Pruning a group
keeps a subset of its channels: the writer loses filters, followers lose entries, and every
reader loses input channels. A group that meets an operation this module cannot reason about is
marked unprunable with the reason, never pruned wrongly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import ChanpruneError

# Modules whose output channel c depends only on input channel c and has no parameters.
PASSTHROUGH_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Hardtanh,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
    nn.Dropout, nn.Dropout2d, nn.Identity,
)
PASSTHROUGH_FUNCTIONS = {
    torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6, torch.nn.functional.gelu,
    torch.nn.functional.silu, torch.nn.functional.hardswish, torch.nn.functional.leaky_relu,
    torch.sigmoid, torch.tanh, torch.nn.functional.max_pool2d, torch.nn.functional.avg_pool2d,
    torch.nn.functional.adaptive_avg_pool2d, torch.nn.functional.adaptive_max_pool2d,
    torch.nn.functional.dropout, torch.nn.functional.hardsigmoid,
}
PASSTHROUGH_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "detach"}
FOLLOWER_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d)
SHAPE_QUERIES = {"size", "dim"}
OUTPUT_REASON = "its channels are a model output"


@dataclass
class Reader:
    """A Conv2d or Linear reading a group; ``channel_size`` input features belong to one channel."""

    name: str
    kind: str  # "conv" or "linear"
    channel_size: int = 1
    bn: str | None = None  # BatchNorm applied directly to this reader's output, folded into targets


@dataclass
class ChannelGroup:
    """A set of channels with the layer that writes it and the layers that read it."""

    name: str
    channels: int
    writer: str
    followers: list[str] = field(default_factory=list)
    readers: list[Reader] = field(default_factory=list)
    blocked_by: list[str] = field(default_factory=list)
    writer_bn: str | None = None  # BatchNorm that is the sole consumer of the writer's output

    @property
    def prunable(self) -> bool:
        return not self.blocked_by and bool(self.readers)

    @property
    def members(self) -> list[str]:
        return [self.writer, *self.followers, *(r.name for r in self.readers)]


@dataclass
class ChannelGraph:
    """Channel groups of a model in the order their first reader runs."""

    groups: list[ChannelGroup]
    input_shape: tuple[int, ...]
    layer_kinds: dict[str, str]

    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def group(self, name: str) -> ChannelGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)


@dataclass(frozen=True)
class _Tag:
    """What a traced value holds along its channel axis: a group, maybe flattened to features."""

    group: ChannelGroup
    flat_size: int | None = None  # H*W per channel once flattened


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model``; a clear error if torch.fx cannot."""
    try:
        return fx.symbolic_trace(model)
    except Exception as err:  # fx raises many types on dynamic control flow
        raise ChanpruneError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(err).__name__}: {err}); "
            "remove data-dependent control flow from forward() or wrap it in a leaf module") from None


def build_graph(model: nn.Module, example: torch.Tensor, warn: bool = True) -> ChannelGraph:
    """Trace ``model`` on ``example`` (a batch of 1 is enough) and find its channel groups."""
    gm = trace(model)
    try:
        ShapeProp(gm).propagate(example)
    except Exception as err:
        raise ChanpruneError(f"the model does not run on an input of shape {tuple(example.shape)} "
                             f"({type(err).__name__}: {err}); pass the right --input-size") from None
    modules = dict(gm.named_modules())
    tags: dict[fx.Node, _Tag | None] = {}
    groups: list[ChannelGroup] = []
    layer_kinds: dict[str, str] = {}

    def block(tag: _Tag | None, why: str) -> None:
        if tag is not None and why not in tag.group.blocked_by:
            tag.group.blocked_by.append(why)

    for node in gm.graph.nodes:
        inputs = [a for a in node.all_input_nodes]
        in_tags = [tags.get(a) for a in inputs]
        main = in_tags[0] if in_tags else None
        out: _Tag | None = None
        if node.op == "call_module":
            module = modules[node.target]
            if isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros":
                layer_kinds[node.target] = "conv"
                if main is not None:
                    if main.flat_size is not None:
                        block(main, f"{node.target} reads flattened channels")
                    else:
                        main.group.readers.append(Reader(node.target, "conv"))
                out = _new_group(node, groups)
            elif isinstance(module, nn.Linear):
                layer_kinds[node.target] = "linear"
                if main is not None:
                    size = main.flat_size or 1
                    if node.args[0].meta["tensor_meta"].shape[-1] != main.group.channels * size or \
                            len(node.args[0].meta["tensor_meta"].shape) != 2:
                        block(main, f"{node.target} reads a tensor whose last axis is not the channels")
                    else:
                        main.group.readers.append(Reader(node.target, "linear", size))
                out = _new_group(node, groups)
            elif isinstance(module, FOLLOWER_MODULES) and main is not None and main.flat_size is None:
                main.group.followers.append(node.target)
                source = inputs[0]
                if source.op == "call_module" and source.target == main.group.writer and len(source.users) == 1:
                    main.group.writer_bn = node.target
                out = main
            elif isinstance(module, PASSTHROUGH_MODULES):
                out = main
            elif isinstance(module, nn.Flatten) and main is not None:
                out = _flatten(node, inputs[0], main, module.start_dim, block)
            else:
                for t in in_tags:
                    block(t, f"{node.target} ({type(module).__name__}) is not supported")
        elif node.op == "call_function":
            if node.target in PASSTHROUGH_FUNCTIONS:
                out = main
            elif node.target is torch.flatten and main is not None:
                start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
                out = _flatten(node, inputs[0], main, start, block)
            elif node.target is getattr:
                out = None
            else:
                for t in in_tags:
                    block(t, f"{node.name} ({getattr(node.target, '__name__', node.target)}) "
                             "is not supported")
        elif node.op == "call_method":
            if node.target in PASSTHROUGH_METHODS:
                out = main
            elif node.target in SHAPE_QUERIES:
                out = None
            elif node.target in {"flatten", "view", "reshape"} and main is not None:
                out = _flatten(node, inputs[0], main, None, block)
            else:
                for t in in_tags:
                    block(t, f"{node.name} (.{node.target}) is not supported")
        elif node.op == "output":
            for t in in_tags:
                block(t, OUTPUT_REASON)
        tags[node] = out

    bn_of_writer = {g.writer: g.writer_bn for g in groups}
    for g in groups:
        for reader in g.readers:
            reader.bn = bn_of_writer.get(reader.name)
        unsupported = [why for why in g.blocked_by if why != OUTPUT_REASON]
        if not g.readers and not g.blocked_by:
            g.blocked_by.append("no layer reads it")
        if warn and unsupported:
            warnings.warn(f"channels of {g.writer} stay unpruned: {'; '.join(unsupported)}", stacklevel=2)
    return ChannelGraph(groups, tuple(example.shape), layer_kinds)


def _new_group(node: fx.Node, groups: list[ChannelGroup]) -> _Tag:
    shape = node.meta["tensor_meta"].shape
    group = ChannelGroup(name=node.target, channels=int(shape[1]), writer=node.target)
    groups.append(group)
    return _Tag(group)


def _flatten(node: fx.Node, source: fx.Node, tag: _Tag, start_dim, block) -> _Tag | None:
    """Flattening N,C,H,W to N,C*H*W keeps channel blocks of H*W features; anything else blocks."""
    in_shape = tuple(source.meta["tensor_meta"].shape)
    out_shape = tuple(node.meta["tensor_meta"].shape)
    if tag.flat_size is None and len(in_shape) == 4 and len(out_shape) == 2 and \
            out_shape[0] == in_shape[0] and start_dim in (None, 1):
        return _Tag(tag.group, in_shape[2] * in_shape[3])
    if tag.flat_size is None and len(in_shape) == 2 and in_shape == out_shape:
        return tag
    block(tag, f"{node.name} reshapes the channels")
    return None
