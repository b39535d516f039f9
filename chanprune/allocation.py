"""Speed-up target -> number of kept channels per group.

FLOPs of a dense conv or linear are bilinear in its kept input and output fractions, so the
model's FLOPs for any widths follow from one flop-counter pass. A preset gives each group a
relative weight w_g; kept fraction = min(1, α·w_g), and α is solved by bisection so that the
whole model's FLOPs ratio meets the target. Groups with no weight stay whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from .errors import ChanpruneError
from .graph import ChannelGraph, ChannelGroup

TOLERANCE = 0.02


@dataclass
class FlopModel:
    """FLOPs as a function of kept widths: per-layer FLOPs scaled by kept in/out fractions."""

    graph: ChannelGraph
    total: int
    per_layer: dict[str, int]

    def flops(self, widths: dict[str, int]) -> float:
        """Estimated FLOPs when group g keeps ``widths[g]`` channels (others stay whole)."""
        frac_out: dict[str, float] = {}
        frac_in: dict[str, float] = {}
        for g in self.graph.groups:
            frac = widths.get(g.name, g.channels) / g.channels
            frac_out[g.writer] = frac
            for r in g.readers:
                frac_in[r.name] = frac
        layered = sum(self.per_layer.values())
        scaled = sum(f * frac_in.get(name, 1.0) * frac_out.get(name, 1.0) for name, f in self.per_layer.items())
        return self.total - layered + scaled


Preset = Callable[[ChannelGroup], "float | None"]


def uniform_preset(group: ChannelGroup) -> float:
    """Every prunable group keeps the same fraction."""
    return 1.0


_VGG_LAYER = re.compile(r"conv(\d)_(\d)")


def vgg_paper_preset(group: ChannelGroup) -> float | None:
    """He et al.'s VGG-16 widths: kept inputs of conv1_x-conv3_x : conv4_x = 1 : 1.5, conv5_x whole.

    A group is named by the layer that reads it (the layer whose input channels are pruned).
    """
    match = _VGG_LAYER.search(group.readers[0].name)
    if match is None:
        return None
    stage = int(match.group(1))
    return 1.0 if stage <= 3 else 1.5 if stage == 4 else None


PRESETS: dict[str, Preset] = {"uniform": uniform_preset, "vgg-paper": vgg_paper_preset}


def allocate(flop_model: FlopModel, groups: list[ChannelGroup], speedup: float,
             preset: Preset = uniform_preset) -> dict[str, int]:
    """Kept channels per group so that FLOPs(original) / FLOPs(pruned) is within 2% of ``speedup``."""
    if speedup < 1:
        raise ChanpruneError(f"speed-up must be at least 1, got {speedup}")
    weights = {g.name: w for g in groups if (w := preset(g)) is not None}
    if not weights:
        raise ChanpruneError("the allocation preset prunes no layer of this model; use --allocation uniform")
    target = flop_model.total / speedup
    by_name = {g.name: g for g in groups}

    def widths_at(alpha: float) -> dict[str, int]:
        return {name: max(1, min(by_name[name].channels, round(min(1.0, alpha * w) * by_name[name].channels)))
                for name, w in weights.items()}

    lo, hi = 0.0, 1.0 / min(weights.values())
    smallest = flop_model.flops(widths_at(0.0))
    if smallest > target * (1 + TOLERANCE):
        raise ChanpruneError(
            f"speed-up {speedup:g}x is out of reach: keeping one channel in every prunable group gives "
            f"{flop_model.total / smallest:.2f}x; lower --speedup or let more layers be pruned")
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if flop_model.flops(widths_at(mid)) > target:
            hi = mid
        else:
            lo = mid
    best = min((widths_at(lo), widths_at(hi)), key=lambda w: abs(flop_model.flops(w) - target))
    achieved = flop_model.total / flop_model.flops(best)
    if abs(achieved / speedup - 1) > TOLERANCE:
        raise ChanpruneError(f"cannot meet speed-up {speedup:g}x within 2% with these layers "
                             f"(closest {achieved:.3f}x); adjust --speedup or --exclude")
    return best


def check_widths(widths: dict[str, int], graph: ChannelGraph) -> dict[str, int]:
    """Validate explicit widths keyed by reader name (the layer whose input channels are kept);
    returns them keyed by group name."""
    by_reader = {r.name: g for g in graph.groups for r in g.readers}
    resolved: dict[str, int] = {}
    for key, value in widths.items():
        if key not in by_reader:
            known = ", ".join(g.readers[0].name for g in graph.prunable())
            raise ChanpruneError(f"widths file names unknown layer {key!r}; name a layer whose input channels "
                                 f"can be pruned, one of: {known}")
        g = by_reader[key]
        if not g.prunable:
            raise ChanpruneError(f"input channels of {key!r} cannot be pruned ({'; '.join(g.blocked_by)}); "
                                 "remove it from the widths file")
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= g.channels:
            raise ChanpruneError(f"width of {key!r} must be an integer in 1..{g.channels}, got {value!r}")
        resolved[g.name] = value
    return resolved
