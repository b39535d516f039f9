"""The record of one surgery step, as a pruning plan stores and replays it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PlanOp:
    """One recorded edit: ``op`` (one of :data:`chanprune.surgery.OPS`) on ``layer`` with channel
    indices ``keep`` (and, for a Linear after flatten, the ``channel_size`` features each channel
    owns; for ``scatter_outputs``, the width the outputs are scattered into). ``cut_channels``
    names a traced node instead of a layer, and ``keep`` is (channel axis, cut positions...). The
    steps :func:`chanprune.graph.build_graph` takes on the trace before reading its channels come
    first in a plan: ``conv_module`` makes the functional conv at a traced node a conv module of
    that name (:mod:`chanprune.functional_convs`); ``fold_conv`` replaces a layer by the plain
    conv its forward computes (:mod:`chanprune.folding`); ``slice_shuffle`` replaces the shuffle
    ending at a traced node by slices (``keep``: start, stop of each); ``permute_inputs`` /
    ``permute_channels`` reorder a layer's input columns / channels so that position p holds
    ``keep[p]`` (:mod:`chanprune.shuffle`)."""

    op: str
    layer: str
    keep: tuple[int, ...] = ()
    channel_size: int = 1

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.op, "layer": self.layer}
        if self.op != "add_bias":
            out["keep"] = list(self.keep)
        if self.op in ("keep_inputs", "scatter_outputs"):
            out["channel_size"] = self.channel_size
        return out
