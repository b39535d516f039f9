"""Functional convolutions with a constant weight turned into conv modules.

timm's BlurPool2d (anti-aliased downsampling: ResNet-blur, DenseNet-blur, TResNet) applies a fixed
blur filter to every channel with ``F.conv2d(x, self.filt, stride=2, groups=channels)``. Traced,
that is a function call whose weight is a buffer and whose ``groups`` is a number, so its channels
could not be followed and everything around it stayed unpruned. Before the channel graph is built,
each such call becomes a call of an ``nn.Conv2d`` holding the same weight (a depthwise one is then
a follower like any depthwise conv, which pruning narrows with its groups). The weight keeps its
``requires_grad``: a buffer stays fixed under fine-tuning. The step is a plan op (``conv_module``)
replayed, and checked, on load.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from .errors import ChanpruneError
from .graph_ops import call_arg

CONV_MODULE_OP = "conv_module"
_CONV2D = (torch.conv2d, nn.functional.conv2d)
_SETTINGS = ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1), (6, "groups", 1))


def conv_module(gm: fx.GraphModule, node: fx.Node) -> nn.Conv2d | None:
    """The ``nn.Conv2d`` computing what ``node`` computes, when it is a functional 2-D conv whose
    weight (and bias, if any) are tensors of the model and its settings are constants; else None.
    A tensor that belongs to a layer the model also calls (a tied weight) is left alone."""
    if node.op != "call_function" or node.target not in _CONV2D or len(node.args) < 2:
        return None
    weight, bias = node.args[1], call_arg(node, 2, "bias")
    tensors = [a for a in (weight, bias) if a is not None]
    if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in tensors):
        return None
    called = [n.target for n in node.graph.nodes if n.op == "call_module"]
    if any(a.target.startswith(f"{layer}.") for a in tensors for layer in called):
        return None
    values = [operator.attrgetter(a.target)(gm) for a in tensors]
    settings = [call_arg(node, i, name) for i, name, _ in _SETTINGS]
    settings = [default if value is None else value for value, (_, _, default) in zip(settings, _SETTINGS)]
    stride, padding, dilation, groups = settings
    if not all(isinstance(v, torch.Tensor) for v in values) or values[0].ndim != 4 or not isinstance(groups, int) \
            or any(isinstance(s, fx.Node) for s in settings) or (bias is not None and values[1].ndim != 1):
        return None
    w = values[0]
    conv = nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride, padding, dilation, groups,
                     bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        conv.weight.copy_(w)
        conv.weight.requires_grad_(isinstance(w, nn.Parameter) and w.requires_grad)
        if bias is not None:
            conv.bias.copy_(values[1])
            conv.bias.requires_grad_(isinstance(values[1], nn.Parameter) and values[1].requires_grad)
    return conv


def as_conv_module(gm: fx.GraphModule, name: str) -> None:
    """Make traced node ``name`` (a functional conv with a constant weight) a call of a new conv
    module of that name; a clear error when the node is not one."""
    node = next((n for n in gm.graph.nodes if n.name == name), None)
    conv = conv_module(gm, node) if node is not None else None
    if conv is None or hasattr(gm, name):
        raise ChanpruneError(f"pruning plan makes {name!r} a conv module, which is not a functional conv with a "
                             "constant weight; the checkpoint does not match its architecture")
    _install(gm, node, conv)


def _install(gm: fx.GraphModule, node: fx.Node, conv: nn.Conv2d) -> None:
    """Call ``conv``, added to ``gm`` under ``node``'s name, where ``node`` called the function; the
    constants only it read go with it."""
    name = node.name
    constants = [a for a in node.all_input_nodes if a.op == "get_attr"]
    gm.add_submodule(name, conv)
    node.op, node.target, node.args, node.kwargs = "call_module", name, (node.args[0],), {}
    for attr in constants:
        if not attr.users:
            gm.graph.erase_node(attr)
        if not any(n.op == "get_attr" and n.target == attr.target for n in gm.graph.nodes):
            owner, _, field = attr.target.rpartition(".")  # now the module's weight: not kept twice
            delattr(gm.get_submodule(owner) if owner else gm, field)
    gm.recompile()


def with_conv_modules(gm: fx.GraphModule) -> list[str]:
    """Turn every functional conv with a constant weight in ``gm`` into a conv module; the names
    of the nodes turned, each now also the name of its module."""
    names = []
    for node in list(gm.graph.nodes):
        conv = conv_module(gm, node)
        if conv is not None and not hasattr(gm, node.name):
            _install(gm, node, conv)
            names.append(node.name)
    return names
