"""The width allocations a run can use, by name: what ``PruneConfig.allocation`` accepts and the
command line offers. A preset decides from FLOPs alone; ``global`` asks for the error curves of
the original model, which are measured only when it does."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .allocation import PRESETS, FlopModel, Preset, Unit, allocate
from .global_allocation import ErrorCurve, allocate_global

Curves = Callable[[dict[str, int]], dict[str, ErrorCurve]]  # narrowest width of each unit -> curves


@dataclass(frozen=True)
class Allocation:
    """One way to turn a speed-up into kept widths; ``decide(flop_model, units, speedup, round_to,
    curves)`` calls ``curves(narrowest widths)`` only if it needs statistics."""

    summary: str
    decide: Callable[[FlopModel, list[Unit], float, int | str, Curves], dict[str, int]]


def _from_preset(preset: Preset) -> Callable[[FlopModel, list[Unit], float, int | str, Curves], dict[str, int]]:
    def decide(flop_model: FlopModel, units: list[Unit], speedup: float, round_to: int | str,
               curves: Curves) -> dict[str, int]:
        return allocate(flop_model, units, speedup, preset, round_to)
    return decide


ALLOCATIONS: dict[str, Allocation] = {
    "uniform": Allocation("every unit keeps the same fraction", _from_preset(PRESETS["uniform"])),
    "vgg-paper": Allocation("He et al.'s VGG-16 widths (conv4_x 1.5x the others, conv5_x whole)",
                            _from_preset(PRESETS["vgg-paper"])),
    "resnet-paper": Allocation("He et al.'s ResNet widths (sensitive blocks 70%, others 30%)",
                               _from_preset(PRESETS["resnet-paper"])),
    "global": Allocation("widths from data: least reconstruction error per FLOP saved (PruneNet's idea)",
                         allocate_global),
}
