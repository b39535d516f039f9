"""The whole-model loop: groups in order, inputs from the pruned model, targets from the original.

For each channel group: collect moments of every reader (inputs sampled from the model pruned so
far, targets from the original model, so error accumulated upstream is corrected here), choose
the kept channels, reconstruct every reader by least squares, then remove the dropped channels
from the writer, its followers and the readers.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import PRESETS, FlopModel, allocate, check_widths
from .data import materialise, validate_images
from .errors import ChanpruneError
from .flops import count_flops, count_params, flop_breakdown
from .graph import ChannelGraph, ChannelGroup, Reader, build_graph
from .report import LayerReport, PruneReport
from .selection import STRATEGIES, ReaderProblem, SelectionProblem
from .solvers import block_indices, least_squares, relative_error
from .stats import Moments, Targets, collect_moments, reader_dim, record_targets
from .surgery import Plan, folded_weight, write_folded


@dataclass
class PruneConfig:
    """Every option of a pruning run; stored in the report so the run can be repeated."""

    speedup: float | None = 4.0
    method: str = "lasso"
    allocation: str = "uniform"
    widths: dict[str, int] | None = None
    exclude: tuple[str, ...] = ()
    samples_per_image: int = 10
    seed: int = 0
    reconstruct: bool = True
    ridge: float = 1e-6
    lasso_rounds: int = 1
    heldout_every: int = 10
    batch_size: int = 64

    def validate(self) -> None:
        if self.method not in STRATEGIES:
            raise ChanpruneError(f"unknown method {self.method!r}; use one of {', '.join(STRATEGIES)}")
        if self.allocation not in PRESETS:
            raise ChanpruneError(f"unknown allocation {self.allocation!r}; use one of {', '.join(PRESETS)}")
        if self.speedup is None and self.widths is None:
            raise ChanpruneError("give a speed-up target or explicit widths")
        if self.speedup is not None and not (isinstance(self.speedup, (int, float)) and self.speedup >= 1):
            raise ChanpruneError(f"speed-up must be a number >= 1, got {self.speedup!r}")
        if self.samples_per_image < 1:
            raise ChanpruneError(f"samples per image must be >= 1, got {self.samples_per_image}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["exclude"] = list(self.exclude)
        return out


def first_in_channels(model: nn.Module) -> int | None:
    """Input channels of the first conv (the image channels the model expects)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None


def prunable_groups(graph: ChannelGraph, exclude: tuple[str, ...]) -> list[ChannelGroup]:
    """Prunable groups with no member matching an exclude pattern."""
    return [g for g in graph.prunable()
            if not any(fnmatch.fnmatchcase(m, p) for m in g.members for p in exclude)]


def check_memory(model: nn.Module, groups: list[ChannelGroup], n_samples: int) -> None:
    """Fail before starting when a layer's statistics would not fit in the available memory."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return
    targets = 0
    for g in groups:
        need = 0
        for r in g.readers:
            dim = reader_dim(model, r)
            n_out = model.get_submodule(r.name).weight.shape[0]
            need += 8 * (6 * dim * dim + 2 * dim * n_out)
            targets += 4 * n_samples * n_out
        if need > 0.8 * available:
            raise ChanpruneError(
                f"statistics of the readers of {g.name} need about {need / 2**30:.1f} GiB but "
                f"{available / 2**30:.1f} GiB are free; exclude it with --exclude '{g.name}'")
    if targets > 0.5 * available:
        raise ChanpruneError(f"cached targets need about {targets / 2**30:.1f} GiB; use fewer "
                             "calibration images or --samples-per-image")


def resolve_widths(cfg: PruneConfig, graph: ChannelGraph, groups: list[ChannelGroup],
                   flop_model: FlopModel) -> dict[str, int]:
    """Kept channels per group from explicit widths or from the speed-up target and preset."""
    if cfg.widths is not None:
        widths = check_widths(cfg.widths, graph)
        if cfg.speedup is not None:
            got = flop_model.total / flop_model.flops(widths)
            if abs(got / cfg.speedup - 1) > 0.02:
                raise ChanpruneError(f"the widths file gives a {got:.2f}x speed-up, not {cfg.speedup:g}x; "
                                     "drop --speedup or change the widths")
        return widths
    if not groups:
        raise ChanpruneError("no layer of this model can be pruned (see the warnings above)")
    return allocate(flop_model, groups, cfg.speedup, PRESETS[cfg.allocation])


def prune(model: nn.Module, calib_data: Any = None, speedup: float | None = 4.0, method: str = "lasso", *,
          targets: Targets | None = None, progress: bool = True, **options: Any) -> tuple[nn.Module, PruneReport]:
    """Prune ``model`` to ``speedup`` x fewer FLOPs; returns (pruned copy, report).

    ``calib_data`` is a tensor (N, C, H, W) or an iterable of batches; ``targets`` (from
    :func:`chanprune.stats.record_targets`) may be passed instead to share the original model's
    statistics between runs. ``options`` are fields of :class:`PruneConfig`.
    """
    start = time.perf_counter()
    cfg = PruneConfig(speedup=speedup, method=method, **options)
    cfg.exclude = tuple(cfg.exclude)
    cfg.validate()
    images = targets.images if targets is not None else materialise(calib_data)
    validate_images(images, first_in_channels(model))
    original = model.eval()
    graph = build_graph(original, images[:1])
    flops_before, per_layer = flop_breakdown(original, tuple(images.shape))
    flop_model = FlopModel(graph, flops_before, per_layer)
    groups = prunable_groups(graph, cfg.exclude)
    widths = resolve_widths(cfg, graph, groups, flop_model)
    to_prune = [g for g in graph.groups if g.name in widths and widths[g.name] < g.channels]
    if targets is None:
        check_memory(original, to_prune, len(images) * cfg.samples_per_image)
        targets = record_targets(original, graph, images, cfg.samples_per_image, cfg.seed, cfg.batch_size)

    pruned = copy.deepcopy(original)
    info = getattr(model, "_chanprune", None) or {"arch": class_reference(model), "plan": []}
    plan = Plan(list(info["plan"]))
    generator = torch.Generator().manual_seed(cfg.seed)
    errors: dict[str, dict[str, Any]] = {}
    for group in tqdm(to_prune, desc=f"{cfg.method} {cfg.speedup or ''}x".strip(), disable=not progress, leave=False):
        errors.update(prune_group(pruned, group, widths[group.name], cfg, targets, plan, generator))

    sparse = [name for name, e in errors.items() if e["samples"] < 3 * e["inputs"]]
    if sparse:
        warnings.warn(f"{len(sparse)} layers were fitted on fewer than 3 samples per kept input "
                      f"({', '.join(sparse)}); their held-out error may be much larger than the fitted "
                      "one: use more calibration images or --samples-per-image", stacklevel=2)
    pruned._chanprune = {"arch": info["arch"], "plan": plan.to_list(), "input_shape": list(images.shape[1:])}
    report = PruneReport(
        flops_before=flops_before, flops_after=count_flops(pruned, tuple(images.shape)),
        params_before=count_params(original), params_after=count_params(pruned),
        seconds=0.0, config=cfg.to_dict(), layers=layer_reports(original, pruned, errors))
    report.seconds = time.perf_counter() - start
    return pruned, report


def reader_problem(model: nn.Module, reader: Reader, fit: Moments, heldout: Moments) -> ReaderProblem:
    """A reader's folded and original weights with its moments, as the selection strategies see it."""
    layer = model.get_submodule(reader.name)
    bn = model.get_submodule(reader.bn) if reader.bn else None
    weight, bias = folded_weight(layer, bn)
    k = reader.channel_size if reader.kind == "linear" else math.prod(layer.kernel_size)
    raw = layer.weight.detach().double().reshape(len(weight), -1)
    return ReaderProblem(reader, weight, bias, raw, fit, heldout, k)


def prune_group(pruned: nn.Module, group: ChannelGroup, n_keep: int, cfg: PruneConfig, targets: Targets,
                plan: Plan, generator: torch.Generator,
                moments: dict[str, tuple[Moments, Moments]] | None = None) -> dict[str, dict[str, Any]]:
    """Select ``n_keep`` channels of ``group``, reconstruct its readers and shrink every member.

    ``moments`` may be passed when they are known to match ``pruned`` (single-layer analysis).
    """
    moments = moments or collect_moments(pruned, group.readers, targets, cfg.heldout_every)
    problems = [reader_problem(pruned, r, *moments[r.name]) for r in group.readers]
    writer_weight = pruned.get_submodule(group.writer).weight.detach()
    keep = STRATEGIES[cfg.method](SelectionProblem(group, n_keep, problems, writer_weight, generator, cfg.lasso_rounds))
    if len(keep) != n_keep:
        raise AssertionError(f"{cfg.method} kept {len(keep)} channels of {group.name}, not {n_keep}")

    errors: dict[str, dict[str, Any]] = {}
    for rp in problems:
        cols = block_indices(keep, rp.k)
        w_kept, b_kept = rp.weight[:, cols], rp.bias
        before = relative_error(rp.fit, keep, rp.k, w_kept, b_kept)
        if cfg.reconstruct:
            w_kept, b_kept = least_squares(rp.fit, keep, rp.k, cfg.ridge)
        plan.keep_inputs(pruned, rp.reader.name, keep, rp.reader.channel_size)
        if cfg.reconstruct:
            bn = pruned.get_submodule(rp.reader.bn) if rp.reader.bn else None
            if write_folded(pruned.get_submodule(rp.reader.name), bn, w_kept, b_kept):
                plan.add_bias(rp.reader.name)
        errors[rp.reader.name] = {
            "kept_indices": keep.tolist(), "rel_error_before": before, "samples": rp.fit.count,
            "inputs": len(cols),
            "rel_error": relative_error(rp.fit, keep, rp.k, w_kept, b_kept),
            "rel_error_heldout": relative_error(rp.heldout, keep, rp.k, w_kept, b_kept),
        }
    for name in (group.writer, *group.followers):
        plan.keep_outputs(pruned, name, keep)
    return errors


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
        kind = "conv" if isinstance(before, nn.Conv2d) else "linear"
        err = errors.get(name, {})
        reports.append(LayerReport(
            name=name, kind=kind,
            in_channels_before=_in_channels(before), in_channels_after=_in_channels(after),
            out_channels_before=shape_before[0], out_channels_after=shape_after[0],
            kept_indices=err.get("kept_indices"), rel_error=err.get("rel_error"),
            rel_error_heldout=err.get("rel_error_heldout"), rel_error_before=err.get("rel_error_before")))
    return reports


def _in_channels(layer: nn.Module) -> int:
    return layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features


def class_reference(model: nn.Module) -> dict[str, Any]:
    """Architecture reference of a user's model: its importable class, built without arguments."""
    cls = type(model)
    return {"class": f"{cls.__module__}:{cls.__qualname__}", "kwargs": {}}
