"""The whole-model loop: units in execution order, inputs from the pruned model, targets from the original.

For each pruning unit (a channel group, or one reader's channel select): collect moments of
every reader (inputs sampled from the model pruned so far, targets from the original model, so
error accumulated upstream is corrected here), choose the kept channels, reconstruct every
reader by least squares, then remove the dropped channels from every member of the group.
The work happens on a traced copy of the model; the result is the user's own class with the
same surgery replayed on it.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import itertools
import math
import time
from pathlib import Path
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from .allocation import PRESETS, FlopModel, Unit, allocate, check_widths
from .config import AUTO_RIDGES, PruneConfig
from .data import iterate_batches, validate_images
from .engine.calibration import Calibration, Sampling
from .engine.resume import ResumeDir, UnitRecord, model_fingerprint
from ._version import __version__
from .distributed import shard
from .engine.store import BatchStore, available_memory, default_budget
from .errors import ChanpruneError, SparseSamplesWarning
from .flops import count_flops, count_params, flop_breakdown
from .graph import ChannelGraph, ChannelGroup, Reader, build_graph
from .io.provenance import attach, provenance_or_class
from .layers import SelectedConv2d
from .report import LayerReport, PruneReport
from .selection import STRATEGIES, ReaderProblem, SelectionProblem
from .solvers import block_indices, heldout_least_squares, least_squares, relative_error
from .stats import Moments, reader_dim
from .surgery import Plan, PlanOp, folded_weight, replay, write_folded

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

    Prunable groups become units, except residual trunks under ``trunk="keep"``. With
    feature-map sampling, each conv reading a group that stays whole (a kept trunk, or channels
    blocked by an op chanprune cannot prune through) becomes a select unit of its own.
    """
    units: list[Unit] = []
    for g in graph.groups:
        if not g.readers:
            continue
        whole = not g.prunable or (g.residual and cfg.trunk == "keep") or _excluded(g.members, cfg.exclude)
        if not whole:
            units.append(Unit(g))
        elif cfg.feature_map_sampling:
            units += [Unit(g, r) for r in g.readers
                      if r.kind == "conv" and len(graph.layouts[r.name]) == 1 and not _excluded([r.name], cfg.exclude)]
    return sorted(units, key=lambda u: min(graph.order[r.name] for r in u.readers))


def statistics_bytes(model: nn.Module, unit: Unit) -> int:
    """Memory the moments of a unit's readers take while it is pruned (G, B and solver copies)."""
    need = 0
    for r in unit.readers:
        dim = reader_dim(model, r)
        n_out = model.get_submodule(r.name).weight.shape[0]
        need += 8 * (6 * dim * dim + 2 * dim * n_out)
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


def resolve_widths(cfg: PruneConfig, graph: ChannelGraph, units: list[Unit], flop_model: FlopModel) -> dict[str, int]:
    """Kept channels per unit from explicit widths or from the speed-up target and preset."""
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
    return allocate(flop_model, units, cfg.speedup, PRESETS[cfg.allocation], cfg.round_to)


def prune(model: nn.Module, calib_data: Any, speedup: float | None = 4.0, method: str = "lasso", *,
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
    the same bytes. ``options`` are fields of :class:`PruneConfig`. The caller's model is not changed.
    """
    start = time.perf_counter()
    cfg = PruneConfig(speedup=speedup, method=method, **options)
    cfg.exclude = tuple(cfg.exclude)
    cfg.validate()
    cfg.check_model(model)
    stream = iterate_batches(calib_data, cfg.batch_size)
    first = next(stream, None)
    if not isinstance(first, torch.Tensor):
        raise ChanpruneError("calibration data is empty or yields no image tensors; give a tensor (N, C, H, W) "
                             "or an iterable of such batches")
    validate_images(first, first_in_channels(model))
    device = torch.device(device) if device is not None else \
        next((p.device for p in model.parameters()), torch.device("cpu"))
    budget = memory_budget if memory_budget is not None else default_budget(device)
    with evaluating(model) as original, BatchStore(budget, device) as store:
        return _prune(original, first, itertools.chain([first], stream), cfg, store, progress, start, checkpoint_dir)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the duration, each module's own training flag restored afterwards,
    so that pruning never changes the caller's model."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes:
            module.training = mode


def _prune(original: nn.Module, first: torch.Tensor, batches: Iterator[torch.Tensor], cfg: PruneConfig,
           store: BatchStore, progress: bool, start: float,
           checkpoint_dir: str | Path | None) -> tuple[nn.Module, PruneReport]:
    device = store.device
    graph = build_graph(original, first[:1].to(_model_device(original)))
    input_shape = (1, *first.shape[1:])
    flops_before, per_layer = flop_breakdown(original, input_shape)
    flop_model = FlopModel(graph, flops_before, per_layer)
    units = units_that_fit(original, pruning_units(graph, cfg))
    widths = resolve_widths(cfg, graph, units, flop_model)
    todo = [u for u in units if u.name in widths and widths[u.name] < u.channels]

    record = provenance_or_class(original)
    run = PruneRun(graph, cfg, Plan(list(record.plan)), device)
    readers = [r for u in todo for r in u.readers]
    sampling = Sampling(cfg.samples_per_image, cfg.seed, cfg.heldout_every)
    calibration = Calibration(graph, run.work, copy.deepcopy(graph.gm).to(device), batches, cfg.batch_size,
                              sampling, readers, store, first_in_channels(original), shard())
    resume = None
    if checkpoint_dir is not None:
        rank, world = shard()
        fingerprint = {"model": model_fingerprint(original), "data": calibration.fingerprint, "options": cfg.to_dict(),
                       "widths": {u.name: widths[u.name] for u in todo}, "version": __version__}
        resume = ResumeDir(Path(checkpoint_dir) / f"rank-{rank}" if world > 1 else checkpoint_dir, fingerprint)
    resumed = prune_units(run, calibration, todo, widths,
                          f"{cfg.method} {cfg.speedup or ''}x".strip() if progress else None, resume)
    pruned = run.result(original)

    sparse = [name for name, e in run.errors.items() if e["samples"] < 3 * e["inputs"]]
    if sparse:
        warnings.warn(f"{len(sparse)} layers were fitted on fewer than 3 samples per kept input "
                      f"({', '.join(sparse)}); their held-out error may be much larger than the fitted "
                      "one: use more calibration images or --samples-per-image, or ridge='auto' (--ridge auto)",
                      SparseSamplesWarning, stacklevel=3)
    attach(pruned, record.with_plan(run.plan.ops, tuple(first.shape[1:])))
    report = PruneReport(
        flops_before=flops_before, flops_after=count_flops(pruned, input_shape),
        params_before=count_params(original), params_after=count_params(pruned),
        seconds=0.0, config=cfg.to_dict(),
        layers=layer_reports(original, pruned, run.errors) + unit_reports(graph, todo, run))
    report.calibration_images = calibration.images
    report.resumed_units = resumed
    report.peak_activation_bytes = store.peak_bytes
    report.spilled_bytes = store.spilled_bytes
    report.seconds = time.perf_counter() - start
    return pruned, report


def prune_units(run: "PruneRun", calibration: Calibration, units: list[Unit], widths: dict[str, int],
                progress: str | None = None, resume: ResumeDir | None = None) -> int:
    """Prune ``units`` in execution order: moments from the carried activations, selection and
    reconstruction, then the carried values lose the dropped channels and move to the next unit.

    With ``resume``, each unit's result is saved as it is done, and units saved by an earlier run
    are replayed (same operations in the same order, without moments or solvers), so the result
    is byte-identical to an uninterrupted run. Returns the number of units replayed."""
    records = resume.records() if resume is not None else []
    for i, unit in enumerate(tqdm(units, desc=progress, disable=progress is None, leave=False)):
        widths_before = dict(run.widths)
        if i < len(records):
            calibration.skip(unit.readers)
            keep = run.replay_readers(unit, records[i])
        else:
            moments = calibration.moments(unit.readers, run.kept_outputs, run.cfg.residual_correction)
            start = len(run.plan.ops)
            keep = run.select_and_reconstruct(unit, widths[unit.name],
                                              {k: (a.to("cpu"), b.to("cpu")) for k, (a, b) in moments.items()})
            if resume is not None:
                resume.save(run.unit_record(i, unit, keep, run.plan.ops[start:]))
        run.shrink(unit, keep)
        if unit.reader is None:
            calibration.drop_channels(unit.group.name, keep, widths_before)
        if i + 1 < len(units):
            calibration.advance(calibration.reader_position(units[i + 1].readers))
    return min(len(records), len(units))


def _model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


class PruneRun:
    """The state of one pruning run: the traced working copy, current widths, the surgery plan."""

    def __init__(self, graph: ChannelGraph, cfg: PruneConfig, plan: Plan | None = None,
                 device: torch.device | str = "cpu"):
        self.graph, self.cfg = graph, cfg
        self.work: fx.GraphModule = copy.deepcopy(graph.gm).to(device)
        self.plan = plan or Plan()
        self.first_op = len(self.plan.ops)
        self.widths = {g.name: g.channels for g in graph.groups}
        self.kept: dict[str, torch.Tensor] = {}  # unit name -> kept original channel indices
        self.kept_outputs: dict[str, torch.Tensor] = {}  # layer -> kept original output channels
        self.errors: dict[str, dict[str, Any]] = {}
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def channel_span(self, layer: str, group: ChannelGroup) -> tuple[int, int, int]:
        """(offset, size, total) of ``group``'s current channels along ``layer``'s channel axis."""
        layout = self.graph.layouts[layer]
        at = layout.index(group.name)
        return sum(self.widths[g] for g in layout[:at]), self.widths[group.name], sum(self.widths[g] for g in layout)

    def layer_index(self, layer: str, group: ChannelGroup, keep: torch.Tensor) -> torch.Tensor:
        """Channels of ``layer``'s axis left when ``group`` keeps ``keep`` (others stay whole)."""
        offset, size, total = self.channel_span(layer, group)
        return torch.cat([torch.arange(offset), offset + keep, torch.arange(offset + size, total)])

    def restricted(self, problem: ReaderProblem, group: ChannelGroup) -> ReaderProblem:
        """A reader's problem restricted to ``group``'s channels; the contribution of its other
        input channels (a concatenation) is moved into the target."""
        offset, size, total = self.channel_span(problem.reader.name, group)
        if size == total:
            return problem
        k, fit, heldout = problem.k, problem.fit, problem.heldout
        cols = block_indices(offset + torch.arange(size), k)
        other = block_indices(torch.cat([torch.arange(offset), torch.arange(offset + size, total)]), k)
        return ReaderProblem(problem.reader, problem.weight[:, cols], problem.bias, problem.raw_weight[:, cols],
                             fit.residual(cols, other, problem.weight[:, other]),
                             heldout.residual(cols, other, problem.weight[:, other]), k)

    def prune_unit(self, unit: Unit, n_keep: int, moments: dict[str, tuple[Moments, Moments]]) -> torch.Tensor:
        """Select ``n_keep`` channels for ``unit``, reconstruct its readers, shrink every member.

        ``moments`` (fitted, held-out) of each reader must match the working model as it is now.
        Returns the kept channel indices.
        """
        keep = self.select_and_reconstruct(unit, n_keep, moments)
        self.shrink(unit, keep)
        return keep

    def select_and_reconstruct(self, unit: Unit, n_keep: int,
                               moments: dict[str, tuple[Moments, Moments]]) -> torch.Tensor:
        """Choose the kept channels of ``unit`` and refit its readers (their input channels shrink);
        the writers and followers keep every channel until :meth:`shrink`."""
        group, cfg = unit.group, self.cfg
        full = [reader_problem(self.work, r, *moments[r.name]) for r in unit.readers]
        problems = [self.restricted(rp, group) for rp in full]
        writer_weight = torch.cat([self.work.get_submodule(w).weight.detach().reshape(self.widths[group.name], -1)
                                   for w in group.writers], 1)
        problem = SelectionProblem(group, n_keep, problems, writer_weight, self.generator, cfg.lasso_rounds)
        keep = STRATEGIES[cfg.method](problem)
        if len(keep) != n_keep:
            raise AssertionError(f"{cfg.method} kept {len(keep)} channels of {unit.name}, not {n_keep}")
        for rp in full:
            self.reconstruct(rp, group, keep, select=unit.reader is not None)
        return keep

    def shrink(self, unit: Unit, keep: torch.Tensor) -> None:
        """Remove the channels not in ``keep`` from every writer and follower of ``unit``'s group
        (after its readers were reconstructed)."""
        group = unit.group
        if unit.reader is None:
            for name in group.writers:
                self.plan.keep_outputs(self.work, name, keep)
                previous = self.kept_outputs.get(name, torch.arange(group.channels))
                self.kept_outputs[name] = previous[keep]
            for name in group.followers:
                self.plan.keep_channels(self.work, name, self.layer_index(name, group, keep))
            self.widths[group.name] = len(keep)
        self.kept[unit.name] = self.kept.get(group.name, torch.arange(group.channels))[keep]

    def unit_record(self, index: int, unit: Unit, keep: torch.Tensor, ops: list[PlanOp]) -> UnitRecord:
        """What :meth:`select_and_reconstruct` just did to ``unit``'s readers, for a resumed run."""
        tensors = {}
        for r in unit.readers:
            for name in (r.name, r.bn):
                if name:
                    tensors.update({f"{name}.{k}": v.clone() for k, v in self.work.get_submodule(name).state_dict().items()})
        return UnitRecord(index, unit.name, tuple(keep.tolist()), tuple(ops), tensors,
                          {r.name: self.errors[r.name] for r in unit.readers if r.name in self.errors},
                          self.generator.get_state())

    def replay_readers(self, unit: Unit, record: UnitRecord) -> torch.Tensor:
        """Redo a recorded :meth:`select_and_reconstruct`: the same operations and tensors."""
        if record.unit != unit.name:
            raise ChanpruneError(f"resume record {record.index} is for {record.unit!r}, not {unit.name!r}; the saved "
                                 "run pruned other layers: use another --resume-dir")
        for op in record.ops:
            self.plan.apply(self.work, op)
        with torch.no_grad():
            state = self.work.state_dict(keep_vars=True)
            for name, value in record.tensors.items():
                state[name].copy_(value)
        self.errors.update(record.errors)
        self.generator.set_state(record.generator)
        return torch.tensor(record.keep, dtype=torch.long)

    def reconstruct(self, rp: ReaderProblem, group: ChannelGroup, keep: torch.Tensor, select: bool) -> None:
        """Least squares of one reader (its whole input) on the kept input channels, written into
        the working model."""
        name, k, fit, heldout = rp.reader.name, rp.k, rp.fit, rp.heldout
        index = self.layer_index(name, group, keep)
        cols = block_indices(index, k)
        # every solve and error below reads only the kept columns: restrict the moments once
        fit, heldout, all_kept = fit.restrict(cols), heldout.restrict(cols), torch.arange(len(index))
        w_kept, b_kept = rp.weight[:, cols], rp.bias
        before = relative_error(fit, all_kept, k, w_kept, b_kept)
        ridge = self.cfg.ridge
        if self.cfg.reconstruct and ridge == "auto" and heldout.count > 0:
            w_kept, b_kept, ridge = heldout_least_squares(fit, heldout, all_kept, k, AUTO_RIDGES,
                                                          (w_kept, b_kept))
        elif self.cfg.reconstruct:
            ridge = 1e-6 if ridge == "auto" else ridge
            w_kept, b_kept = least_squares(fit, all_kept, k, ridge)
        if select:
            self.plan.select_inputs(self.work, name, index)
        else:
            self.plan.keep_inputs(self.work, name, index, rp.reader.channel_size)
        if self.cfg.reconstruct:
            bn = self.work.get_submodule(rp.reader.bn) if rp.reader.bn else None
            if write_folded(self.work.get_submodule(name), bn, w_kept, b_kept):
                self.plan.add_bias(name)
        self.errors[name] = {
            "kept_indices": keep.tolist(), "rel_error_before": before, "samples": fit.count, "inputs": len(cols),
            "rel_error": relative_error(fit, all_kept, k, w_kept, b_kept),
            "rel_error_heldout": relative_error(heldout, all_kept, k, w_kept, b_kept), "ridge": ridge,
        }

    def result(self, original: nn.Module) -> nn.Module:
        """The user's model class with this run's surgery replayed and the working weights loaded."""
        pruned = replay(copy.deepcopy(original), self.plan.ops[self.first_op:])
        # copied tensor by tensor: a model's own _load_from_state_dict (torchvision's MNASNet
        # rebuilds its stem for old checkpoint versions) must not see the traced copy's state
        target = pruned.state_dict(keep_vars=True)
        with torch.no_grad():
            for name, value in self.work.state_dict(keep_vars=True).items():
                if name not in target:
                    raise AssertionError(f"traced copy has a tensor the model lacks: {name}")
                target[name].copy_(value)
        return pruned


def reader_problem(model: nn.Module, reader: Reader, fit: Moments, heldout: Moments) -> ReaderProblem:
    """A reader's folded and original weights with its moments, as the selection strategies see it."""
    layer = model.get_submodule(reader.name)
    bn = model.get_submodule(reader.bn) if reader.bn else None
    weight, bias = folded_weight(layer, bn)
    k = reader.channel_size if reader.kind == "linear" else math.prod(layer.kernel_size)
    raw = layer.weight.detach().double().reshape(len(weight), -1)
    return ReaderProblem(reader, weight, bias, raw, fit, heldout, k)


def layer_reports(original: nn.Module, pruned: nn.Module, errors: dict[str, dict[str, Any]]) -> list[LayerReport]:
    """One entry per Conv2d / Linear whose shape changed, with the errors of its reconstruction."""
    reports = []
    for name, before in original.named_modules():
        if not isinstance(before, (nn.Conv2d, nn.Linear)):
            continue
        after = pruned.get_submodule(name)
        shape_before, shape_after = tuple(before.weight.shape[:2]), tuple(after.weight.shape[:2])
        if shape_before == shape_after and name not in errors:
            continue
        kind = "linear" if isinstance(before, nn.Linear) else "conv+select" if isinstance(after, SelectedConv2d) \
            else "conv"
        err = errors.get(name, {})
        reports.append(LayerReport(
            name=name, kind=kind,
            in_channels_before=_in_channels(before), in_channels_after=_in_channels(after),
            out_channels_before=shape_before[0], out_channels_after=shape_after[0],
            kept_indices=err.get("kept_indices"), rel_error=err.get("rel_error"),
            rel_error_heldout=err.get("rel_error_heldout"), rel_error_before=err.get("rel_error_before")))
    return reports


def unit_reports(graph: ChannelGraph, units: list[Unit], run: PruneRun) -> list[LayerReport]:
    """One entry per pruned residual trunk: the channels every writer and reader of it lost."""
    return [LayerReport(name=f"trunk:{u.name}", kind="trunk", in_channels_before=u.channels,
                        in_channels_after=len(run.kept[u.name]), out_channels_before=u.channels,
                        out_channels_after=len(run.kept[u.name]), kept_indices=run.kept[u.name].tolist())
            for u in units if u.kind == "trunk"]


def _in_channels(layer: nn.Module) -> int:
    return layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features
