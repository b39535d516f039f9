"""Speed-up target -> number of kept channels per group.

FLOPs of a dense conv or linear are bilinear in its kept input and output fractions (a depthwise
conv's are linear in its channels), so the model's FLOPs for any widths follow from one
flop-counter pass. A preset gives each pruning unit a relative weight w_u; kept fraction =
min(1, α·w_u), and α is solved by bisection so that the whole model's FLOPs ratio meets the
target. Units with no weight stay whole.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Callable

from .errors import ChanpruneError
from .graph import ChannelGraph, ChannelGroup, Reader

TOLERANCE = 0.02


@dataclass
class Unit:
    """One pruning decision: how many of a group's channels to keep.

    A plain unit prunes the group (writers, followers and readers all lose the channels). A
    *select* unit (``reader`` set) is the paper's feature-map sampling: one reader of a group
    that keeps every channel reads a subset of it through a channel select.
    """

    group: ChannelGroup
    reader: Reader | None = None

    @property
    def name(self) -> str:
        return f"select:{self.reader.name}" if self.reader else self.group.name

    @property
    def channels(self) -> int:
        return self.group.channels

    @property
    def readers(self) -> list[Reader]:
        return [self.reader] if self.reader else self.group.readers

    @property
    def kind(self) -> str:
        return "select" if self.reader else "trunk" if self.group.residual else "group"


@dataclass
class FlopModel:
    """FLOPs as a function of kept widths: per-layer FLOPs scaled by kept in/out fractions."""

    graph: ChannelGraph
    total: int
    per_layer: dict[str, int]

    def flops(self, widths: dict[str, int]) -> float:
        """Estimated FLOPs when unit u keeps ``widths[u]`` channels (others stay whole)."""
        frac = {g.name: widths.get(g.name, g.channels) / g.channels for g in self.graph.groups}
        channels = {g.name: g.channels for g in self.graph.groups}
        frac_out = {w: frac[g.name] for g in self.graph.groups for w in g.writers}
        scaled = 0.0
        for name, f in self.per_layer.items():
            layout = self.graph.layouts.get(name)
            frac_in = 1.0
            if f"select:{name}" in widths:
                frac_in = widths[f"select:{name}"] / channels[layout[0]]
            elif layout:
                frac_in = sum(frac[g] * channels[g] for g in layout) / sum(channels[g] for g in layout)
            scaled += f * frac_in * (1.0 if name in self.graph.depthwise else frac_out.get(name, 1.0))
        return self.total - sum(self.per_layer.values()) + scaled


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
    sensitive; shortcut projections keep their inputs. Layers are found by torchvision-style
    names (``layerS.B.convK``); other layers stay whole.
    """
    blocks: dict[int, int] = {}
    for name in graph.layer_kinds:
        if m := _RESNET_LAYER.match(name):
            blocks[int(m.group(1))] = max(blocks.get(int(m.group(1)), 0), int(m.group(2)) + 1)
    match = _RESNET_LAYER.match(unit.readers[0].name)
    if match is None or not blocks:
        return None
    stage, block, layer = int(match.group(1)), int(match.group(2)), match.group(3)
    if unit.kind == "trunk":
        return 0.7
    if layer.startswith("downsample") or layer not in _BRANCH_WEIGHT:
        return None
    bottleneck = any(n.endswith(f"layer{stage}.{block}.conv3") for n in graph.layer_kinds)
    sensitive = stage == max(blocks) or (block == 0 and stage > min(blocks)) or \
        (block == blocks[stage] - 1 and stage < max(blocks))
    return (0.7 if sensitive else 0.3) * (_BRANCH_WEIGHT[layer] if bottleneck else 1.0)


PRESETS: dict[str, Preset] = {"uniform": uniform_preset, "vgg-paper": vgg_paper_preset,
                              "resnet-paper": resnet_paper_preset}


def rounded(width: float, channels: int, round_to: int) -> int:
    """``width`` rounded to a multiple of ``round_to`` in [round_to, channels]; a unit narrower
    than ``round_to``, or rounded up to its full width, keeps all its channels."""
    if channels <= round_to:
        return channels
    return max(round_to, min(channels, round_to * round(width / round_to)))


def allocate(flop_model: FlopModel, units: list[Unit], speedup: float,
             preset: Preset = uniform_preset, round_to: int = 1) -> dict[str, int]:
    """Kept channels per group so that FLOPs(original) / FLOPs(pruned) is within 2% of ``speedup``.

    With ``round_to`` > 1 every width is a multiple of it (or the unit's full width): vectorised
    CPU kernels (oneDNN, ONNX Runtime) work on blocks of 8 or 16 channels, and a remainder costs
    nearly a whole block.
    """
    if speedup < 1:
        raise ChanpruneError(f"speed-up must be at least 1, got {speedup}; ask for e.g. 2")
    if not isinstance(round_to, int) or round_to < 1:
        raise ChanpruneError(f"round_to must be a positive integer, got {round_to!r}; use 1 (no rounding), 8 or 16")
    weights = {u.name: w for u in units if (w := preset(u, flop_model.graph)) is not None}
    if not weights:
        raise ChanpruneError("the allocation preset prunes no layer of this model; use --allocation uniform")
    target = flop_model.total / speedup
    by_name = {u.name: u for u in units}

    def widths_at(alpha: float) -> dict[str, int]:
        return {name: rounded(min(1.0, alpha * w) * by_name[name].channels, by_name[name].channels, round_to)
                for name, w in weights.items()}

    lo, hi = 0.0, 1.0 / min(weights.values())
    smallest = flop_model.flops(widths_at(0.0))
    if smallest > target * (1 + TOLERANCE):
        most = flop_model.total / smallest
        rounding = f" with --round-to {round_to}" if round_to > 1 else ""
        raise ChanpruneError(
            f"speed-up {speedup:g}x is out of reach: the most this model can reach is {most:.2f}x{rounding} "
            f"(every prunable layer at its narrowest); ask for at most {most:.2f}x"
            f"{', lower --round-to' if round_to > 1 else ''} or let more layers be pruned (fewer --exclude)")
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if flop_model.flops(widths_at(mid)) > target:
            hi = mid
        else:
            lo = mid
    best = min((widths_at(lo), widths_at(hi)), key=lambda w: abs(flop_model.flops(w) - target))
    if abs(flop_model.total / flop_model.flops(best) / speedup - 1) > TOLERANCE:
        best = _refine(flop_model, best, {n: u.channels for n, u in by_name.items()}, target, round_to)
    achieved = flop_model.total / flop_model.flops(best)
    if abs(achieved / speedup - 1) > TOLERANCE:
        raise ChanpruneError(f"cannot meet speed-up {speedup:g}x within 2% with these layers "
                             f"(closest {achieved:.3f}x); adjust --speedup, --exclude"
                             f"{' or lower --round-to' if round_to > 1 else ''}")
    return best


def _refine(flop_model: FlopModel, widths: dict[str, int], channels: dict[str, int], target: float,
            round_to: int = 1) -> dict[str, int]:
    """Step single units by one channel (or one block of ``round_to``) towards the target while
    that helps (narrow layers round coarsely, so a common factor alone can miss it)."""
    widths = dict(widths)
    gap = abs(flop_model.flops(widths) - target)
    for _ in range(4 * len(widths) + 16):
        step = -1 if flop_model.flops(widths) > target else 1
        trials = [{**widths, n: moved} for n, w in widths.items()
                  if (moved := rounded(w + step * round_to, channels[n], round_to)) != w]
        if not trials:
            break
        trial = min(trials, key=lambda w: abs(flop_model.flops(w) - target))
        if abs(flop_model.flops(trial) - target) >= gap:
            break
        widths, gap = trial, abs(flop_model.flops(trial) - target)
    return widths


def check_widths(widths: dict[str, int], graph: ChannelGraph, units: list[Unit]) -> dict[str, int]:
    """Validate explicit widths keyed by reader name (the layer whose input channels are kept) or
    by ``group:NAME`` (a group named by its first writer: one part of a concatenation); returns
    them keyed by unit name."""
    unit_of = {f"group:{u.name}": u for u in units if u.reader is None}
    unit_of.update({r.name: u for u in units for r in u.readers if len(graph.layouts[r.name]) == 1})
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
                                 f"{', '.join(u.readers[0].name for u in units)}")
        unit = unit_of[key]
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= unit.channels:
            raise ChanpruneError(f"width of {key!r} must be a whole number of input channels, got {value!r}; give "
                                 f"the number to keep, between 1 and {unit.channels} ({unit.channels} keeps all)")
        if resolved.get(unit.name, value) != value:
            raise ChanpruneError(f"readers of {unit.name!r} share their input channels; give them one width")
        resolved[unit.name] = value
    return resolved


def _did_you_mean(key: object, names: list[str]) -> str:
    """' (did you mean ...?)' with the names closest to ``key``, or nothing."""
    close = difflib.get_close_matches(str(key), names, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(n) for n in close)}?)" if close else ""
