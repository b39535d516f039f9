"""Error curves of every pruning unit on the original model, for a data-driven allocation.

Each unit's readers see inputs and targets of the unpruned model (one extra pass through it);
greedy backward elimination on their moments gives the least-squares error at every width in
one run, relative to each reader's target energy and summed over readers. A fine-grained trunk
writer's curve is the energy of the outputs it would stop writing, weakest first.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..allocation import Unit
from ..global_allocation import ErrorCurve
from ..solvers import elimination_path
from .calibration import Calibration
from .run import PruneRun, channel_features, reader_problem


SENSITIVITY_NOISE = 0.1  # relative rms of the noise that measures a unit's output sensitivity


def error_curves(calibration: Calibration, run: PruneRun, units: list[Unit], narrowest: dict[str, int],
                 weight: str = "energy", progress: bool = False) -> dict[str, ErrorCurve]:
    """Curve of each unit from its full width down to ``narrowest[unit]`` channels.

    ``weight`` makes units comparable: "energy" adds readers' errors relative to their target
    energy; "sensitivity" also multiplies a unit's curve by how much the model's output moves
    per unit of relative error at its readers (measured with noise, see
    :meth:`Calibration.unpruned`). Readers that differ in features per channel (a 3x3 conv and a
    1x1 projection on one trunk) are eliminated separately and their curves added, which
    slightly favours such units.
    """
    curves: dict[str, ErrorCurve] = {}
    noise = SENSITIVITY_NOISE if weight == "sensitivity" else None
    found = calibration.unpruned([u.readers for u in units], noise)
    for unit, stats in tqdm(zip(units, found), total=len(units), desc="error curves", disable=not progress,
                            leave=False):
        if unit.writer is not None:
            curve = writer_curve(stats.moments[unit.writer.name][0].centred_yy(), narrowest[unit.name])
            curves[unit.name] = curve.scaled(stats.sensitivity) if stats.sensitivity is not None else curve
            continue
        if any(r.groups > 1 for r in unit.readers):
            curve = conv_group_curve(run, unit, stats.moments, narrowest[unit.name])
            curves[unit.name] = curve.scaled(stats.sensitivity) if stats.sensitivity is not None else curve
            continue
        problems = [run.restricted(reader_problem(run.work, r, *(m.to("cpu") for m in stats.moments[r.name])),
                                   unit.group) for r in unit.readers]
        curve = None
        for k in dict.fromkeys(rp.k for rp in problems):
            pairs = [(rp.fit, 1.0 / max(rp.fit.centred()[2], 1e-300)) for rp in problems if rp.k == k]
            counts, errors = elimination_path(pairs, k, narrowest[unit.name])
            part = ErrorCurve(tuple(reversed(counts)), tuple(reversed(errors)))
            curve = part if curve is None else curve + part
        curves[unit.name] = curve.scaled(stats.sensitivity) if stats.sensitivity is not None else curve
    return curves


def conv_group_curve(run: PruneRun, unit: Unit, moments: dict, narrowest: int) -> ErrorCurve:
    """Curve of a unit read by grouped convs: each conv group's channels are eliminated on its own
    moments (it keeps as many as every other group), and the errors of the groups at the same
    count are added, relative to each reader's whole target energy."""
    blocks = unit.readers[0].groups
    curve = None
    for r in unit.readers:
        parts = moments[r.name][0].to("cpu").parts
        energy = max(sum(p.centred()[2] for p in parts), 1e-300)
        k = channel_features(run.work, r)
        for part in parts:
            counts, errors = elimination_path([(part, 1.0 / energy)], k, max(1, narrowest // blocks))
            piece = ErrorCurve(tuple(c * blocks for c in reversed(counts)), tuple(reversed(errors)))
            curve = piece if curve is None else curve + piece
    assert curve is not None
    return curve


def writer_curve(energy: torch.Tensor, narrowest: int) -> ErrorCurve:
    """Relative error of a trunk writer that keeps its ``w`` strongest outputs (``energy``: each
    output's centred ||Y_j||²), for every ``w`` from ``narrowest`` to all of them: on the
    unpruned model it reproduces what it keeps, so the error is the energy it drops."""
    ordered = energy.sort(descending=True).values
    dropped = ordered.flip(0).cumsum(0).flip(0)  # dropped[w] = energy of outputs w, w+1, ... (0-based)
    total = max(float(ordered.sum()), 1e-300)
    widths = tuple(range(narrowest, len(energy) + 1))
    return ErrorCurve(widths, tuple(float(dropped[w]) / total if w < len(energy) else 0.0 for w in widths))
