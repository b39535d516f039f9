"""What a run may prune and how wide: pruning units in execution order, the memory guard on their
statistics, and the kept width of each unit from a speed-up target or explicit widths."""

from __future__ import annotations

import fnmatch
import warnings

import torch
from torch import nn

from .allocation import FlopModel, Unit, check_widths
from .allocators import ALLOCATIONS, Curves
from .config import PruneConfig
from .engine.store import available_memory
from .errors import ChanpruneError, UnreachableSpeedup
from .graph import ChannelGraph, ChannelGroup, Reader
from .stats import reader_dim


def first_in_channels(model: nn.Module) -> int | None:
    """Input channels of the first conv (the image channels the model expects)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None


def _excluded(names: list[str], exclude: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(n, p) for n in names for p in exclude)


def pruning_units(graph: ChannelGraph, cfg: PruneConfig) -> list[Unit]:
    """What this run may prune, in execution order.

    Prunable groups become units, except residual trunks under ``trunk="keep"`` or ``"fine"``.
    With feature-map sampling, each conv reading a group that stays whole (a kept trunk, or
    channels blocked by an op chanprune cannot prune through) becomes a select unit of its own
    (not one that pads in its own forward: a select would replace that forward);
    under ``trunk="fine"`` every conv reading a trunk does, and every writer that can write a
    subset of it (:func:`fine_writers`) becomes a write unit, after the unit that refits it.
    """
    units: list[Unit] = []
    for g in graph.groups:
        if not g.readers:
            continue
        excluded = _excluded(g.members, cfg.exclude)
        fine = g.residual and cfg.trunk == "fine" and g.prunable and not excluded
        whole = not g.prunable or (g.residual and cfg.trunk != "joint") or excluded
        if not whole:
            units.append(Unit(g))
        elif cfg.feature_map_sampling or fine:
            units += [Unit(g, r) for r in g.readers
                      if r.kind == "conv" and r.groups == 1 and r.channel_size == 1 and len(graph.layouts[r.name]) == 1
                      and r.pads is None and not _excluded([r.name], cfg.exclude)]
        if fine:
            units += [Unit(g, writer=w) for w in fine_writers(graph, g) if not _excluded([w.name], cfg.exclude)]
    return sorted(units, key=lambda u: (min(graph.order[r.name] for r in u.readers), u.kind == "write"))


def fine_writers(graph: ChannelGraph, trunk: ChannelGroup) -> list[Reader]:
    """Writers of a residual trunk that can compute a subset of its channels: dense convs whose
    output (after their BatchNorm, if any) goes straight into a residual add, and that do not
    read the trunk themselves. Returned as their reader entries (which know the BN and the
    shortcut); the stem and anything with an op between it and the add keep writing every channel."""
    entries = {r.name: r for g in graph.groups for r in g.readers}
    reads_trunk = {r.name for r in trunk.readers}
    return [entries[w] for w in trunk.writers
            if w in entries and entries[w].shortcut and entries[w].kind == "conv" and entries[w].pads is None
            and trunk.block_of(w) == 1
            and w not in graph.depthwise and w not in reads_trunk and w not in graph.out_layouts]


def statistics_bytes(model: nn.Module, unit: Unit) -> int:
    """Memory the moments of a unit's readers take while it is pruned (G, B and solver copies)."""
    need = 0
    for r in unit.readers:  # a grouped conv keeps one small set of moments per conv group
        dim = reader_dim(model, r) // r.groups
        n_out = model.get_submodule(r.name).weight.shape[0] // r.groups
        need += 8 * r.groups * (6 * dim * dim + 2 * dim * n_out)
    return need


def units_that_fit(model: nn.Module, units: list[Unit]) -> list[Unit]:
    """Units whose statistics fit in the free memory; the others stay whole, with a warning."""
    available = available_memory(torch.device("cpu"))
    if available is None:
        return units
    too_big = [u for u in units if statistics_bytes(model, u) > 0.8 * available]
    if too_big:
        warnings.warn(f"statistics of {', '.join(u.readers[0].name for u in too_big)} would need more than the "
                      f"{available / 2**30:.1f} GiB free, so their input channels stay whole", stacklevel=3)
    return [u for u in units if u not in too_big]


def resolve_widths(cfg: PruneConfig, graph: ChannelGraph, units: list[Unit], flop_model: FlopModel,
                   curves: Curves) -> dict[str, int]:
    """Kept channels per unit from explicit widths or from the speed-up target and allocation
    (``curves(narrowest widths)`` measures the original model's error curves down to those widths,
    for an allocation that asks)."""
    if cfg.widths is not None:
        widths = check_widths(cfg.widths, graph, units)
        if cfg.speedup is not None:
            got = flop_model.total / flop_model.flops(widths)
            if abs(got / cfg.speedup - 1) > 0.02:
                raise ChanpruneError(f"the widths file gives a {got:.2f}x speed-up, not {cfg.speedup:g}x; "
                                     "drop --speedup or change the widths")
        return widths
    if not units:
        raise ChanpruneError("no layer of this model can be pruned (see the warnings above)")
    decide = ALLOCATIONS[cfg.allocation].decide
    try:
        return decide(flop_model, units, cfg.speedup, cfg.round_to, curves)
    except UnreachableSpeedup:
        if cfg.round_to != "auto":  # the user asked for these blocks: say what they cost
            raise
    # "auto" is chanprune's own choice of blocks: where they cannot reach the target, do without
    warnings.warn(f"--round-to auto cannot reach {cfg.speedup:g}x on this model, so its widths are not rounded",
                  stacklevel=3)
    return decide(flop_model, units, cfg.speedup, 1, curves)
