"""Physical surgery on Conv2d / Linear / BatchNorm / PReLU: keep channel subsets, insert channel
selects, write folded weights.

Each edit returns a new module and is recorded as a plain-data operation in a :class:`Plan`, so a
saved model can be rebuilt by replaying the plan on a fresh copy of its architecture.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .errors import ChanpruneError
from .folding import FOLD_OP, fold_conv
from .functional_convs import CONV_MODULE_OP, as_conv_module
from .layers import FactorizedConv2d, ScatteredBatchNorm2d, ScatteredConv2d, SelectedConv2d, conv_like
from .plan_op import PlanOp
from .shuffle import REWRITE_OPS, apply_rewrite
from .stats import block_indices
from .tracing import trace

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``name`` is in ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _like(param: torch.Tensor | None, value: torch.Tensor | None) -> nn.Parameter | None:
    if value is None:
        return None
    return nn.Parameter(value.detach().clone().to(param.dtype if param is not None else value.dtype),
                        requires_grad=param.requires_grad if param is not None else True)


def keep_outputs(module: nn.Module, keep: torch.Tensor) -> nn.Module:
    """A copy of a Conv2d / Linear / BatchNorm (or a factorized conv) with only the output channels ``keep``."""
    keep = keep.to(torch.long)
    if isinstance(module, FactorizedConv2d):
        return _with_end(module, -1, keep_outputs(module[-1], keep))
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        new = conv_like(module, module.in_channels, len(keep))
    elif isinstance(module, nn.Conv2d) and not isinstance(module, SelectedConv2d):
        # grouped (its inputs may already be down to one per group): as many outputs kept in each group
        _check_equal_blocks(keep, module.out_channels // module.groups, module.groups, "output")
        new = conv_like(module, module.in_channels, len(keep))
    elif isinstance(module, nn.Linear):
        new = nn.Linear(module.in_features, len(keep), module.bias is not None)
    elif isinstance(module, _NORMS):
        new = type(module)(len(keep), module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.track_running_stats:
            new.running_mean.copy_(module.running_mean[keep])
            new.running_var.copy_(module.running_var[keep])
            new.num_batches_tracked.copy_(module.num_batches_tracked)
    else:
        raise ChanpruneError(f"cannot remove output channels of {type(module).__name__}")
    new.to(module.weight.device if module.weight is not None else "cpu")
    if module.weight is not None:
        new.weight = _like(module.weight, module.weight[keep])
    if getattr(module, "bias", None) is not None:
        new.bias = _like(module.bias, module.bias[keep])
    new.train(module.training)
    return new


def keep_inputs(module: nn.Module, keep: torch.Tensor, channel_size: int = 1) -> nn.Module:
    """A copy of a Conv2d / Linear reading only input channels ``keep`` (a channel owns
    ``channel_size`` consecutive input features of a Linear after flatten, or input channels of a
    conv after a depthwise channel multiplier)."""
    keep = keep.to(torch.long)
    if isinstance(module, FactorizedConv2d):
        return _with_end(module, 0, keep_inputs(module[0], keep, channel_size))
    # the inputs those channels own
    keep = block_indices(keep, channel_size)
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        index = module.index[keep] if isinstance(module, SelectedConv2d) else None
        new = conv_like(module, len(keep), module.out_channels, index=index)
        weight = module.weight[:, keep]
    elif isinstance(module, nn.Conv2d) and not isinstance(module, SelectedConv2d):
        weight = _grouped_inputs(module, keep)
        new = conv_like(module, len(keep), module.out_channels)
    elif isinstance(module, nn.Linear):
        new = nn.Linear(len(keep), module.out_features, module.bias is not None)
        weight = module.weight[:, keep]
    else:
        raise ChanpruneError(f"cannot remove input channels of {type(module).__name__}")
    new.to(module.weight.device)
    new.weight = _like(module.weight, weight)
    if module.bias is not None:
        new.bias = _like(module.bias, module.bias)
    new.train(module.training)
    return new


def _check_equal_blocks(keep: torch.Tensor, size: int, groups: int, side: str) -> None:
    """Refuse channels ``keep`` of a grouped conv (blocks of ``size``) unless every conv group keeps
    as many, in order."""
    counts = torch.bincount(keep // size, minlength=groups)
    if len(keep) % groups or len(counts) > groups or bool((counts != len(keep) // groups).any()) \
            or bool((keep.diff() <= 0).any()):
        raise ChanpruneError(f"a grouped conv ({groups} groups) must keep as many {side} channels in every group, "
                             "in order; the checkpoint does not match its architecture")


def _grouped_inputs(conv: nn.Conv2d, keep: torch.Tensor) -> torch.Tensor:
    """The weight of a grouped conv reading only input channels ``keep``: as many in every conv
    group, each group's filters keeping the columns of its own kept inputs."""
    groups = conv.groups
    size, out = conv.in_channels // groups, conv.out_channels // groups
    _check_equal_blocks(keep, size, groups, "input")
    local = (keep - keep // size * size).reshape(groups, -1)
    return torch.cat([conv.weight[j * out:(j + 1) * out][:, local[j]] for j in range(groups)])


def keep_channels(module: nn.Module, keep: torch.Tensor) -> nn.Module:
    """A copy of a channel-wise layer (BatchNorm, GroupNorm, PReLU, depthwise Conv2d) with only channels ``keep``."""
    keep = keep.to(torch.long)
    if isinstance(module, _NORMS):
        return _sliced_norm(module, keep)
    if isinstance(module, nn.GroupNorm):  # whole norm groups only: the others keep their statistics
        size = module.num_channels // module.num_groups
        _check_whole_blocks(keep, size, "a GroupNorm")
        new = copy.deepcopy(module)
        new.num_groups, new.num_channels = len(keep) // size, len(keep)
        if module.affine:
            new.weight, new.bias = _like(module.weight, module.weight[keep]), _like(module.bias, module.bias[keep])
        return new
    if isinstance(module, nn.PReLU):
        new = nn.PReLU(len(keep)).to(module.weight.device)
        new.weight = _like(module.weight, module.weight[keep])
        return new
    if isinstance(module, nn.Conv2d) and module.groups == module.in_channels and \
            module.out_channels % module.in_channels == 0:  # depthwise, maybe with a channel multiplier
        multiplier = module.out_channels // module.in_channels
        _check_whole_blocks(keep, multiplier, "a depthwise conv")
        groups = len(keep) // multiplier
        new = conv_like(module, groups, len(keep), groups=groups).to(module.weight.device)
        new.weight = _like(module.weight, module.weight[keep])
        if module.bias is not None:
            new.bias = _like(module.bias, module.bias[keep])
        new.train(module.training)
        return new
    raise ChanpruneError(f"cannot remove channels of {type(module).__name__}")


def _check_whole_blocks(keep: torch.Tensor, size: int, layer: str) -> None:
    """Refuse channels ``keep`` of ``layer`` (a depthwise conv with ``size`` outputs per input
    channel, a GroupNorm with ``size`` channels per group) unless they are whole blocks, in order."""
    blocks = keep.reshape(-1, size) if len(keep) % size == 0 else None
    if blocks is None or bool((blocks[:, 0] % size != 0).any()) or \
            bool((blocks != blocks[:, :1] + torch.arange(size)[None]).any()) or bool((blocks[:, 0].diff() <= 0).any()):
        raise ChanpruneError(f"{layer} with blocks of {size} channels must keep whole blocks of {size}, in order; "
                             "the checkpoint does not match its architecture")


def _sliced_norm(module: nn.Module, keep: torch.Tensor) -> nn.Module:
    """A BatchNorm (or a subclass with extra behaviour, kept as is) with only channels ``keep``."""
    new = copy.deepcopy(module)
    for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        if tensor.ndim and tensor.shape[0] == module.num_features:
            value = tensor.detach()[keep].clone()
            setattr(new, name, nn.Parameter(value, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else value)
    new.num_features = len(keep)
    return new


def select_inputs(module: nn.Module, index: torch.Tensor) -> nn.Module:
    """A conv reading only input channels ``index`` through a channel select; the tensor it reads
    keeps every channel (feature-map sampling)."""
    if isinstance(module, FactorizedConv2d):
        return _with_end(module, 0, select_inputs(module[0], index))
    if not (isinstance(module, nn.Conv2d) and module.groups == 1) or isinstance(module, SelectedConv2d):
        raise ChanpruneError(f"cannot put a channel select in front of {type(module).__name__}")
    index = index.to(torch.long)
    new = conv_like(module, len(index), module.out_channels, index=index).to(module.weight.device)
    new.weight = _like(module.weight, module.weight[:, index])
    if module.bias is not None:
        new.bias = _like(module.bias, module.bias)
    new.train(module.training)
    return new


MAX_SCATTER_WIDTH = 1 << 16  # more trunk channels than any CNN has: a plan asking for more is damaged


def scatter_outputs(module: nn.Module, keep: torch.Tensor, channels: int) -> nn.Module:
    """The same Conv2d or BatchNorm2d writing its outputs into positions ``keep`` of ``channels``
    (see :class:`~chanprune.layers.ScatteredConv2d`)."""
    width = module.out_channels if type(module) is nn.Conv2d else getattr(module, "num_features", None)
    if channels > MAX_SCATTER_WIDTH:
        raise ChanpruneError(f"pruning plan scatters outputs into {channels} channels (at most {MAX_SCATTER_WIDTH}); "
                             "the checkpoint does not match its architecture")
    if type(module) not in (nn.Conv2d, nn.BatchNorm2d) or width != len(keep) or len(set(keep.tolist())) != len(keep):
        raise ChanpruneError(f"cannot scatter the outputs of a {type(module).__name__} with {width} channels to "
                             f"{len(keep)} distinct positions; the checkpoint does not match its architecture")
    if isinstance(module, nn.Conv2d):
        new: nn.Module = ScatteredConv2d(keep, channels, module.in_channels, module.kernel_size, module.stride,
                                         module.padding, module.dilation, module.groups, module.bias is not None,
                                         module.padding_mode)
    else:
        new = ScatteredBatchNorm2d(keep, channels, module.eps, module.momentum, module.affine,
                                   module.track_running_stats)
    new.load_state_dict(module.state_dict(), strict=False)  # the scatter's buffers are new
    param = next(module.parameters(), None)
    if param is not None:
        new.to(param.device, param.dtype)
    new.train(module.training)
    return new


def _with_end(chain: FactorizedConv2d, at: int, conv: nn.Module) -> FactorizedConv2d:
    """A copy of ``chain`` whose conv at ``at`` (0: the first, -1: the last) is ``conv``."""
    convs = list(chain)
    convs[at] = conv
    return FactorizedConv2d(*convs)


MAX_RANK = 1 << 16  # no factorized layer is this wide: a plan asking for more is damaged


def factorize_spatial(module: nn.Module, rank: int) -> FactorizedConv2d:
    """A kh×kw conv (stride 1) as a kh×1 conv with ``rank`` outputs and no bias, then a 1×kw conv
    with the original outputs and bias (weights to be written)."""
    kh, kw = module.kernel_size if isinstance(module, nn.Conv2d) else (0, 0)
    if type(module) not in (nn.Conv2d, SelectedConv2d) or module.groups != 1 or min(kh, kw) < 2 or \
            tuple(module.stride) != (1, 1) or isinstance(module.padding, str) or module.padding_mode != "zeros" \
            or not 1 <= rank <= min(module.in_channels * kh, module.out_channels * kw, MAX_RANK):
        raise ChanpruneError(f"cannot factorize {type(module).__name__} spatially at rank {rank}; the checkpoint "
                             "does not match its architecture")
    (ph, pw), (dh, dw) = module.padding, module.dilation
    vertical = nn.Conv2d(module.in_channels, rank, (kh, 1), 1, (ph, 0), (dh, 1), bias=False)
    if isinstance(module, SelectedConv2d):
        vertical = SelectedConv2d(module.index, rank, (kh, 1), 1, (ph, 0), (dh, 1), bias=False)
    horizontal = nn.Conv2d(rank, module.out_channels, (1, kw), 1, (0, pw), (1, dw), bias=module.bias is not None)
    return _placed(FactorizedConv2d(vertical, horizontal), module)


def factorize_channel(module: nn.Module, rank: int) -> FactorizedConv2d:
    """A conv (or the last conv of a factorized one) as the same conv with ``rank`` outputs and no
    bias, then a 1×1 conv with the original outputs and bias (weights to be written)."""
    last = module[-1] if isinstance(module, FactorizedConv2d) else module
    if type(last) not in (nn.Conv2d, SelectedConv2d) or last.groups != 1 or not 1 <= rank <= min(last.out_channels,
                                                                                                   MAX_RANK):
        raise ChanpruneError(f"cannot factorize {type(last).__name__} over channels at rank {rank}; the checkpoint "
                             "does not match its architecture")
    narrow = conv_like(last, last.in_channels, rank)
    if narrow.bias is not None:
        narrow.bias = None
    pointwise = nn.Conv2d(rank, last.out_channels, 1, bias=last.bias is not None)
    convs = [*(module[:-1] if isinstance(module, FactorizedConv2d) else []), narrow, pointwise]
    return _placed(FactorizedConv2d(*convs), module)


def _placed(new: nn.Module, old: nn.Module) -> nn.Module:
    """``new`` on ``old``'s device and dtype, in its training mode."""
    param = next(old.parameters(), None)
    if param is not None:
        new.to(param.device, param.dtype)
    return new.train(old.training)


def with_bias(module: nn.Module) -> nn.Module:
    """The same Conv2d / Linear with a (zero) bias parameter added."""
    if module.bias is not None:
        return module
    out = module.weight.shape[0]
    module.bias = nn.Parameter(torch.zeros(out, dtype=module.weight.dtype, device=module.weight.device))
    return module


def bn_affine(bn: nn.Module | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of an eval-mode BatchNorm as y = scale * x + shift (identity when None)."""
    if bn is None:
        return torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    var = bn.running_var.double() if bn.track_running_stats else torch.ones(n, dtype=torch.float64)
    mean = bn.running_mean.double() if bn.track_running_stats else torch.zeros(n, dtype=torch.float64)
    scale = 1.0 / torch.sqrt(var + bn.eps)
    if bn.affine:
        scale = scale * bn.weight.detach().double()
    shift = -mean * scale + (bn.bias.detach().double() if bn.affine else 0.0)
    return scale, shift


def folded_weight(layer: nn.Module, bn: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (n, c*k) and bias (n,) of layer followed by ``bn``, as one affine map, in float64."""
    w = layer.weight.detach().double().reshape(layer.weight.shape[0], -1)
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    scale, shift = (t.to(w.device) for t in bn_affine(bn, w.shape[0]))
    return w * scale[:, None], b * scale + shift


def write_folded(layer: nn.Module, bn: nn.Module | None, weight: torch.Tensor, bias: torch.Tensor) -> bool:
    """Write a folded solution back into ``layer`` (+ ``bn``), keeping BN running statistics.

    The BN shift absorbs the new bias when there is a BN; otherwise the layer gets one. Returns
    True when a bias parameter had to be added to ``layer``.
    """
    weight, bias = weight.to(layer.weight.device), bias.to(layer.weight.device)
    scale = bn_affine(bn, weight.shape[0])[0].to(weight.device)
    safe = torch.where(scale != 0, scale, torch.ones_like(scale))
    raw = torch.where((scale != 0)[:, None], weight / safe[:, None], torch.zeros_like(weight))
    layer.weight.data.copy_(raw.reshape(layer.weight.shape).to(layer.weight.dtype))
    added = False
    if bn is not None and bn.affine:
        layer_bias = layer.bias.detach().double() if layer.bias is not None else 0.0
        mean = bn.running_mean.double() if bn.track_running_stats else 0.0
        bn.bias.data.copy_((bias - scale * layer_bias + scale * mean).to(bn.bias.dtype))
    else:
        if layer.bias is None:
            with_bias(layer)
            added = True
        shift = bn_affine(bn, weight.shape[0])[1].to(weight.device)
        layer.bias.data.copy_(((bias - shift) / safe).to(layer.bias.dtype))
    return added


OPS = ("keep_outputs", "keep_inputs", "keep_channels", "select_inputs", "add_bias", "keep_scale", "scatter_outputs",
       "factorize_spatial", "factorize_channel", "cut_channels", FOLD_OP, CONV_MODULE_OP, *REWRITE_OPS)
# operations on a traced model: a model replaying them is traced first
GRAPH_OPS = ("cut_channels", CONV_MODULE_OP, *REWRITE_OPS)


@dataclass
class Plan:
    """Ordered surgery operations, replayable on a fresh model of the same architecture."""

    ops: list[PlanOp] = field(default_factory=list)

    def apply(self, model: nn.Module, op: PlanOp) -> None:
        apply_op(model, op)
        self.ops.append(op)

    def keep_outputs(self, model: nn.Module, name: str, keep: torch.Tensor) -> None:
        self.apply(model, PlanOp("keep_outputs", name, tuple(keep.tolist())))

    def keep_inputs(self, model: nn.Module, name: str, keep: torch.Tensor, channel_size: int = 1) -> None:
        self.apply(model, PlanOp("keep_inputs", name, tuple(keep.tolist()), channel_size))

    def keep_channels(self, model: nn.Module, name: str, keep: torch.Tensor) -> None:
        self.apply(model, PlanOp("keep_channels", name, tuple(keep.tolist())))

    def select_inputs(self, model: nn.Module, name: str, index: torch.Tensor) -> None:
        self.apply(model, PlanOp("select_inputs", name, tuple(index.tolist())))

    def add_bias(self, name: str) -> None:
        self.ops.append(PlanOp("add_bias", name))

    def keep_scale(self, model: nn.Module, path: str, keep: torch.Tensor) -> None:
        self.apply(model, PlanOp("keep_scale", path, tuple(keep.tolist())))

    def factorize(self, model: nn.Module, name: str, kind: str, rank: int) -> None:
        self.apply(model, PlanOp(f"factorize_{kind}", name, (rank,)))

    def scatter_outputs(self, model: nn.Module, name: str, keep: torch.Tensor, channels: int) -> None:
        self.apply(model, PlanOp("scatter_outputs", name, tuple(keep.tolist()), channels))

    def cut_channels(self, model: fx.GraphModule, node: str, axis: int, positions: tuple[int, ...]) -> None:
        self.apply(model, PlanOp("cut_channels", node, (axis, *positions)))


_SPLITS = {torch.split: torch.split, torch.functional.split: torch.split, torch.chunk: torch.split,
           "split": "split", "chunk": "split"}
_SLICES = (operator.getitem, torch.narrow, "narrow")
MAX_CHANNELS = 1 << 20  # a cut position beyond this is not from a real model
_PLAIN = (bool, int, float, str, tuple, list, dict)


def cut_channels(gm: fx.GraphModule, name: str, axis: int, positions: tuple[int, ...]) -> None:
    """Move the channel cuts of traced node ``name`` to ``positions``: a split's or chunk's piece
    boundaries (0, end of piece 1, ..., end) make it a split with those sizes; a channel slice or
    ``narrow`` takes (start, stop) along ``axis``. Checked against what the node is."""
    node = next((n for n in gm.graph.nodes if n.name == name and n.op in ("call_function", "call_method")), None)
    target = node.target if node is not None else None
    ok = (len(positions) >= 2 and 0 <= axis < 8 and all(isinstance(p, int) for p in positions)
          and 0 <= positions[0] and positions[-1] <= MAX_CHANNELS
          and all(a <= b for a, b in zip(positions, positions[1:])))
    if not ok or (target not in _SPLITS and target not in _SLICES) or (target in _SLICES and len(positions) != 2):
        raise ChanpruneError(f"pruning plan cuts channels at {name!r} in a way the traced architecture does not "
                             "allow; the checkpoint does not match its architecture")
    start, stop = positions[0], positions[-1]
    if target in _SPLITS:
        node.target = _SPLITS[target]
        node.args = (node.args[0], [b - a for a, b in zip(positions, positions[1:])], *node.args[2:])
    elif target is operator.getitem:
        index = node.args[1]
        if not isinstance(index, tuple) or len(index) <= axis or not isinstance(index[axis], slice):
            raise ChanpruneError(f"pruning plan slices channels at {name!r}, which does not slice axis {axis}; "
                                 "the checkpoint does not match its architecture")
        node.args = (node.args[0], (*index[:axis], slice(start, stop), *index[axis + 1:]))
    else:
        args = [node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs["dim"], start, stop - start]
        node.args, node.kwargs = tuple(args), {}
    gm.recompile()


def traced_for(model: nn.Module, ops: list[PlanOp] | tuple[PlanOp, ...]) -> nn.Module:
    """``model`` itself, or its trace when ``ops`` edit the traced graph (channel cuts), with the
    model's plain public attributes (numbers, strings, containers) copied over."""
    if any(op.op in GRAPH_OPS for op in ops) and not isinstance(model, fx.GraphModule):
        traced = trace(model)
        for name, value in vars(model).items():  # plain settings a caller may read (timm's pretrained_cfg)
            if not name.startswith("_") and name not in vars(traced) and isinstance(value, _PLAIN):
                setattr(traced, name, copy.deepcopy(value))
        return traced
    return model


def keep_scale(model: nn.Module, path: str, keep: torch.Tensor) -> None:
    """Slice the per-channel parameter or buffer at ``path`` (one axis longer than 1) to ``keep``."""
    owner_name, _, attr = path.rpartition(".")
    try:
        owner = model.get_submodule(owner_name)
        value = getattr(owner, attr)
    except AttributeError:
        value = None
    if not isinstance(value, torch.Tensor):
        raise ChanpruneError(f"pruning plan names a channel scale {path!r} that the architecture lacks; "
                             "the checkpoint does not match its architecture")
    axis = max(range(value.ndim), key=lambda i: value.shape[i])
    if len(keep) and int(keep.max()) >= value.shape[axis]:
        raise ChanpruneError(f"pruning plan keeps channel {int(keep.max())} of {path!r}, which has fewer; "
                             "the checkpoint does not match its architecture")
    sliced = value.detach().index_select(axis, keep).clone()
    if isinstance(value, nn.Parameter):
        setattr(owner, attr, nn.Parameter(sliced, requires_grad=value.requires_grad))
    else:
        setattr(owner, attr, sliced)


def apply_op(model: nn.Module, op: PlanOp) -> None:
    """Apply one recorded operation to ``model`` (shapes, and the weights of kept channels)."""
    if op.op == "keep_scale":
        keep_scale(model, op.layer, torch.tensor(op.keep, dtype=torch.long))
        return
    if op.op in GRAPH_OPS and not isinstance(model, fx.GraphModule):
        raise ChanpruneError(f"pruning plan edits the traced graph at {op.layer!r} of a model that is not traced")
    if op.op == "cut_channels":
        if not op.keep:
            raise ChanpruneError(f"pruning plan cuts channels at {op.layer!r} without positions")
        cut_channels(model, op.layer, op.keep[0], op.keep[1:])
        return
    if op.op in REWRITE_OPS:
        apply_rewrite(model, op)
        return
    if op.op == CONV_MODULE_OP:
        as_conv_module(model, op.layer)
        return
    try:
        layer = model.get_submodule(op.layer)
    except AttributeError:
        raise ChanpruneError(f"pruning plan names layer {op.layer!r} that the architecture lacks; "
                             "the checkpoint does not match its architecture") from None
    keep = torch.tensor(op.keep, dtype=torch.long)
    if len(keep) and int(keep.max()) >= _channel_bound(layer, op):
        raise ChanpruneError(f"pruning plan keeps channel {int(keep.max())} of {op.layer!r}, which has fewer; "
                             "the checkpoint does not match its architecture")
    if op.op == "keep_outputs":
        replace_module(model, op.layer, keep_outputs(layer, keep))
    elif op.op == "keep_inputs":
        replace_module(model, op.layer, keep_inputs(layer, keep, op.channel_size))
    elif op.op == "keep_channels":
        replace_module(model, op.layer, keep_channels(layer, keep))
    elif op.op == "select_inputs":
        replace_module(model, op.layer, select_inputs(layer, keep))
    elif op.op in ("factorize_spatial", "factorize_channel"):
        if len(op.keep) != 1:
            raise ChanpruneError(f"pruning plan factorizes {op.layer!r} with {len(op.keep)} ranks, not one; the "
                                 "checkpoint does not match its architecture")
        factorize = factorize_spatial if op.op == "factorize_spatial" else factorize_channel
        replace_module(model, op.layer, factorize(layer, op.keep[0]))
    elif op.op == "scatter_outputs":
        replace_module(model, op.layer, scatter_outputs(layer, keep, op.channel_size))
    elif op.op == "add_bias":
        with_bias(layer)
    elif op.op == FOLD_OP:
        replace_module(model, op.layer, fold_conv(layer, op.layer))
    else:
        raise ChanpruneError(f"unknown pruning operation {op.op!r}; the checkpoint is newer than this chanprune")


def _channel_bound(layer: nn.Module, op: PlanOp) -> int:
    """How many channels ``op`` may index in ``layer``."""
    weight = getattr(layer, "weight", None)
    if op.op == "scatter_outputs":
        return op.channel_size
    if op.op.startswith("factorize_"):
        return MAX_RANK + 1  # ranks are checked by the factorization itself
    if isinstance(layer, FactorizedConv2d):
        layer = layer[-1] if op.op == "keep_outputs" else layer[0]
        weight = layer.weight
    if op.op == "keep_outputs":
        return weight.shape[0] if weight is not None else getattr(layer, "num_features", 0)
    if op.op in ("keep_inputs", "select_inputs"):
        if isinstance(layer, nn.Linear):
            return layer.in_features // op.channel_size
        if isinstance(layer, nn.Conv2d):
            return layer.in_channels
        return weight.shape[1] if weight is not None else 0
    return getattr(layer, "num_features", None) or getattr(layer, "num_channels", None) or \
        (weight.shape[0] if weight is not None else 0)


def replay(model: nn.Module, ops: list[PlanOp] | tuple[PlanOp, ...]) -> nn.Module:
    """Apply recorded operations to ``model`` in order; returns ``model``, or its trace when the
    operations edit the traced graph."""
    model = traced_for(model, ops)
    for op in ops:
        apply_op(model, op)
    return model
