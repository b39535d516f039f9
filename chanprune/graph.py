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
``cat`` along channels lays several groups side by side; ``split``, ``chunk`` and channel slices
cut a group into pieces, groups of their own that share its writers (``out_layouts``); a residual ``add`` or a gating ``mul``
(squeeze-excitation) ties two groups channel by channel, so they merge into one group with
several writers. A dense Conv2d or Linear that reads a group is a *reader*.

Pruning a group keeps a subset of its channels: every writer loses filters, every follower
loses entries and every reader loses input channels. A group that meets an operation this
module cannot reason about is marked unprunable with the reason and the node's name, never
pruned wrongly.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import ChanpruneError, error_line
from .folding import FOLD_OP, with_folded_convs
from .functional_convs import CONV_MODULE_OP, with_conv_modules
from .graph_ops import FOLLOWER_NORMS, OPS, Pieces, Tag, cut_at
from .plan_op import PlanOp
from .shuffle import without_shuffles
from .tracing import trace

OUTPUT_REASON = "its channels are a model output"
WEIGHTED = (nn.Conv2d, nn.Linear, *FOLLOWER_NORMS, nn.PReLU)  # modules whose weights follow their channels


@dataclass
class Reader:
    """A Conv2d or Linear reading a group.

    ``groups`` > 1 for a grouped conv: conv group j's inputs (a j-th block of the channels) only
    explain its own outputs, so it is reconstructed group by group and keeps as many channels in
    every block. ``channel_size`` input features belong to one channel (H*W for a Linear after flatten);
    ``layout`` says where the channel axis is ("nchw", "nc" or "nhwc"); ``bn`` is a BatchNorm
    applied directly to the reader's output (folded into its targets); ``shortcut`` names the fx
    node added to the reader's (BN's) output by a residual add, when there is one; ``pads`` is the
    (left, right, top, bottom) zero padding a conv with a forward of its own applies (timm's
    Conv2dSame; None: the conv's settings say), so it takes no channel select either.
    """

    name: str
    kind: str
    channel_size: int = 1
    layout: str = "nchw"
    bn: str | None = None
    shortcut: str | None = None
    input_node: str = ""
    output_node: str = ""
    groups: int = 1
    pads: tuple[int, int, int, int] | None = None


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
    conv_groups: int = 1  # written by a grouped conv: kept channels are as many in each of its groups
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


@dataclass(frozen=True)
class Cut:
    """A traced op that cuts channels at fixed positions (``split``, ``chunk``, a channel slice,
    ``narrow``): its input holds ``groups`` side by side along ``axis`` and it cuts before the
    segments at indices ``bounds``. Pruning moves the cuts to the current widths."""

    node: str
    groups: tuple[str, ...]
    axis: int
    bounds: tuple[int, ...]

    def positions(self, widths: dict[str, int]) -> tuple[int, ...]:
        """Channel positions of the cuts when the groups have ``widths``."""
        ends = [0]
        for g in self.groups:
            ends.append(ends[-1] + widths[g])
        return tuple(ends[i] for i in self.bounds)


@dataclass
class ChannelGraph:
    """Channel groups of a model, the traced module, and the channel layout of every member.

    ``out_layouts[name]`` lists the groups a writer's output is split into (``split``, ``chunk``
    or a channel slice cut its channels into pieces that are pruned independently);
    ``layouts[name]`` lists the groups laid side by side along a follower's or reader's channel
    axis (one entry unless the input is a concatenation); ``depthwise`` holds depthwise convs
    (followers whose FLOPs scale with their channels); ``order`` ranks modules by execution;
    ``node_layouts`` gives the channel layout of every traced value that carries groups;
    ``cuts`` the ops that cut channels at positions a pruned model must move; ``rewrites`` the
    steps that made functional convs modules (:mod:`chanprune.functional_convs`), folded convs
    deriving their weight into plain ones (:mod:`chanprune.folding`) and turned channel shuffles
    into slices (:mod:`chanprune.shuffle`) in ``gm``, which the pruned model replays first.
    """

    groups: list[ChannelGroup]
    input_shape: tuple[int, ...]
    layer_kinds: dict[str, str]
    gm: fx.GraphModule
    layouts: dict[str, list[str]]
    depthwise: set[str]
    order: dict[str, int]
    node_layouts: dict[str, NodeLayout] = field(default_factory=dict)
    out_layouts: dict[str, list[str]] = field(default_factory=dict)
    cuts: list[Cut] = field(default_factory=list)
    rewrites: list[PlanOp] = field(default_factory=list)

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


def build_graph(model: nn.Module, example: torch.Tensor, warn: bool = True) -> ChannelGraph:
    """Trace ``model`` on ``example`` (a batch of 1 is enough), make functional convs with a
    constant weight conv modules, fold convs that derive their weight into plain ones, rewrite its
    channel shuffles as slices, and find its channel groups."""
    gm = trace(model)
    check_runs(gm, example)
    try:
        ShapeProp(gm).propagate(example)
    except Exception as err:
        raise ChanpruneError(f"the model does not run on an input of shape {tuple(example.shape)} "
                             f"({error_line(err)}); pass the right --input-size") from err
    folds = [PlanOp(CONV_MODULE_OP, name) for name in with_conv_modules(gm)]
    folds += [PlanOp(FOLD_OP, name) for name in with_folded_convs(gm)]
    gm, rewrites = without_shuffles(gm, example)
    if rewrites:
        ShapeProp(gm).propagate(example)
    rewrites = folds + rewrites
    builder = _Builder(gm)
    for node in gm.graph.nodes:
        builder.visit(node)
    return replace(builder.finish(tuple(example.shape), warn), rewrites=rewrites)


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
        reason = error_line(err)
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


def _check_grouped_readers(group: ChannelGroup, layouts: dict[str, list[str]]) -> None:
    """Block ``group`` where a grouped conv reads it in a way group-by-group pruning does not
    cover: beside other readers (they would need other channels than equal counts per block), as
    one part of a concatenation, on a residual trunk, or in blocks of a pixel shuffle."""
    if group.conv_groups > 1 and (group.residual or group.channels % group.conv_groups) and \
            "a grouped conv writes it on a trunk" not in group.blocked_by:
        group.blocked_by.append("a grouped conv writes it on a trunk")
    grouped = [r for r in group.readers if r.groups > 1]
    if not grouped:
        return
    first = grouped[0]
    why = None
    if len(grouped) != len(group.readers) or any(r.groups != first.groups for r in grouped):
        why = f"{first.name} is a grouped conv ({first.groups} groups) and other layers read its input too"
    elif any(layouts[r.name] != [group.name] for r in grouped) or group.residual or group.blocks:
        why = f"{first.name} is a grouped conv ({first.groups} groups) reading a concatenation or a trunk"
    elif group.channels % first.groups:
        why = f"{first.name} is a grouped conv whose groups do not divide its input channels"
    elif group.conv_groups not in (1, first.groups):
        why = f"{first.name} is a grouped conv ({first.groups} groups) reading another grouped conv's blocks"
    if why and why not in group.blocked_by:
        group.blocked_by.append(why)


def _starts(tag: Tag) -> list[int]:
    """Channel positions where each segment of ``tag`` starts."""
    starts, at = [], 0
    for g in tag.segments:
        starts.append(at)
        at += g.root().channels
    return starts


def _op_name(node: fx.Node, module: nn.Module | None) -> str:
    """How a warning names an op: the module's class, the function's name or ``.method``."""
    if module is not None:
        return type(module).__name__
    if node.op == "call_method":
        return f".{node.target}"
    return getattr(node.target, "__name__", str(node.target))


class _Builder:
    """Walks the traced graph once, tagging every value with the channel groups it carries."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.tags: dict[fx.Node, Tag | Pieces | None] = {}
        self.created: list[ChannelGroup] = []
        self.layouts: dict[str, list[ChannelGroup]] = {}
        self.layer_kinds: dict[str, str] = {}
        self.depthwise: set[str] = set()
        self.order: dict[str, int] = {}
        self.readers: dict[str, tuple[Reader, list[ChannelGroup]]] = {}
        self.bn_after: dict[str, fx.Node] = {}  # conv/linear -> the plain BN node right after it
        self.out_layouts: dict[str, list[ChannelGroup]] = {}  # writer -> the pieces its output was cut into
        self.offsets: dict[int, int] = {}  # id(piece) -> its first channel in the group it was cut from
        self.cut_into: dict[int, list[ChannelGroup]] = {}  # id(cut group) -> its two pieces
        self.cuts: list[tuple[fx.Node, fx.Node, list[int]]] = []  # (cutting node, its input, channel positions)
        calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        self.shared = {name for name, count in calls.items() if count > 1}

    # -- bookkeeping ---------------------------------------------------------------------
    def block(self, tag: Tag | Pieces | None, why: str) -> None:
        if isinstance(tag, Pieces):
            for piece in tag.tags:
                self.block(piece, why)
            return
        if tag is None:
            return
        for g in tag.segments:
            root = g.root()
            if why not in root.blocked_by:
                root.blocked_by.append(why)

    def new_group(self, node: fx.Node, axis: int = 1) -> Tag:
        shape = node.meta["tensor_meta"].shape
        group = ChannelGroup(name=node.target, channels=int(shape[axis]), writers=[node.target])
        self.created.append(group)
        return Tag((group,), axis % len(shape))

    def merge(self, a: Tag, b: Tag, residual: bool, node: fx.Node) -> Tag | None:
        """Tie two tags channel by channel (residual add, gating multiply). Where one side's groups
        are cut differently from the other's (a concatenation added to one group), both are cut
        at every boundary of either first, so the pieces tie one to one. A group added to blocks of
        consecutive channels (after a depthwise channel multiplier) becomes blocks of its own."""
        four_d = len(node.meta["tensor_meta"].shape) == 4 if "tensor_meta" in node.meta else False
        if four_d and a.flat_size != b.flat_size and a.axis == b.axis == 1:
            if a.flat_size is None and b.flat_size is not None and a.channels == b.channels * b.flat_size:
                a = self.reblock(a, b.flat_size)
            elif b.flat_size is None and a.flat_size is not None and b.channels == a.channels * a.flat_size:
                b = self.reblock(b, a.flat_size)
        if a.channels == b.channels and a.axis == b.axis and a.flat_size == b.flat_size:
            bounds = sorted({*_starts(a), *_starts(b)})
            for at in bounds:
                a, b = cut_at(self, a, at) or a, cut_at(self, b, at) or b
                a, b = self.current(a), self.current(b)
        sizes_a = [g.root().channels for g in a.segments]
        sizes_b = [g.root().channels for g in b.segments]
        if sizes_a != sizes_b or a.axis != b.axis or a.flat_size != b.flat_size:
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
                ra.readers += [r for r in rb.readers if all(r is not x for x in ra.readers)]
                ra.blocked_by += [w for w in rb.blocked_by if w not in ra.blocked_by]
                ra.residual = ra.residual or rb.residual
                ra.blocks.update(rb.blocks)
                ra.scales += [a for a in rb.scales if a not in ra.scales]
                ra.conv_groups = math.lcm(ra.conv_groups, rb.conv_groups)
            ra.residual = ra.residual or residual
        return a

    def reblock(self, tag: Tag, size: int) -> Tag:
        """``tag``'s group seen as blocks of ``size`` consecutive channels: each member loses whole
        blocks from now on, and the convs that read it read ``size`` channels per channel. ``tag``
        unchanged (so the caller blocks) unless it is one plain, uncut group that only dense convs
        read and that every value holds alone."""
        if len(tag.segments) != 1 or tag.flat_size is not None:
            return tag
        group = tag.segments[0].root()
        holders = [n for n, t in self.tags.items() if isinstance(t, Tag) and any(g.root() is group for g in t.segments)]
        if group.channels % size or group.conv_groups > 1 or group not in self.created or \
                any(w in self.out_layouts for w in group.writers) or \
                any(r.kind != "conv" or r.groups > 1 for r in group.readers) or \
                any(len(self.tags[n].segments) != 1 or self.tags[n].flat_size is not None for n in holders):
            return tag
        group.channels //= size
        for member in dict.fromkeys([*group.writers, *group.followers, *group.scales]):
            group.blocks[member] = group.block_of(member) * size
        for reader in group.readers:
            reader.channel_size *= size
        for n in holders:
            self.tags[n] = Tag(self.tags[n].segments, self.tags[n].axis, size)
        return Tag(tag.segments, tag.axis, size)

    def cut_group(self, group: ChannelGroup, at: int, tied: bool = False) -> list[ChannelGroup] | None:
        """Cut ``group`` (a root) into its first ``at`` channels and the rest, two groups with the
        same writers, followers and readers, everywhere it is held; returns the two, or None
        (nothing changed) when its channels are blocks of a pixel shuffle or a grouped conv writes
        them. A grouped conv's output is cut between its conv groups when the caller ties the
        pieces (a split attention's paths): tied pieces keep the same channels, so every conv
        group keeps as many."""
        per_group = group.channels // group.conv_groups
        if group.blocks or (group.conv_groups > 1 and not (tied and at % per_group == 0)):
            return None
        start = self.offsets.get(id(group), 0)
        base = group.name.partition("[")[0]
        pieces = []
        for lo, hi in ((0, at), (at, group.channels)):
            piece = ChannelGroup(f"{base}[{start + lo}:{start + hi}]", hi - lo, list(group.writers),
                                 list(group.followers), list(group.readers), list(group.blocked_by), group.residual,
                                 scales=list(group.scales),
                                 conv_groups=(hi - lo) // per_group if group.conv_groups > 1 else 1)
            self.offsets[id(piece)] = start + lo
            pieces.append(piece)
        at_index = self.created.index(group)
        self.created[at_index:at_index + 1] = pieces
        self.cut_into[id(group)] = pieces

        def swap(segments: Iterable[ChannelGroup]) -> list[ChannelGroup]:
            return [p for g in segments for p in (pieces if g.root() is group else (g,))]

        for node, tag in self.tags.items():
            if isinstance(tag, Pieces):
                self.tags[node] = Pieces(tuple(t and Tag(tuple(swap(t.segments)), t.axis, t.flat_size)
                                               for t in tag.tags))
            elif tag is not None:
                self.tags[node] = Tag(tuple(swap(tag.segments)), tag.axis, tag.flat_size)
        for table in (self.layouts, self.out_layouts):
            for name, segments in table.items():
                table[name] = swap(segments)
        for name, (reader, segments) in self.readers.items():
            self.readers[name] = (reader, swap(segments))
        for writer in group.writers:
            self.out_layouts[writer] = swap(self.out_layouts.get(writer, [group]))
        return pieces

    def current(self, tag: Tag) -> Tag:
        """``tag`` with every group that was cut since replaced by its pieces."""
        segments = []
        for g in tag.segments:
            root = g.root()
            segments += self.pieces_of(root) if root not in self.created else [g]
        return Tag(tuple(segments), tag.axis, tag.flat_size)

    def pieces_of(self, group: ChannelGroup) -> list[ChannelGroup]:
        """The live groups a cut group became (cut again, maybe), in channel order."""
        return [p for piece in self.cut_into[id(group)]
                for p in ([piece] if piece.root() in self.created else self.pieces_of(piece.root()))]

    def follow(self, name: str, tag: Tag) -> None:
        self.layouts[name] = list(tag.segments)
        for g in tag.segments:
            g.root().followers.append(name)

    def read(self, node: fx.Node, tag: Tag, kind: str, channel_size: int = 1, layout: str = "nchw",
             groups: int = 1, pads: tuple[int, int, int, int] | None = None) -> None:
        """Make the layer called by ``node`` a reader of the groups in ``tag`` (a group held
        twice, as a Ghost module's ``cat([x, cheap(x)])``, loses the same channels in both places)."""
        reader = Reader(node.target, kind, channel_size, layout, input_node=node.args[0].name, output_node=node.name,
                        groups=groups, pads=pads)
        self.readers[reader.name] = (reader, list(tag.segments))
        for root in dict.fromkeys(g.root() for g in tag.segments):
            root.readers.append(reader)

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

    def unsupported(self, node: fx.Node, in_tags: list[Tag | None], what: str) -> None:
        """Block every group ``node`` touches: chanprune cannot say where its channels go."""
        for t in in_tags:
            self.block(t, f"{node.name} ({what}) is not supported")

    # -- the walk ------------------------------------------------------------------------
    def visit(self, node: fx.Node) -> None:
        """Tag ``node``'s output by the handler of its op (:data:`graph_ops.OPS`)."""
        in_tags = [self.tags.get(a) for a in node.all_input_nodes]
        main = self.tags.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        module = self.modules[node.target] if node.op == "call_module" else None
        out = None
        if node.op == "output":
            for t in in_tags:
                self.block(t, OUTPUT_REASON)
        elif isinstance(module, WEIGHTED) and node.target in self.shared:
            self.order.setdefault(node.target, len(self.order))
            out = self.shared_call(node, module, in_tags)
        elif node.op in ("call_module", "call_function", "call_method"):
            if module is not None:
                self.order.setdefault(node.target, len(self.order))
            handler = OPS.lookup(node, module)
            if handler is None or (any(isinstance(t, Pieces) for t in in_tags) and handler not in OPS.take_pieces):
                self.unsupported(node, in_tags, _op_name(node, module))
            else:
                out = handler(self, node, main, in_tags)
        self.tags[node] = out

    def shared_call(self, node: fx.Node, module: nn.Module, in_tags: list[Tag | None]) -> Tag | None:
        """A module with weights called more than once blocks what it touches: its weights cannot
        be narrowed for one call only."""
        for t in in_tags:
            self.block(t, f"{node.target} is called more than once")
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            return None
        out = self.new_group(node, -1 if isinstance(module, nn.Linear) else 1)
        self.block(out, f"{node.target} is called more than once")
        return out

    # -- result ----------------------------------------------------------------------------
    def finish(self, input_shape: tuple[int, ...], warn: bool) -> ChannelGraph:
        groups = [g for g in self.created if g.parent is None]
        for name, (reader, _) in self.readers.items():
            if name in self.bn_after:  # targets are taken after the BN the reader's weights fold into
                reader.bn, reader.output_node = self.bn_after[name].target, self.bn_after[name].name
        layouts = {name: [g.root().name for g in segs] for name, segs in self.layouts.items()}
        layouts.update({name: [g.root().name for g in segs] for name, (_, segs) in self.readers.items()})
        for g in groups:
            _check_grouped_readers(g, layouts)
            g.followers = list(dict.fromkeys(g.followers))
            unsupported = [why for why in g.blocked_by if why != OUTPUT_REASON]
            if not g.readers and not g.blocked_by:
                g.blocked_by.append("no layer reads it")
            if warn and unsupported:
                warnings.warn(f"channels of {g.writer} stay unpruned: {'; '.join(unsupported)}", stacklevel=3)
        order = {name: i for i, name in enumerate(self.order)}
        groups.sort(key=lambda g: min((order[r.name] for r in g.readers), default=len(order)))
        node_layouts = {node.name: NodeLayout(tuple(g.root().name for g in tag.segments), tag.axis, tag.flat_size)
                        for node, tag in self.tags.items() if isinstance(tag, Tag)}
        out_layouts = {name: [g.root().name for g in segs] for name, segs in self.out_layouts.items()}
        return ChannelGraph(groups, input_shape, self.layer_kinds, self.gm, layouts, self.depthwise, order,
                            node_layouts, out_layouts, [self.cut_record(*c) for c in self.cuts])

    def cut_record(self, node: fx.Node, source: fx.Node, positions: list[int]) -> Cut:
        """The :class:`Cut` of ``node`` in terms of the groups its input holds when the walk ends."""
        tag = self.tags[source]
        starts = [0]
        for g in tag.segments:
            starts.append(starts[-1] + g.root().channels)
        return Cut(node.name, tuple(g.root().name for g in tag.segments), tag.axis,
                   tuple(starts.index(p) for p in positions))

