"""Speed-up target -> number of kept channels per group.

FLOPs of a dense conv or linear are bilinear in its kept input and output fractions (a depthwise
conv's are linear in its channels), so the model's FLOPs for any widths follow from one
flop-counter pass. A preset gives each pruning unit a relative weight w_u; kept fraction =
min(1, α·w_u), and α is solved by bisection so that the whole model's FLOPs ratio meets the
target. Units with no weight stay whole. Where whole channels (or ``round_to`` blocks) are too
coarse for any common α to land within the tolerance, the widths whose largest relative
deviation from the exact common fraction is smallest are found by branch and bound (FLOPs grow
with every width, which bounds each branch), and the rounding residue is then spread over the
units it changes least.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from collections.abc import Iterable
from typing import Callable

from .errors import ChanpruneError, UnreachableSpeedup
from .graph import ChannelGraph, ChannelGroup, Reader

TOLERANCE = 0.02


@dataclass
class Unit:
    """One pruning decision: how many of a group's channels to keep.

    A plain unit prunes the group (writers, followers and readers all lose the channels). A
    *select* unit (``reader`` set) is the paper's feature-map sampling: one reader of a group
    that keeps every channel reads a subset of it through a channel select. A *write* unit
    (``writer`` set: the writer's own reader entry, which carries its BN and shortcut) is FCP's
    fine-grained trunk: one writer of a residual trunk computes a subset of the trunk's channels
    and adds only those (``trunk="fine"``).
    """

    group: ChannelGroup
    reader: Reader | None = None
    writer: Reader | None = None

    @property
    def name(self) -> str:
        if self.writer:
            return f"write:{self.writer.name}"
        return f"select:{self.reader.name}" if self.reader else self.group.name

    @property
    def channels(self) -> int:
        return self.group.channels

    @property
    def readers(self) -> list[Reader]:
        """The layers whose statistics the unit needs: its reader, its writer, or the group's readers."""
        if self.writer:
            return [self.writer]
        return [self.reader] if self.reader else self.group.readers

    @property
    def multiple(self) -> int:
        """Kept widths must be multiples of this: the groups of the grouped convs writing or
        reading the unit, which keep as many channels in every conv group."""
        if not self.narrows_group:
            return 1
        return math.lcm(self.group.conv_groups, *(r.groups for r in self.readers))

    @property
    def narrows_group(self) -> bool:
        """Whether the group itself loses channels (every member, and the values carried along)."""
        return self.reader is None and self.writer is None

    @property
    def kind(self) -> str:
        if self.writer:
            return "write"
        return "select" if self.reader else "trunk" if self.group.residual else "group"


@dataclass
class FlopModel:
    """FLOPs as a function of kept widths: per-layer FLOPs scaled by kept in/out fractions."""

    graph: ChannelGraph
    total: int
    per_layer: dict[str, int]

    def __post_init__(self) -> None:
        self._channels = {g.name: g.channels for g in self.graph.groups}
        self._writer_group = {w: g.name for g in self.graph.groups for w in g.writers}

    def flops(self, widths: dict[str, int]) -> float:
        """Estimated FLOPs when unit u keeps ``widths[u]`` channels (others stay whole)."""
        return self.total - sum(self.per_layer.values()) + sum(self.layer_flops(widths, self.per_layer).values())

    def layer_flops(self, widths: dict[str, int], layers: Iterable[str]) -> dict[str, float]:
        """Estimated FLOPs of each of ``layers`` (pruned-aware layers) at ``widths``."""
        out = {}
        for name in layers:
            frac_in, frac_out = self.fractions(widths, name)
            out[name] = self.per_layer[name] * frac_in * frac_out
        return out

    def fractions(self, widths: dict[str, int], name: str) -> tuple[float, float]:
        """Kept fractions of layer ``name``'s (input, output) channels at ``widths``."""
        channels = self._channels
        layout = self.graph.layouts.get(name)
        frac_in = 1.0
        if f"select:{name}" in widths:
            frac_in = widths[f"select:{name}"] / channels[layout[0]]
        elif layout:
            frac_in = sum(widths.get(g, channels[g]) for g in layout) / sum(channels[g] for g in layout)
        frac_out = 1.0
        if f"write:{name}" in widths:
            frac_out = widths[f"write:{name}"] / channels[self._writer_group[name]]
        elif name in self.graph.out_layouts:
            layout = self.graph.out_layouts[name]
            frac_out = sum(widths.get(g, channels[g]) for g in layout) / sum(channels[g] for g in layout)
        elif name not in self.graph.depthwise and name in self._writer_group:
            group = self._writer_group[name]
            frac_out = widths.get(group, channels[group]) / channels[group]
        return frac_in, frac_out

    def touched(self, unit: str, narrowest: int) -> list[str]:
        """The layers whose FLOPs change when ``unit`` narrows (to ``narrowest`` channels)."""
        narrow = self.layer_flops({unit: narrowest}, self.per_layer)
        return [name for name in self.per_layer if narrow[name] != self.per_layer[name]]


Preset = Callable[[Unit, ChannelGraph], "float | None"]


def uniform_preset(unit: Unit, graph: ChannelGraph) -> float:
    """Every prunable unit keeps the same fraction."""
    return 1.0


_VGG_LAYER = re.compile(r"conv(\d)_(\d)")


def vgg_paper_preset(unit: Unit, graph: ChannelGraph) -> float | None:
    """He et al.'s VGG-16 widths: kept inputs of conv1_x-conv3_x : conv4_x = 1 : 1.5, conv5_x whole.

    A unit is named by the layer that reads it (the layer whose input channels are pruned).
    """
    match = _VGG_LAYER.search(unit.readers[0].name)
    if match is None:
        return None
    stage = int(match.group(1))
    return 1.0 if stage <= 3 else 1.5 if stage == 4 else None


_RESNET_LAYER = re.compile(r"layer(\d+)\.(\d+)\.(\w+)")
# Kept inputs of the bottleneck's branch2a : 2b : 2c (the paper's 2 : 4 : 3), by reader name.
_BRANCH_WEIGHT = {"conv1": 2 / 4, "conv2": 1.0, "conv2_pw": 1.0, "conv3": 3 / 4}


def resnet_paper_preset(unit: Unit, graph: ChannelGraph) -> float | None:
    """He et al.'s ResNet widths: sensitive blocks keep 70%, the others 30%, as relative weights.

    Sensitive blocks are the last stage and the blocks next to a change of spatial size (the
    first block of a stage that downsamples and the last block before it). Inside a bottleneck
    block the kept inputs of branch2a : 2b : 2c are 2 : 4 : 3. Trunks pruned jointly count as
    sensitive; shortcut projections keep their inputs. A unit read by several layers keeps what
    the most demanding one asks for (whole if a projection reads it), whichever runs first.
    Layers are found by torchvision-style names (``layerS.B.convK``); other layers stay whole.
    """
    blocks: dict[int, int] = {}
    for name in graph.layer_kinds:
        if m := _RESNET_LAYER.match(name):
            blocks[int(m.group(1))] = max(blocks.get(int(m.group(1)), 0), int(m.group(2)) + 1)
    matches = [_RESNET_LAYER.match(r.name) for r in unit.readers]
    if not blocks or not any(matches):
        return None
    if unit.kind in ("trunk", "write"):
        return 0.7
    weights = [_branch_weight(m, graph, blocks) if m else None for m in matches]
    return None if None in weights else max(weights)


def _branch_weight(match: re.Match, graph: ChannelGraph, blocks: dict[int, int]) -> float | None:
    """resnet-paper weight of the inputs of one block layer (``match`` of its name); None for a
    shortcut projection or a layer outside the branch."""
    stage, block, layer = int(match.group(1)), int(match.group(2)), match.group(3)
    if layer not in _BRANCH_WEIGHT:
        return None
    bottleneck = any(n.endswith(f"layer{stage}.{block}.conv3") for n in graph.layer_kinds)
    sensitive = stage == max(blocks) or (block == 0 and stage > min(blocks)) or \
        (block == blocks[stage] - 1 and stage < max(blocks))
    return (0.7 if sensitive else 0.3) * (_BRANCH_WEIGHT[layer] if bottleneck else 1.0)


PRESETS: dict[str, Preset] = {"uniform": uniform_preset, "vgg-paper": vgg_paper_preset,
                              "resnet-paper": resnet_paper_preset}


def allocate(flop_model: FlopModel, units: list[Unit], speedup: float,
             preset: Preset = uniform_preset, round_to: int | str = 1) -> dict[str, int]:
    """Kept channels per unit so that FLOPs(original) / FLOPs(pruned) is within 2% of ``speedup``.

    Every unit keeps min(1, α·w_u) of its channels, rounded, with one common factor α. When
    rounding makes every α miss the target (small models, or coarse ``round_to`` blocks, where
    one step is a large share of the FLOPs), the widths are those that meet it while deviating
    least from the unrounded common fraction, then moved one step at a time towards the target
    within that deviation.
    With ``round_to`` > 1 every width is a multiple of it (or the unit's full width): vectorised
    CPU kernels (oneDNN, ONNX Runtime) work on blocks of 8 or 16 channels, and a remainder costs
    nearly a whole block. ``"auto"`` rounds units of 64 channels or more to blocks of 8 and keeps
    any width in narrower ones, where a block would be a large share of the unit.
    """
    if speedup < 1:
        raise ChanpruneError(f"speed-up must be at least 1, got {speedup}; ask for e.g. 2")
    if round_to != "auto" and (not isinstance(round_to, int) or round_to < 1):
        raise ChanpruneError(f"round_to must be a positive integer or 'auto', got {round_to!r}; use 1 (no rounding), "
                             "8, 16 or auto")
    weights = {u.name: w for u in units if (w := preset(u, flop_model.graph)) is not None}
    if not weights:
        raise ChanpruneError("the allocation preset prunes no layer of this model; use --allocation uniform")
    choices = {u.name: choices_of(u.channels, round_to, u.multiple) for u in units if u.name in weights}
    check_reachable(flop_model, choices, speedup, round_to)
    widths = _common_factor(flop_model, weights, choices, speedup, round_to)
    if speedup_miss(flop_model, widths, speedup) <= TOLERANCE:
        return widths
    ideal = _ideal(flop_model, weights, choices, speedup)
    limit, widths = _least_deviation(flop_model, choices, ideal, widths, speedup, round_to)
    # the rounding residue is spread over the units it changes least
    return walk(flop_model, _within(choices, ideal, limit), widths, speedup,
                lambda _, name, width, __: (_deviation(width, ideal[name]),))


def check_reachable(flop_model: FlopModel, choices: dict[str, list[int]], speedup: float,
                    round_to: int | str) -> None:
    """Refuse a speed-up that even every unit at its narrowest choice cannot reach."""
    smallest = flop_model.flops({name: widths[0] for name, widths in choices.items()})
    if smallest > flop_model.total / speedup * (1 + TOLERANCE):
        most = flop_model.total / smallest
        rounding = f" with --round-to {round_to}" if round_to != 1 else ""
        raise UnreachableSpeedup(
            f"speed-up {speedup:g}x is out of reach: the most this model can reach is {most:.2f}x{rounding} "
            f"(every prunable layer at its narrowest); ask for at most {most:.2f}x"
            f"{', lower --round-to' if round_to != 1 else ''} or let more layers be pruned (fewer --exclude)")


AUTO_BLOCK, AUTO_FROM = 8, 64  # round_to="auto": blocks of 8 channels in units of at least 64


def block_size(channels: int, round_to: int | str) -> int:
    """Channels per block of a unit with ``channels``: ``round_to``, or for "auto" 8 where the unit
    has at least 64 channels (a vectorised kernel's block is then a small share of it) and 1 below."""
    if round_to == "auto":
        return AUTO_BLOCK if channels >= AUTO_FROM else 1
    return round_to


def rounded(width: float, channels: int, round_to: int | str) -> int:
    """``width`` rounded to a multiple of the unit's block in [block, channels]; a unit narrower
    than its block, or rounded up to its full width, keeps all its channels."""
    block = block_size(channels, round_to)
    if channels <= block:
        return channels
    return max(block, min(channels, block * round(width / block)))


def choices_of(channels: int, round_to: int | str, multiple: int = 1) -> list[int]:
    """The widths a unit may keep, narrowest first: multiples of its block (of ``multiple`` too:
    the groups of a grouped conv reading it), or all channels."""
    block = math.lcm(block_size(channels, round_to), multiple)
    return sorted({*range(block, channels + 1, block), channels})


def speedup_miss(flop_model: FlopModel, widths: dict[str, float], speedup: float) -> float:
    """Relative miss of the speed-up ``widths`` give: |achieved / speedup - 1|."""
    return abs(flop_model.total / flop_model.flops(widths) / speedup - 1)


def _bisect(flops_at: Callable[[float], float], target: float, hi: float) -> tuple[float, float]:
    """Bracket [lo, hi] of the common factor at which ``flops_at`` (growing with it) crosses ``target``."""
    lo = 0.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if flops_at(mid) > target:
            hi = mid
        else:
            lo = mid
    return lo, hi


def _common_factor(flop_model: FlopModel, weights: dict[str, float], choices: dict[str, list[int]],
                   speedup: float, round_to: int | str) -> dict[str, int]:
    """Rounded widths min(1, α·w_u)·channels with the one α that comes closest to the target."""
    def widths_at(alpha: float) -> dict[str, int]:
        # the narrowest choice is the unit's block (or its full width when that is narrower)
        return {name: rounded(min(1.0, alpha * w) * choices[name][-1], choices[name][-1], choices[name][0])
                for name, w in weights.items()}

    target = flop_model.total / speedup
    bracket = _bisect(lambda a: flop_model.flops(widths_at(a)), target, 1.0 / min(weights.values()))
    return min(map(widths_at, bracket), key=lambda w: abs(flop_model.flops(w) - target))


def _ideal(flop_model: FlopModel, weights: dict[str, float], choices: dict[str, list[int]],
           speedup: float) -> dict[str, float]:
    """Unrounded widths min(1, α·w_u)·channels, each held within the widths its unit can keep,
    with the α that meets the target exactly: what the rounded widths should stay close to."""
    def widths_at(alpha: float) -> dict[str, float]:
        return {name: min(max(min(1.0, alpha * w) * choices[name][-1], choices[name][0]), choices[name][-1])
                for name, w in weights.items()}

    lo, hi = _bisect(lambda a: flop_model.flops(widths_at(a)), flop_model.total / speedup, 1.0 / min(weights.values()))
    return widths_at(0.5 * (lo + hi))


def _deviation(width: float, ideal: float) -> float:
    """Relative deviation |ln(width / ideal)|: keeping 1 of an ideal 6 channels is a far larger
    change than keeping 60 of an ideal 65."""
    return abs(math.log(width / ideal))


def _within(choices: dict[str, list[int]], ideal: dict[str, float], limit: float) -> dict[str, list[int]]:
    """Each unit's widths that deviate at most ``limit`` from its ideal, the closest first."""
    return {name: sorted((w for w in widths if _deviation(w, ideal[name]) <= limit),
                         key=lambda w: _deviation(w, ideal[name]))
            for name, widths in choices.items()}


def _least_deviation(flop_model: FlopModel, choices: dict[str, list[int]], ideal: dict[str, float],
                     rounded_widths: dict[str, int], speedup: float,
                     round_to: int | str) -> tuple[float, dict[str, int]]:
    """The smallest deviation limit, no smaller than that of ``rounded_widths`` (the common factor's,
    which rounding already costs), at which some widths meet the target, and such widths
    (bisection over the deviations that occur); a refusal naming the closest reachable speed-up
    when no choice of widths meets it."""
    floor = max(_deviation(w, ideal[name]) for name, w in rounded_widths.items())
    limits = sorted({d for name, widths in choices.items() for w in widths
                     if (d := _deviation(w, ideal[name])) >= floor} | {floor})
    best = _nearest(flop_model, _within(choices, ideal, limits[-1]), speedup, TOLERANCE)
    if not best:
        closest = _nearest(flop_model, _within(choices, ideal, limits[-1]), speedup)
        raise ChanpruneError(f"cannot meet speed-up {speedup:g}x within 2% with these layers "
                             f"(closest {flop_model.total / flop_model.flops(closest):.3f}x); adjust --speedup, "
                             f"--exclude{' or lower --round-to' if round_to != 1 else ''}")
    lo, hi = 0, len(limits) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        found = _nearest(flop_model, _within(choices, ideal, limits[mid]), speedup, TOLERANCE)
        if found:
            best, hi = found, mid
        else:
            lo = mid + 1
    return limits[hi], best


def walk(flop_model: FlopModel, boxes: dict[str, list[int]], widths: dict[str, int], speedup: float,
         cost: Callable[[dict[str, int], str, int, float], tuple], until: float = 0.0) -> dict[str, int]:
    """From ``widths``, move one unit by one step of its box at a time, each time the move that
    brings the speed-up closer with the least ``cost(current widths, unit, new width, miss after
    the move)``, until the miss is at most ``until`` or no move brings it closer."""
    widths = dict(widths)
    error = speedup_miss(flop_model, widths, speedup)
    while error > until:
        closer = [(cost(widths, name, width, moved), moved, name, width) for name, width in _steps(boxes, widths)
                  if (moved := speedup_miss(flop_model, {**widths, name: width}, speedup)) < error]
        if not closer:
            break
        _, error, name, width = min(closer)
        widths[name] = width
    return widths


def _steps(boxes: dict[str, list[int]], widths: dict[str, int]) -> list[tuple[str, int]]:
    """(unit, width) one step narrower or wider than ``widths`` inside each unit's box."""
    steps = []
    for name, box in boxes.items():
        ordered = sorted(box)
        i = ordered.index(widths[name])
        steps += [(name, ordered[j]) for j in (i - 1, i + 1) if 0 <= j < len(ordered)]
    return steps


def _nearest(flop_model: FlopModel, boxes: dict[str, list[int]], speedup: float,
             cutoff: float = math.inf) -> dict[str, int]:
    """The widths from ``boxes`` (each unit's allowed widths, preferred first) whose speed-up is
    nearest ``speedup``, or {} when none is within ``cutoff`` of it (relative error); the first one
    found within the tolerance ends the search, so without one the answer is exact.

    Depth-first branch and bound, the units with the coarsest steps first. FLOPs grow with every
    width, so the completions of a partial choice lie between those with the remaining units at
    their narrowest and at their widest; a branch whose range misses ``cutoff`` or cannot beat the
    best so far is cut.
    """
    narrowest = {name: min(widths) for name, widths in boxes.items()}
    widest = {name: max(widths) for name, widths in boxes.items()}
    full = flop_model.flops(widest)
    step = {name: (full - flop_model.flops({**widest, name: narrowest[name]})) / max(1, len(boxes[name]) - 1)
            for name in boxes}
    order = sorted(boxes, key=step.__getitem__, reverse=True)
    target = flop_model.total / speedup
    best: tuple[dict[str, int], float] = ({}, math.inf)

    def visit(depth: int, chosen: dict[str, int]) -> None:
        nonlocal best
        name = order[depth]
        for width in boxes[name]:
            chosen[name] = width
            low, high = flop_model.flops({**narrowest, **chosen}), flop_model.flops({**widest, **chosen})
            bound = abs(target / min(max(target, low), high) - 1)
            if bound > cutoff or bound >= best[1]:
                continue
            if depth + 1 == len(order):
                best = (dict(chosen), bound)
            else:
                visit(depth + 1, chosen)
            if best[1] <= TOLERANCE:
                return
        del chosen[name]

    visit(0, {})
    return best[0]


def check_widths(widths: dict[str, int], graph: ChannelGraph, units: list[Unit]) -> dict[str, int]:
    """Validate explicit widths keyed by reader name (the layer whose input channels are kept) or
    by ``group:NAME`` (a group named by its first writer: one part of a concatenation) or by
    ``write:NAME`` (the trunk channels a fine-grained trunk writer keeps); returns them keyed by
    unit name."""
    unit_of = {f"group:{u.name}": u for u in units if u.reader is None and u.writer is None}
    unit_of.update({r.name: u for u in units if u.writer is None for r in u.readers
                    if len(graph.layouts[r.name]) == 1})
    unit_of.update({u.name: u for u in units if u.writer is not None})
    group_of = {r.name: g for g in graph.groups for r in g.readers}
    resolved: dict[str, int] = {}
    for key, value in widths.items():
        if key not in unit_of:
            if key in group_of:
                g = group_of[key]
                raise ChanpruneError(f"input channels of {key!r} cannot be pruned "
                                     f"({'; '.join(g.blocked_by) or 'excluded or kept by --trunk keep'}); "
                                     "remove it from the widths file")
            raise ChanpruneError(f"widths name unknown layer {key!r}{_did_you_mean(key, list(unit_of))}; name a "
                                 "layer whose input channels can be pruned, one of: "
                                 f"{', '.join(dict.fromkeys(u.readers[0].name for u in units))}")
        unit = unit_of[key]
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= unit.channels:
            raise ChanpruneError(f"width of {key!r} must be a whole number of input channels, got {value!r}; give "
                                 f"the number to keep, between 1 and {unit.channels} ({unit.channels} keeps all)")
        if value % unit.multiple:
            raise ChanpruneError(f"width of {key!r} must be a multiple of {unit.multiple} (a grouped conv reads it "
                                 f"in {unit.multiple} groups, each keeping as many channels), got {value}")
        if resolved.get(unit.name, value) != value:
            raise ChanpruneError(f"readers of {unit.name!r} share their input channels; give them one width")
        resolved[unit.name] = value
    return resolved


def _did_you_mean(key: object, names: list[str]) -> str:
    """' (did you mean ...?)' with the names closest to ``key``, or nothing."""
    close = difflib.get_close_matches(str(key), names, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(n) for n in close)}?)" if close else ""
