"""Channel shuffles rewritten as concatenations of channel slices, so their channels can be pruned.

A channel shuffle (ShuffleNet) reshapes C channels to (G, C/G), swaps the two axes and flattens
them back: output channel i*G + g is input channel g*C/G + i. After pruning, the same code would
interleave the wrong channels, so the channel graph cannot track channels through it. Before the
graph is built, each shuffle is replaced by a ``cat`` of contiguous slices of its input, ordered
so that every piece its result is split into holds the same channels as before, and the layers
downstream get their channels permuted to match that order (a reader's input columns, a
follower's entries). The model computes the same function (checked on the example input); the
channel graph then sees slices and concatenations, which it prunes.

A shuffle is rewritten only when the permuted channels reach nothing but channel-wise ops,
splits, concatenations, followers and dense readers; otherwise every shuffle stays as it is and
its channels stay unpruned, with the reason. The rewrite is recorded as plan steps
(``slice_shuffle`` on a traced node, ``permute_inputs`` / ``permute_channels`` on a layer) that a
saved model replays on load.
"""

from __future__ import annotations

import copy
import operator

import torch
from torch import fx, nn

from .errors import ChanpruneError
from .graph_ops import (FOLLOWER_NORMS, OPS, call_arg, concat, gating_tie, getitem, passthrough, residual_tie,
                        shape_query, split)
from .outputs import computes_the_same, output_tensors
from .plan_op import PlanOp

REWRITE_OPS = ("slice_shuffle", "permute_inputs", "permute_channels")
MAX_CHANNELS = 1 << 20  # a slice bound beyond this is not from a real model


def without_shuffles(gm: fx.GraphModule, example: torch.Tensor) -> tuple[fx.GraphModule, list[PlanOp]]:
    """``gm`` (shapes propagated) with its channel shuffles rewritten as slices, on a copy, and the
    steps taken; ``gm`` itself and no steps when it has none or they cannot all be rewritten."""
    ends = {}
    for node in gm.graph.nodes:
        chain = shuffle_chain(node)
        if chain is not None and _groups(chain) is not None:
            ends[node] = chain
    if not ends:
        return gm, []
    steps = _plan(gm, ends)
    if steps is None:
        return gm, []
    rewritten = copy.deepcopy(gm)
    for step in steps:
        apply_rewrite(rewritten, step)
    if not _same_outputs(gm, rewritten, example):
        return gm, []
    return rewritten, steps


def apply_rewrite(gm: fx.GraphModule, step: PlanOp) -> None:
    """Apply one recorded step to the traced ``gm`` (checked against what the graph and layer are)."""
    if step.op == "slice_shuffle":
        slice_shuffle(gm, step.layer, step.keep)
    elif step.op in ("permute_inputs", "permute_channels"):
        permute_layer(gm, step.op, step.layer, step.keep)
    else:
        raise ChanpruneError(f"unknown rewrite {step.op!r}; the checkpoint does not match this version")


# -- what a shuffle looks like in a trace ----------------------------------------------------------
def _is_reshape(node: object) -> bool:
    return isinstance(node, fx.Node) and ((node.op == "call_method" and node.target in ("view", "reshape"))
                                          or (node.op == "call_function" and node.target is torch.reshape))


def _is_merge12(node: fx.Node) -> bool:
    """A reshape, or a flatten of axes 1 and 2."""
    if _is_reshape(node):
        return True
    flat = (node.op == "call_function" and node.target is torch.flatten) or \
        (node.op == "call_method" and node.target == "flatten")
    return flat and tuple(node.args[1:3]) == (1, 2) and not node.kwargs


def _is_swap12(node: object) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if (node.op == "call_function" and node.target is torch.transpose) or \
            (node.op == "call_method" and node.target == "transpose"):
        return tuple(node.args[1:3]) in ((1, 2), (2, 1)) and not node.kwargs
    if (node.op == "call_function" and node.target is torch.permute) or \
            (node.op == "call_method" and node.target == "permute"):
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        return tuple(dims) == (0, 2, 1, 3, 4)
    return False


def shuffle_chain(end: fx.Node) -> list[fx.Node] | None:
    """The nodes of a channel shuffle ending at ``end`` (reshape to groups, swap, maybe
    ``contiguous``, merge back), first to last; None when ``end`` does not end one."""
    if not _is_merge12(end):
        return None
    chain, node = [end], end.args[0]
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target == "contiguous":
        chain.append(node)
        node = node.args[0]
    if not _is_swap12(node) or not _is_reshape(node.args[0]):
        return None
    chain += [node, node.args[0]]
    if any(len(n.users) != 1 for n in chain[1:]) or not isinstance(chain[-1].args[0], fx.Node):
        return None
    return chain[::-1]


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def _groups(chain: list[fx.Node]) -> int | None:
    """G of a shuffle on (N, C, H, W) through (N, G, C/G, H, W), from the traced shapes."""
    source, grouped, end = _shape(chain[0].args[0]), _shape(chain[0]), _shape(chain[-1])
    if source is None or grouped is None or len(source) != 4 or source != end or len(grouped) != 5:
        return None
    if grouped[0] != source[0] or grouped[1] * grouped[2] != source[1] or grouped[3:] != source[2:]:
        return None
    return grouped[1] if grouped[1] > 1 and grouped[2] > 1 else None


# -- planning: the slices of each shuffle and the permutations they cause --------------------------
def _plan(gm: fx.GraphModule, ends: dict[fx.Node, list[fx.Node]]) -> list[PlanOp] | None:
    """The rewrite steps, or None when permuted channels reach something that cannot follow them."""
    modules = dict(gm.named_modules())
    inner = {n for chain in ends.values() for n in chain[:-1]}
    orders: dict[fx.Node, torch.Tensor | list[torch.Tensor | None]] = {}  # non-identity channel orders
    slices: list[PlanOp] = []
    permutations: list[PlanOp] = []
    for node in gm.graph.nodes:
        if node in inner:
            continue
        if node in ends:
            step, order = _slices(node, ends[node], orders.get(ends[node][0].args[0]))
            slices.append(step)
            if order is not None:
                orders[node] = order
            continue
        if any(a in orders for a in node.all_input_nodes):
            if not _carry(node, modules, orders, permutations):
                return None
    return slices + permutations


def _slices(end: fx.Node, chain: list[fx.Node], before: torch.Tensor | None) -> tuple[PlanOp, torch.Tensor | None]:
    """The slices replacing one shuffle whose input holds original channels ``before`` (None: in
    order), and the original output channels its result then holds (None: in order)."""
    channels, groups = _shape(end)[1], _groups(chain)
    source_of = torch.arange(channels).reshape(groups, channels // groups).T.reshape(-1)  # output -> input
    before = torch.arange(channels) if before is None else before
    position = torch.argsort(before)  # original input channel -> where it is now
    take = torch.cat([position[source_of[lo:hi]].sort().values for lo, hi in _pieces(end, channels)])
    order = torch.argsort(source_of)[before[take]]
    starts = torch.cat([torch.tensor([True]), take[1:] != take[:-1] + 1])
    runs = []
    for run in torch.tensor_split(take, torch.nonzero(starts).flatten()[1:]):
        runs += [int(run[0]), int(run[-1]) + 1]
    return PlanOp("slice_shuffle", end.name, tuple(runs)), None if _in_order(order) else order


def _pieces(end: fx.Node, channels: int) -> list[tuple[int, int]]:
    """Channel ranges the shuffle's result is split into (the whole when it is not split)."""
    users = list(end.users)
    return _split_ranges(users[0]) if len(users) == 1 and _channel_split(users[0]) else [(0, channels)]


def _split_ranges(node: fx.Node) -> list[tuple[int, int]]:
    """The channel range of each piece of a traced split."""
    ends = torch.tensor([int(m.shape[1]) for m in node.meta["tensor_meta"]]).cumsum(0).tolist()
    return list(zip([0, *ends[:-1]], ends))


def _channel_split(node: fx.Node) -> bool:
    return OPS.lookup(node, None) is split and call_arg(node, 2, "dim", 0) in (1, -3) and \
        isinstance(node.meta.get("tensor_meta"), (tuple, list))


def _in_order(order: torch.Tensor) -> bool:
    return bool((order == torch.arange(len(order))).all())


def _carry(node: fx.Node, modules: dict[str, nn.Module], orders: dict, steps: list[PlanOp]) -> bool:
    """Follow permuted channels through ``node``: record what its layer needs and the order of its
    result in ``orders``; False when ``node`` cannot take permuted channels."""
    if node.op == "call_module":
        return _carry_module(node, modules[node.target], orders, steps)
    handler = OPS.lookup(node, None) if node.op in ("call_function", "call_method") else None
    first = node.args[0] if node.args else None
    alone = [a for a in node.all_input_nodes if a in orders] == [first]  # only the first argument carries
    if handler is shape_query:
        return True
    if handler is passthrough and alone:
        orders[node] = orders[first]
        return True
    if handler is split and alone and _channel_split(node):
        order, parts = orders[first], []
        for lo, hi in _split_ranges(node):
            part = order[lo:hi] - lo
            if bool(((part < 0) | (part >= hi - lo)).any()):
                return False
            parts.append(None if _in_order(part) else part)
        orders[node] = parts
        return True
    if handler is getitem and alone and isinstance(orders[first], list) and isinstance(node.args[1], int):
        part = orders[first][node.args[1]]
        if part is not None:
            orders[node] = part
        return True
    if handler is concat and call_arg(node, 1, "dim", 0) in (1, -3) and isinstance(node.args[0], (list, tuple)):
        parts, offset = [], 0
        for value in node.args[0]:
            order = orders.get(value)
            width = _shape(value)[1] if isinstance(value, fx.Node) and _shape(value) else None
            if width is None or isinstance(order, list):
                return False
            parts.append(offset + (order if order is not None else torch.arange(width)))
            offset += width
        orders[node] = torch.cat(parts)
        return True
    if handler in (residual_tie, gating_tie):
        return _carry_tie(node, orders)
    return False


def _carry_tie(node: fx.Node, orders: dict) -> bool:
    """An add or multiply passes the order on when every operand has it or is the same for every
    channel (a number, or a tensor that broadcasts along the channel axis)."""
    order, out = None, _shape(node)
    for value in node.all_input_nodes:
        shape = _shape(value)
        if value in orders:
            if isinstance(orders[value], list) or (order is not None and not torch.equal(order, orders[value])):
                return False
            order = orders[value]
        elif out is None or shape is None or len(out) < 2 or \
                ((1,) * (len(out) - len(shape)) + shape)[1] != 1:  # a layer scale (C, 1, 1) holds channels
            return False
    orders[node] = order
    return True


def _carry_module(node: fx.Node, module: nn.Module, orders: dict, steps: list[PlanOp]) -> bool:
    x = node.args[0] if node.args else None
    if [a for a in node.all_input_nodes if a in orders] != [x] or isinstance(orders[x], list):
        return False
    order = orders[x]
    if any(s.layer == node.target for s in steps):  # a layer called twice cannot take two orders
        return False
    if type(module) in (nn.Conv2d, nn.Linear) and (isinstance(module, nn.Linear) or module.groups == 1):
        if isinstance(module, nn.Linear) and len(_shape(x) or ()) != 2:
            return False
        steps.append(PlanOp("permute_inputs", node.target, tuple(order.tolist())))
        return True
    depthwise = type(module) is nn.Conv2d and module.groups == module.in_channels == module.out_channels
    per_channel = isinstance(module, FOLLOWER_NORMS) or (isinstance(module, nn.PReLU) and module.num_parameters > 1)
    if depthwise or per_channel:
        steps.append(PlanOp("permute_channels", node.target, tuple(order.tolist())))
        orders[node] = order
        return True
    if OPS.lookup(node, module) is passthrough or (isinstance(module, nn.PReLU) and module.num_parameters == 1):
        orders[node] = order
        return True
    return False


# -- applying the steps ------------------------------------------------------------------------------
def slice_shuffle(gm: fx.GraphModule, name: str, runs: tuple[int, ...]) -> None:
    """Replace the channel shuffle ending at traced node ``name`` by a ``cat`` of its input's
    channel slices ``runs`` (start, stop, start, stop, ...)."""
    end = next((n for n in gm.graph.nodes if n.name == name), None)
    chain = shuffle_chain(end) if end is not None else None
    pairs = list(zip(runs[::2], runs[1::2]))
    spans = sorted(pairs)
    if chain is None or len(runs) % 2 or not pairs or \
            not all(isinstance(v, int) and 0 <= v <= MAX_CHANNELS for v in runs) or \
            any(a >= b for a, b in pairs) or any(b > c for (_, b), (c, _) in zip(spans, spans[1:])):
        raise ChanpruneError(f"pruning plan rewrites a channel shuffle at {name!r} that the traced architecture "
                             "does not have; the checkpoint does not match its architecture")
    source = chain[0].args[0]
    if len(pairs) == 1:
        new = source  # one run is every channel in order: the rewritten shuffle does nothing
    else:
        with gm.graph.inserting_before(end):
            parts = [gm.graph.create_node("call_function", operator.getitem, (source, (slice(None), slice(a, b))),
                                          name=f"{name}_slice{i}") for i, (a, b) in enumerate(pairs)]
            new = gm.graph.create_node("call_function", torch.cat, (parts, 1), name=f"{name}_cat")
    end.replace_all_uses_with(new)
    for node in chain[::-1]:
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def permute_layer(gm: fx.GraphModule, op: str, name: str, index: tuple[int, ...]) -> None:
    """Reorder the input columns (``permute_inputs``: a dense Conv2d or Linear) or the channels
    (``permute_channels``: BatchNorm, PReLU, depthwise Conv2d) of layer ``name`` to ``index``."""
    try:
        layer = gm.get_submodule(name)
    except AttributeError:
        layer = None
    if op == "permute_inputs" and isinstance(layer, (nn.Conv2d, nn.Linear)) and getattr(layer, "groups", 1) == 1:
        tensors, axis = [layer.weight], 1
    elif op == "permute_channels" and isinstance(layer, (*FOLLOWER_NORMS, nn.PReLU, nn.Conv2d)) and \
            (not isinstance(layer, nn.Conv2d) or layer.groups == layer.in_channels == layer.out_channels):
        names = ("weight", "bias", "running_mean", "running_var")
        tensors, axis = [getattr(layer, n) for n in names if getattr(layer, n, None) is not None], 0
    else:
        raise ChanpruneError(f"pruning plan permutes {op.split('_')[1]} of {name!r}, which the architecture "
                             "cannot take; the checkpoint does not match its architecture")
    order = torch.tensor(index, dtype=torch.long)
    if any(t.shape[axis] != len(order) for t in tensors) or \
            not torch.equal(order.sort().values, torch.arange(len(order))):
        raise ChanpruneError(f"pruning plan permutes {name!r} with an order that is not a permutation of its "
                             "channels; the checkpoint does not match its architecture")
    with torch.no_grad():
        for tensor in tensors:
            tensor.copy_(tensor.index_select(axis, order.to(tensor.device)))


def _same_outputs(before: fx.GraphModule, after: fx.GraphModule, example: torch.Tensor) -> bool:
    """Whether the rewrite kept the model's function on ``example`` (an output that is not made of
    tensors cannot be checked, so it does not count as kept)."""
    with torch.no_grad():
        old, new = output_tensors(before(example)), output_tensors(after(example))
    return old is not None and new is not None and len(old) == len(new) and all(
        computes_the_same(a, b) for a, b in zip(old, new))
