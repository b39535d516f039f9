"""Convs whose forward derives the weight it convolves with (weight standardization: timm's
StdConv2d and the ScaledStdConv2d of NF-Nets) folded into plain convs holding that weight, as
``torch.nn.utils.fusion`` folds a BatchNorm into a conv.

Least squares cannot refit such a conv in place: its forward would standardize the new weights
again, over a fan-in that pruning has changed. Folded, it is an ordinary conv that computes the same
function and prunes like any other. The weight is read off the module's own forward (a one-hot
input per weight entry), so no library's internals are assumed, and the fold is kept only where the
plain conv is checked to compute what the module computes.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from .errors import ChanpruneError
from .graph_ops import own_padding
from .layers import conv_padding, own_forward
from .outputs import computes_the_same

FOLD_OP = "fold_conv"
PROBE_BATCH = 4096  # one-hot inputs per forward call while reading a weight off


def effective_weight(conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias ``conv``'s forward computes with, assuming it pads with zeros as its
    settings say: its response at one output position to a zero input (the bias), and to a one-hot
    input on each (input channel, kernel offset) less the bias. Conv groups see only their own
    inputs, so one input probes the same entry of every group at once."""
    (kh, kw), (dh, dw), (sh, sw) = conv.kernel_size, conv.dilation, conv.stride
    left, _, top, _ = conv_padding(conv)
    th, tw = -top % sh, -left % sw  # where the window starts so that an output position reads it unpadded
    height, width = th + (kh - 1) * dh + 1, tw + (kw - 1) * dw + 1
    oh, ow = (th + top) // sh, (tw + left) // sw
    per_group, out_per_group = conv.in_channels // conv.groups, conv.out_channels // conv.groups
    weight = conv.weight.new_empty(conv.groups, out_per_group, per_group, kh, kw)
    entries = per_group * kh * kw
    offsets = per_group * torch.arange(conv.groups)  # the first input channel of every group
    with torch.no_grad():
        zero = conv(conv.weight.new_zeros(1, conv.in_channels, height, width))[0, :, oh, ow]
        for start in range(0, entries, PROBE_BATCH):
            b = torch.arange(start, min(start + PROBE_BATCH, entries))
            channel, i, j = b // (kh * kw), b // kw % kh, b % kw  # channel within its group
            x = conv.weight.new_zeros(len(b), conv.in_channels, height, width)
            x[b[:, None] - start, channel[:, None] + offsets, (th + i * dh)[:, None], (tw + j * dw)[:, None]] = 1
            y = (conv(x)[:, :, oh, ow] - zero).reshape(len(b), conv.groups, out_per_group)
            weight[:, :, channel, i, j] = y.permute(1, 2, 0)
    return weight.reshape_as(conv.weight), zero


def plain_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` with ``conv``'s settings and :func:`effective_weight` (a bias where
    ``conv`` has one or computes one)."""
    left, _, top, _ = conv_padding(conv)
    weight, bias = effective_weight(conv)
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, (top, left),
                      conv.dilation, conv.groups, conv.bias is not None or bool(bias.any()),
                      device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        plain.weight.copy_(weight)
        if plain.bias is not None:
            plain.bias.copy_(bias)
    plain.train(conv.training)
    return plain


def folds_exactly(conv: nn.Conv2d, plain: nn.Conv2d, shape: tuple[int, ...]) -> bool:
    """Whether ``plain`` computes what ``conv`` does on a random input of ``shape``."""
    left, right, top, bottom = conv_padding(conv)
    if (left, top) != (right, bottom):
        return False  # a plain conv pads both sides alike
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(conv.weight)
    with torch.no_grad():
        y = conv(x)
        try:
            z = plain(x)
        except RuntimeError:  # a kernel larger than the padded input
            return False
    return computes_the_same(y, z)


def fold_conv(conv: nn.Module, name: str) -> nn.Conv2d:
    """The plain conv replacing layer ``name`` when a plan replays a fold (checked on a small input)."""
    if not isinstance(conv, nn.Conv2d) or not own_forward(conv):
        raise ChanpruneError(f"pruning plan folds {name!r}, which is not a conv with a forward of its own; the "
                             "checkpoint does not match its architecture")
    plain = plain_conv(conv)
    extent = [(k - 1) * d + 1 + s for k, d, s in zip(conv.kernel_size, conv.dilation, conv.stride)]
    if not folds_exactly(conv, plain, (2, conv.in_channels, *extent)):
        raise ChanpruneError(f"pruning plan folds {name!r} into a plain conv, which does not compute what it "
                             "does; the checkpoint does not match its architecture")
    return plain


def with_folded_convs(gm: fx.GraphModule) -> list[str]:
    """Fold, in ``gm`` (shapes propagated), each conv with a forward of its own that is not a plain
    convolution with its own weights (:func:`graph_ops.own_padding`) but whose plain version
    computes the same on its traced input; the names folded, in execution order."""
    folded = []
    for node in gm.graph.nodes:
        conv = gm.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(conv, nn.Conv2d) or not own_forward(conv):
            continue
        shape = tuple(node.args[0].meta["tensor_meta"].shape)
        if own_padding(conv, shape) is not None or node.target in folded:
            continue
        plain = plain_conv(conv)
        if folds_exactly(conv, plain, shape):
            parent, _, child = node.target.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, child, plain)
            folded.append(node.target)
    return folded
