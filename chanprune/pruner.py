"""``prune()``: the one verb. It validates the request, builds the channel graph, decides what to
prune and how wide, carries the calibration data through the original and the working model
unit by unit (``chanprune.engine``), and returns the user's own model class with the same surgery
replayed on it, plus a report. The caller's model is left exactly as it was.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import replace
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._version import __version__
from .allocation import FlopModel, Unit
from .config import PruneConfig
from .data import iterate_batches, validate_images
from .distributed import shard
from .engine.calibration import Calibration, Sampling
from .engine.curves import error_curves
from .engine.resume import ResumeDir, model_fingerprint
from .engine.run import PruneRun, prune_units
from .engine.store import BatchStore, default_budget
from .errors import ChanpruneError, SparseSamplesWarning
from .evaluate import evaluating, model_device
from .factorize import channel_speedup, plan_ranks
from .flops import count_flops, count_params, flop_breakdown
from .global_allocation import ErrorCurve
from .graph import Reader, build_graph
from .io.provenance import attach, provenance_or_class
from .report import PruneReport, layer_reports, unit_reports
from .surgery import Plan
from .units import first_in_channels, pruning_units, resolve_widths, units_that_fit

def prune(model: nn.Module, calib_data: Any, speedup: float | None = 4.0, method: str | None = None, *,
          progress: bool = True, device: str | torch.device | None = None, memory_budget: int | None = None,
          checkpoint_dir: str | Path | None = None, **options: Any) -> tuple[nn.Module, PruneReport]:
    """Prune ``model`` to ``speedup`` x fewer FLOPs; returns (pruned copy, report).

    ``calib_data`` is a tensor (N, C, H, W) or an iterable of batches (a DataLoader yielding
    images or (images, ...) tuples); it is read once, batch by batch. Under torch.distributed
    (e.g. ``torchrun``) each rank keeps every world-size-th batch and the statistics are summed
    over ranks, so every rank returns the same pruned model. ``device`` is where
    statistics are gathered (default: the model's); ``memory_budget`` caps the bytes of carried
    activations kept on it (default: half the free memory), beyond which they go to temporary
    files. With ``checkpoint_dir`` each unit's result is saved as it is done, and a run killed and
    started again with the same model, data and options picks up where it stopped, ending with
    the same bytes. ``options`` are fields of :class:`PruneConfig`; ``recipe`` ("default":
    chanprune's best measured, "paper": He et al.) fills ``method`` and every such option left
    unset (:mod:`chanprune.recipes`). The caller's model is not changed.
    """
    start = time.perf_counter()
    cfg = PruneConfig(speedup=speedup, method=method, **options)
    cfg.exclude = tuple(cfg.exclude)
    cfg.factorize = tuple(cfg.factorize)
    cfg.validate()
    cfg.check_model(model)
    stream = iterate_batches(calib_data, cfg.batch_size)
    first = next(stream, None)
    if not isinstance(first, torch.Tensor):
        raise ChanpruneError("calibration data is empty or yields no image tensors; give a tensor (N, C, H, W) "
                             "or an iterable of such batches")
    validate_images(first, _image_channels(model, first))
    device = torch.device(device) if device is not None else model_device(model)
    budget = memory_budget if memory_budget is not None else default_budget(device)
    with evaluating(model) as original, BatchStore(budget, device) as store:
        return _prune(original, first, itertools.chain([first], stream), cfg, store, progress, start, checkpoint_dir)


def _image_channels(model: nn.Module, first: torch.Tensor) -> int | None:
    """The image channels calibration data must have: the first conv's input channels, or None
    (any) when the model runs on ``first``'s channels anyway, as a stem that rearranges its input
    before its first conv does (TResNet's space-to-depth makes 48 channels of 3)."""
    channels = first_in_channels(model)
    if channels is None or first.ndim != 4 or len(first) == 0 or first.shape[1] == channels:
        return channels
    try:
        with evaluating(model), torch.no_grad():
            model(first[:1].to(model_device(model)))
    except Exception:  # it does not: the clear message of validate_images, not this one
        return channels
    return None


def _prune(original: nn.Module, first: torch.Tensor, batches: Iterator[torch.Tensor], cfg: PruneConfig,
           store: BatchStore, progress: bool, start: float,
           checkpoint_dir: str | Path | None) -> tuple[nn.Module, PruneReport]:
    device = store.device
    graph = build_graph(original, first[:1].to(model_device(original)))
    input_shape = (1, *first.shape[1:])
    # the trace computes what the model does, with functional convs made modules (their FLOPs then
    # belong to a layer) and convs that derive their weight folded
    flops_before, per_layer = flop_breakdown(graph.gm, input_shape)
    flop_model = FlopModel(graph, flops_before, per_layer)
    units = units_that_fit(graph.gm, pruning_units(graph, cfg))
    record = provenance_or_class(original)
    run = PruneRun(graph, cfg, Plan(list(record.plan)), device)
    sampling = Sampling(cfg.positions_per_image, cfg.seed, cfg.heldout_every)

    def calibrate(for_units: list[Unit]) -> Calibration:
        """Read the data once; the readers of ``for_units`` may ask for targets."""
        return Calibration(graph, run.work, copy.deepcopy(graph.gm).to(device), batches, cfg.batch_size,
                           sampling, [r for u in for_units for r in u.readers], store, first.shape[1],
                           shard(), hash_data=checkpoint_dir is not None)

    calibration: Calibration | None = None

    def curves(narrowest: dict[str, int]) -> dict[str, ErrorCurve]:
        nonlocal calibration
        calibration = calibrate(units)
        return error_curves(calibration, run, units, narrowest, cfg.global_weight, progress)

    if cfg.channel_pruning:
        share = channel_speedup(cfg.speedup, cfg.factorize) if cfg.factorize else cfg.speedup
        widths = resolve_widths(replace(cfg, speedup=share), graph, units, flop_model, curves)
    else:
        widths = {u.name: u.channels for u in units}
    if cfg.factorize:  # every unit with a factorized reader is refitted, pruned or not
        run.ranks = plan_ranks(original, flop_model, units, widths, cfg.factorize, cfg.speedup)
    todo = [u for u in units if (u.name in widths and widths[u.name] < u.channels)
            or any(r.name in run.ranks for r in u.readers)]
    if calibration is None:
        calibration = calibrate(todo)
    else:
        pruned_names = {u.name for u in todo}
        calibration.release([r for u in units if u.name not in pruned_names for r in u.readers])
    resume = None
    if checkpoint_dir is not None:
        rank, world = shard()
        fingerprint = {"model": model_fingerprint(original), "data": calibration.fingerprint, "options": cfg.to_dict(),
                       "widths": {u.name: widths[u.name] for u in todo}, "version": __version__}
        resume = ResumeDir(Path(checkpoint_dir) / f"rank-{rank}" if world > 1 else checkpoint_dir, fingerprint)
    resumed = prune_units(run, calibration, todo, widths,
                          f"{cfg.method} {cfg.speedup or ''}x".strip() if progress else None, resume)
    pruned = run.result(original)

    positions = {r.name: calibration.per_image(r) for u in todo for r in u.readers}
    _warn_sparse(run.errors, calibration, [r for u in todo for r in u.readers], cfg.positions_per_image)
    attach(pruned, record.with_plan(run.plan.ops, tuple(first.shape[1:])))
    report = PruneReport(
        flops_before=flops_before, flops_after=count_flops(pruned, input_shape),
        params_before=count_params(original), params_after=count_params(pruned),
        seconds=0.0, config=cfg.to_dict(),
        layers=layer_reports(graph.gm, pruned, run.errors, positions) + unit_reports(todo, run.kept, run.errors))
    report.calibration_images = calibration.images
    report.resumed_units = resumed
    report.peak_activation_bytes = store.peak_bytes
    report.spilled_bytes = store.spilled_bytes
    report.seconds = time.perf_counter() - start
    return pruned, report


SPARSE_SAMPLES_PER_INPUT = 3  # fewer fitted samples per kept input than this: the fit is warned about


def _warn_sparse(errors: dict[str, dict[str, Any]], calibration: Calibration, readers: list[Reader],
                 per_image: int | None) -> None:
    """Warn about layers fitted on fewer than 3 samples per kept input, saying what would be enough."""
    sparse = {r.name: r for r in readers
              if r.name in errors and errors[r.name]["samples"] < SPARSE_SAMPLES_PER_INPUT * errors[r.name]["inputs"]}
    if not sparse:
        return
    enough = max(calibration.images_needed(r) for r in sparse.values())
    fix = (f"about {enough} calibration images would give each of them 10 samples per input"
           if per_image is None else
           "use more calibration images or more --samples-per-image (or --samples-per-image auto: each layer then "
           "takes what it needs)")
    warnings.warn(f"{len(sparse)} layers were fitted on fewer than 3 samples per kept input ({', '.join(sparse)}); "
                  f"their held-out error may be much larger than the fitted one: {fix}; ridge='auto' (--ridge auto) "
                  "guards them meanwhile", SparseSamplesWarning, stacklevel=4)
