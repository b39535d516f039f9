"""Widths from data (PruneNet's idea): each unit's error curve decides how much of it to keep.

Every pruning unit gets a curve of reconstruction error against kept channels, measured on the
original model (greedy backward elimination gives the whole curve in one pass, see
:func:`chanprune.solvers.elimination_path`). Errors are relative to each reader's target energy
(||Y||²), so a unit whose outputs are large does not outweigh one whose outputs are small. The
widths then come from a greedy descent on the marginal cost: starting from every unit whole,
the unit whose next narrower width adds the least error per FLOP saved gives up that step,
until the FLOPs target is met. Steps are whole ``round_to`` blocks, and a step that would
overshoot the 2% tolerance is not taken.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable
from dataclasses import dataclass

from .allocation import TOLERANCE, FlopModel, Unit, check_reachable, choices_of, walk
from .errors import ChanpruneError


@dataclass(frozen=True)
class ErrorCurve:
    """Relative squared reconstruction error of a unit's readers (summed over readers) at some
    kept widths, ascending; other widths are interpolated linearly."""

    widths: tuple[int, ...]
    errors: tuple[float, ...]

    def at(self, width: int) -> float:
        """Error at ``width`` (clamped to the measured range)."""
        i = bisect.bisect_left(self.widths, width)
        if i < len(self.widths) and self.widths[i] == width:
            return self.errors[i]
        if i == 0:
            return self.errors[0]
        if i == len(self.widths):
            return self.errors[-1]
        (w0, w1), (e0, e1) = self.widths[i - 1:i + 1], self.errors[i - 1:i + 1]
        return e0 + (e1 - e0) * (width - w0) / (w1 - w0)

    def scaled(self, factor: float) -> "ErrorCurve":
        return ErrorCurve(self.widths, tuple(factor * e for e in self.errors))

    def __add__(self, other: "ErrorCurve") -> "ErrorCurve":
        widths = tuple(sorted({*self.widths, *other.widths}))
        return ErrorCurve(widths, tuple(self.at(w) + other.at(w) for w in widths))


def allocate_global(flop_model: FlopModel, units: list[Unit], speedup: float, round_to: int | str,
                    measure: Callable[[dict[str, int]], dict[str, ErrorCurve]]) -> dict[str, int]:
    """Kept channels per unit minimising the summed relative error of the curves
    ``measure(narrowest width of each unit)`` returns (called once the target is known to be
    reachable) at ``speedup`` (within 2%), by greedy descent on error added per FLOP saved."""
    choices = {u.name: choices_of(u.channels, round_to, u.multiple) for u in units}
    check_reachable(flop_model, choices, speedup, round_to)
    curves = measure({name: widths[0] for name, widths in choices.items()})
    step = {name: len(c) - 1 for name, c in choices.items()}  # index of each unit's current width
    widths = {name: c[-1] for name, c in choices.items()}
    touched = {name: flop_model.touched(name, c[0]) for name, c in choices.items()}
    sharing = {name: {other for other, layers in touched.items() if set(layers) & set(touched[name])}
               for name in choices}
    target, floor = flop_model.total / speedup, flop_model.total / (speedup * (1 + TOLERANCE))
    flops = flop_model.flops(widths)

    def candidate(name: str) -> tuple[float, float] | None:
        """(error added per FLOP saved, FLOPs saved) by ``name``'s next narrower width."""
        if step[name] == 0:
            return None
        narrower = choices[name][step[name] - 1]
        before = sum(flop_model.layer_flops(widths, touched[name]).values())
        after = sum(flop_model.layer_flops({**widths, name: narrower}, touched[name]).values())
        saved = before - after
        if saved <= 0:
            return None
        added = max(curves[name].at(narrower) - curves[name].at(widths[name]), 0.0)
        return added / saved, saved

    version = dict.fromkeys(choices, 0)
    heap: list[tuple[float, int, str]] = []

    def push(name: str) -> None:
        version[name] += 1
        found = candidate(name)
        if found is not None:
            heapq.heappush(heap, (found[0], version[name], name))

    for name in choices:
        push(name)
    while flops > target and heap:
        _, seen, name = heapq.heappop(heap)
        if seen != version[name]:
            continue
        _, saved = candidate(name)
        if flops - saved < floor:  # this step overshoots the tolerance: never take it
            continue
        step[name] -= 1
        widths[name] = choices[name][step[name]]
        flops -= saved
        for other in sharing[name]:
            push(other)
    widths = _land(flop_model, choices, curves, widths, speedup)
    achieved = flop_model.total / flop_model.flops(widths)
    if abs(achieved / speedup - 1) > TOLERANCE:
        raise ChanpruneError(f"cannot meet speed-up {speedup:g}x within 2% with these layers (global allocation "
                             f"reached {achieved:.3f}x); adjust --speedup, --exclude"
                             f"{' or lower --round-to' if round_to != 1 else ''}")
    return widths


def _land(flop_model: FlopModel, choices: dict[str, list[int]], curves: dict[str, ErrorCurve],
          widths: dict[str, int], speedup: float) -> dict[str, int]:
    """Where the descent stopped outside the 2% tolerance (every remaining step too coarse), move
    one unit one step at a time, each time the move that brings the speed-up closer (one that
    lands within the tolerance first) at the least added error, until it is within the
    tolerance or no move brings it closer."""
    def cost(current: dict[str, int], name: str, width: int, miss: float) -> tuple[bool, float]:
        return miss > TOLERANCE, curves[name].at(width) - curves[name].at(current[name])

    return walk(flop_model, choices, widths, speedup, cost, until=TOLERANCE)
