"""The state of one pruning run and its loop over units.

:class:`PruneRun` holds the traced working copy, the current widths, the kept channels and the
surgery plan; :func:`prune_units` walks the units in execution order (moments from the carried
activations, selection, reconstruction, shrinking, then the carried values move on) and can save
and replay each unit's decisions for a resumed run.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from ..allocation import Unit
from ..config import AUTO_RIDGES, PruneConfig
from ..errors import ChanpruneError
from ..factorize import Ranks, channel_factors, least_squares_on, spatial_factors, window_map
from ..graph import ChannelGraph, ChannelGroup, Reader
from ..selection import STRATEGIES, ReaderProblem, SelectionProblem
from ..solvers import (heldout_least_squares, least_squares, output_errors, relative_error,
                       squared_error)
from ..stats import GroupedMoments, Moments, block_indices
from ..surgery import Plan, PlanOp, folded_weight, replay, write_folded
from .calibration import Calibration
from .resume import ResumeDir, UnitRecord

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
        if unit.narrows_group:
            calibration.drop_channels(unit.group.name, keep, widths_before)
        if i + 1 < len(units):
            calibration.advance(calibration.reader_position(units[i + 1].readers))
    return min(len(records), len(units))


class PruneRun:
    """The state of one pruning run: the traced working copy, current widths, the surgery plan."""

    def __init__(self, graph: ChannelGraph, cfg: PruneConfig, plan: Plan | None = None,
                 device: torch.device | str = "cpu"):
        self.graph, self.cfg = graph, cfg
        self.work: fx.GraphModule = copy.deepcopy(graph.gm).to(device)
        self.plan = plan or Plan()
        self.first_op = len(self.plan.ops)
        self.plan.ops += graph.rewrites  # already done in graph.gm
        self.widths = {g.name: g.channels for g in graph.groups}
        self.kept: dict[str, torch.Tensor] = {}  # unit name -> kept original channel indices
        self.kept_outputs: dict[str, torch.Tensor] = {}  # layer -> kept original output channels
        self.errors: dict[str, dict[str, Any]] = {}
        self.ranks: dict[str, Ranks] = {}  # reader -> its factorization (3C), applied when it is reconstructed
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def channel_positions(self, layer: str, group: ChannelGroup,
                          layouts: dict[str, list[str]] | None = None) -> torch.Tensor:
        """Positions of ``group``'s current channels along ``layer``'s channel axis (its input; its
        output with ``layouts=graph.out_layouts``), one row per time the axis holds the group (a
        Ghost module concatenates a group with a depthwise copy of itself)."""
        rows, offset = [], 0
        for g in (layouts or self.graph.layouts)[layer]:
            if g == group.name:
                rows.append(offset + torch.arange(self.widths[g]))
            offset += self.widths[g]
        return torch.stack(rows)

    def layer_index(self, layer: str, group: ChannelGroup, keep: torch.Tensor,
                    layouts: dict[str, list[str]] | None = None) -> torch.Tensor:
        """Channels of ``layer``'s axis left when ``group`` keeps ``keep`` (other groups laid beside
        it stay whole; a group held more than once loses the same channels everywhere).
        ``layouts`` default to the layers' input layouts; writers pass their output layouts."""
        parts, offset = [], 0
        for g in (layouts or self.graph.layouts)[layer]:
            parts.append(offset + (keep if g == group.name else torch.arange(self.widths[g])))
            offset += self.widths[g]
        return torch.cat(parts)

    def restricted(self, problem: ReaderProblem, group: ChannelGroup) -> ReaderProblem:
        """A reader's problem restricted to ``group``'s channels; the contribution of its other
        input channels (a concatenation) is moved into the target. A group the reader holds more
        than once becomes one channel per group channel, with the features of every copy."""
        positions = self.channel_positions(problem.reader.name, group)
        if positions.numel() == problem.weight.shape[1] // problem.k and len(positions) == 1:
            return problem
        return restrict_channels(problem, positions.T.reshape(-1), len(positions))

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
        if unit.writer is not None:
            return self.select_outputs(unit, n_keep, *moments[unit.writer.name])
        if any(r.groups > 1 for r in unit.readers):
            return self.select_by_conv_group(unit, n_keep, moments)
        group, cfg = unit.group, self.cfg
        full = [reader_problem(self.work, r, *moments[r.name]) for r in unit.readers]
        problems = [self.restricted(rp, group) for rp in full]
        writer_weight = torch.cat([torch.zeros(self.widths[group.name], 0, dtype=torch.float32)] +
                                  [self.output_rows(w, group) for w in group.writers if f"write:{w}" not in self.kept], 1)
        if n_keep == self.widths[group.name]:  # a unit kept whole is here only to be refitted (and factorized)
            keep = torch.arange(n_keep)
        elif unit.narrows_group and group.conv_groups > 1:  # a grouped conv writes it: as many in each conv group
            keep = self.select_by_writer_block(group, n_keep, problems, writer_weight)
        else:
            keep = STRATEGIES[cfg.method](SelectionProblem(group, n_keep, problems, writer_weight, self.generator,
                                                           cfg.lasso_rounds))
        if len(keep) != n_keep:
            raise AssertionError(f"{cfg.method} kept {len(keep)} channels of {unit.name}, not {n_keep}")
        for rp in full:
            self.reconstruct(rp, group, keep, select=unit.reader is not None)
        return keep

    def output_rows(self, writer: str, group: ChannelGroup) -> torch.Tensor:
        """The current weights of ``writer``'s outputs that write ``group``, one row per channel
        (with the filters of every copy, where the writer's output holds the group more than once)."""
        weight = self.work.get_submodule(writer).weight.detach().cpu()
        if writer in self.graph.out_layouts:
            weight = weight[self.channel_positions(writer, group, self.graph.out_layouts).T.reshape(-1)]
        return weight.reshape(self.widths[group.name], -1)

    def select_by_writer_block(self, group: ChannelGroup, n_keep: int, problems: list[ReaderProblem],
                               writer_weight: torch.Tensor) -> torch.Tensor:
        """Channels of a group a grouped conv writes: ``n_keep / G`` from each of its G blocks, each
        block chosen on the readers' problems restricted to it (the other blocks keep their
        weights and move into the target), as :meth:`restricted` does for a concatenation."""
        blocks = group.conv_groups
        size, per = self.widths[group.name] // blocks, n_keep // blocks
        keeps = []
        for j in range(blocks):
            inside = j * size + torch.arange(size)
            sub = SelectionProblem(ChannelGroup(f"{group.name}/{j}", size), per,
                                   [restrict_channels(rp, inside) for rp in problems], writer_weight[inside],
                                   self.generator, self.cfg.lasso_rounds)
            keeps.append(j * size + STRATEGIES[self.cfg.method](sub))
        return torch.cat(keeps)

    def select_by_conv_group(self, unit: Unit, n_keep: int,
                             moments: dict[str, tuple[GroupedMoments, GroupedMoments]]) -> torch.Tensor:
        """A unit read only by grouped convs with G groups: conv group j's inputs (block j of the
        channels) only explain its outputs, so each block is its own selection problem keeping
        ``n_keep / G`` channels, and each reader is refitted block by block; the convs stay grouped."""
        group, cfg = unit.group, self.cfg
        blocks = unit.readers[0].groups  # every reader has as many (and a grouped writer too): the graph checks
        per, size = n_keep // blocks, self.widths[group.name] // blocks
        full = {r.name: reader_problem(self.work, r, *moments[r.name]) for r in unit.readers}

        def part(rp: ReaderProblem, j: int) -> ReaderProblem:
            rows = slice(j * len(rp.weight) // blocks, (j + 1) * len(rp.weight) // blocks)
            fit, heldout = moments[rp.reader.name]
            return ReaderProblem(rp.reader, rp.weight[rows], rp.bias[rows], rp.raw_weight[rows], fit.parts[j],
                                 heldout.parts[j], rp.k)

        writer_rows = [self.output_rows(w, group) for w in group.writers]
        keeps = []
        for j in range(blocks):
            problems = [part(rp, j) for rp in full.values()]
            writer_weight = torch.cat([torch.zeros(size, 0)] + [w[j * size:(j + 1) * size] for w in writer_rows], 1)
            block = ChannelGroup(f"{group.name}/{j}", size)
            problem = SelectionProblem(block, per, problems, writer_weight, self.generator, cfg.lasso_rounds)
            keeps.append(torch.arange(per) if per == size else STRATEGIES[cfg.method](problem))
        keep = torch.cat([j * size + kept for j, kept in enumerate(keeps)])
        for rp in full.values():
            self.reconstruct_by_conv_group(rp, [part(rp, j) for j in range(blocks)], keeps, keep)
        return keep

    def reconstruct_by_conv_group(self, rp: ReaderProblem, parts: list[ReaderProblem], keeps: list[torch.Tensor],
                                  keep: torch.Tensor) -> None:
        """Least squares of each conv group of a grouped reader on its kept inputs, written into
        the working model as one grouped conv."""
        weights, biases, ridges, errors = [], [], [], {"fit": [0.0, 0.0], "heldout": [0.0, 0.0], "before": [0.0, 0.0]}
        for sub, kept in zip(parts, keeps):
            cols = block_indices(kept, sub.k)
            w, b = sub.weight[:, cols], sub.bias
            errors["before"][0] += squared_error(sub.fit, kept, sub.k, w, b)
            ridge = self.cfg.ridge
            if self.cfg.reconstruct and ridge == "auto" and sub.heldout.count > 0:
                w, b, ridge = heldout_least_squares(sub.fit, sub.heldout, kept, sub.k, AUTO_RIDGES, (w, b))
            elif self.cfg.reconstruct:
                ridge = 1e-6 if ridge == "auto" else ridge
                w, b = least_squares(sub.fit, kept, sub.k, ridge)
            weights.append(w)
            biases.append(b)
            ridges.append(ridge)
            for name, m in (("fit", sub.fit), ("heldout", sub.heldout), ("before", sub.fit)):
                if name != "before":
                    errors[name][0] += squared_error(m, kept, sub.k, w, b)
                errors[name][1] += m.yty
        name = rp.reader.name
        self.plan.keep_inputs(self.work, name, keep)
        if self.cfg.reconstruct:
            bn = self.work.get_submodule(rp.reader.bn) if rp.reader.bn else None
            if write_folded(self.work.get_submodule(name), bn, torch.cat(weights), torch.cat(biases)):
                self.plan.add_bias(name)

        def relative(totals: list[float]) -> float:
            return (totals[0] / totals[1]) ** 0.5 if totals[1] > 0 else float("nan")

        self.errors[name] = {
            "kept_indices": keep.tolist(), "rel_error_before": relative(errors["before"]),
            "samples": parts[0].fit.count, "inputs": len(keeps[0]) * parts[0].k,
            "rel_error": relative(errors["fit"]), "rel_error_heldout": relative(errors["heldout"]),
            "ridge": ridges[0],
        }

    def shrink(self, unit: Unit, keep: torch.Tensor) -> None:
        """Remove the channels not in ``keep`` from every writer and follower of ``unit``'s group
        (after its readers were reconstructed)."""
        group = unit.group
        if unit.narrows_group:
            for name in group.writers:
                block = group.block_of(name)
                if name in self.graph.out_layouts:  # its output was split into several groups
                    outputs = self.layer_index(name, group, keep, self.graph.out_layouts)
                    original = sum(self.graph.group(g).channels for g in self.graph.out_layouts[name])
                else:
                    outputs, original = block_indices(keep, block), group.channels * block
                self.plan.keep_outputs(self.work, name, outputs)
                self.kept_outputs[name] = self.kept_outputs.get(name, torch.arange(original))[outputs]
            for name in group.followers:
                self.plan.keep_channels(self.work, name,
                                        block_indices(self.layer_index(name, group, keep), group.block_of(name)))
            for path in group.scales:
                self.plan.keep_scale(self.work, path, block_indices(self.layer_index(path, group, keep),
                                                                    group.block_of(path)))
            self.widths[group.name] = len(keep)
            for cut in self.graph.cuts:  # splits and slices cut at the new widths
                if group.name in cut.groups:
                    self.plan.cut_channels(self.work, cut.node, cut.axis, cut.positions(self.widths))
        elif unit.writer is not None:
            self.kept_outputs[unit.writer.name] = self.kept_outputs.get(unit.writer.name,
                                                                        torch.arange(unit.channels))[keep]
        self.kept[unit.name] = self.kept.get(group.name, torch.arange(group.channels))[keep]

    def select_outputs(self, unit: Unit, n_keep: int, fit: Moments, heldout: Moments) -> torch.Tensor:
        """FCP's fine-grained trunk writer: refit the writer on its current inputs, keep the
        ``n_keep`` outputs whose loss would cost the block output most, and scatter them into the
        trunk's width (the others add the mean they had). Least squares is separable by output,
        so keeping the outputs with the largest ||T_j - t̄_j||² - ||T_j - Ŷ_j||² is exact."""
        writer = unit.writer
        rp = reader_problem(self.work, writer, fit, heldout)
        every = torch.arange(fit.dim_x // rp.k)
        w, b = rp.weight, rp.bias
        ridge = self.cfg.ridge
        if self.cfg.reconstruct and ridge == "auto" and heldout.count > 0:
            w, b, ridge = heldout_least_squares(fit, heldout, every, rp.k, AUTO_RIDGES, (w, b))
        elif self.cfg.reconstruct:
            ridge = 1e-6 if ridge == "auto" else ridge
            w, b = least_squares(fit, every, rp.k, ridge)
        energy = fit.centred_yy()
        keep = (energy - output_errors(fit, every, rp.k, w, b)).topk(n_keep).indices.sort().values
        dropped = torch.ones(len(energy), dtype=torch.bool)
        dropped[keep] = False

        def error(m: Moments) -> float:
            if m.count == 0 or m.yty <= 0:
                return float("nan")
            lost = m.centred_yy()[dropped].sum() + m.count * (m.mean_y - fit.mean_y)[dropped].square().sum()
            return float((output_errors(m, every, rp.k, w, b)[keep].sum() + lost) / m.yty) ** 0.5

        layer = self.work.get_submodule(writer.name)
        if self.cfg.reconstruct:
            bn = self.work.get_submodule(writer.bn) if writer.bn else None
            if write_folded(layer, bn, w, b):
                self.plan.add_bias(writer.name)
        channels = self.widths[unit.group.name]
        self.plan.keep_outputs(self.work, writer.name, keep)
        last = writer.name
        if writer.bn:
            self.plan.keep_channels(self.work, writer.bn, keep)
            last = writer.bn
        self.plan.scatter_outputs(self.work, last, keep, channels)
        with torch.no_grad():
            fill = self.work.get_submodule(last).scatter_fill
            fill[dropped] = fit.mean_y[dropped].to(fill)
        self.errors[unit.name] = {
            "kept_indices": keep.tolist(), "samples": fit.count, "inputs": fit.dim_x, "ridge": ridge,
            "rel_error": error(fit), "rel_error_heldout": error(heldout)}
        return keep

    def unit_record(self, index: int, unit: Unit, keep: torch.Tensor, ops: list[PlanOp]) -> UnitRecord:
        """What :meth:`select_and_reconstruct` just did to ``unit``'s readers, for a resumed run."""
        tensors = {}
        for r in unit.readers:
            for name in (r.name, r.bn):
                if name:
                    tensors.update({f"{name}.{k}": v.clone() for k, v in self.work.get_submodule(name).state_dict().items()})
        return UnitRecord(index, unit.name, tuple(keep.tolist()), tuple(ops), tensors,
                          {name: self.errors[name] for name in (unit.name, *(r.name for r in unit.readers))
                           if name in self.errors},
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
        if select and len(keep) < self.widths[group.name]:  # a select of every channel would copy for nothing
            self.plan.select_inputs(self.work, name, index)
        else:
            self.plan.keep_inputs(self.work, name, index, rp.reader.channel_size)
        if self.cfg.reconstruct and name in self.ranks:
            w_kept, b_kept = self.factorize(rp.reader, self.ranks[name], fit, w_kept, b_kept,
                                            1e-6 if ridge in (None, "auto") else ridge)
        elif self.cfg.reconstruct:
            bn = self.work.get_submodule(rp.reader.bn) if rp.reader.bn else None
            if write_folded(self.work.get_submodule(name), bn, w_kept, b_kept):
                self.plan.add_bias(name)
        self.errors[name] = {
            "kept_indices": keep.tolist(), "rel_error_before": before, "samples": fit.count, "inputs": len(cols),
            "rel_error": relative_error(fit, all_kept, k, w_kept, b_kept),
            "rel_error_heldout": relative_error(heldout, all_kept, k, w_kept, b_kept), "ridge": ridge,
        }

    def factorize(self, reader: Reader, ranks: Ranks, fit: Moments, weight: torch.Tensor, bias: torch.Tensor,
                  ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace a reconstructed reader by its factorized chain (:mod:`chanprune.factorize`),
        fitted to the same targets on the same moments (``fit``, restricted to its kept inputs);
        returns the chain's end-to-end (weight, bias) in the reader's input features."""
        name = reader.name
        layer = self.work.get_submodule(name)
        kernel = tuple(layer.kernel_size)
        through = torch.eye(weight.shape[1], dtype=weight.dtype)  # chain so far as a map of the input features
        if ranks.spatial is not None:
            vertical, fit = spatial_factors(weight, fit, layer.in_channels, kernel, ranks.spatial, ridge)
            through = window_map(vertical, kernel[1])
            weight, bias = least_squares_on(fit, ridge)
            self.plan.factorize(self.work, name, "spatial", ranks.spatial)
            first = self.work.get_submodule(name)[0]
            first.weight.data.copy_(vertical.reshape(first.weight.shape))
        if ranks.channel is not None:
            first_factor, weight, bias = channel_factors(weight, bias, fit, ranks.channel, ridge)
            through = first_factor @ through
            self.plan.factorize(self.work, name, "channel", ranks.channel)
            narrow = self.work.get_submodule(name)[-2]
            narrow.weight.data.copy_(first_factor.reshape(narrow.weight.shape))
        chain = self.work.get_submodule(name)
        bn = self.work.get_submodule(reader.bn) if reader.bn else None
        if write_folded(chain[-1], bn, weight, bias):
            self.plan.add_bias(f"{name}.{len(chain) - 1}")
        return weight @ through, bias

    def result(self, original: nn.Module) -> nn.Module:
        """The user's model class with this run's surgery replayed and the working weights loaded."""
        pruned = replay(copy.deepcopy(original), self.plan.ops[self.first_op:])
        # copied tensor by tensor: a model's own _load_from_state_dict (torchvision's MNASNet
        # rebuilds its stem for old checkpoint versions) must not see the traced copy's state
        target = {**dict(pruned.named_buffers()), **pruned.state_dict(keep_vars=True)}
        # (named_buffers: a buffer the model keeps out of its state dict, as timm's BlurPool2d keeps
        # its filter, is an ordinary buffer of the trace)
        with torch.no_grad():
            for name, value in self.work.state_dict(keep_vars=True).items():
                if name not in target:
                    raise AssertionError(f"traced copy has a tensor the model lacks: {name}")
                target[name].copy_(value)
        return pruned


def restrict_channels(problem: ReaderProblem, inside: torch.Tensor, per_channel: int = 1) -> ReaderProblem:
    """``problem`` restricted to its input channels ``inside``: the other channels keep their
    current weights, and what they contribute is moved into the target. Each ``per_channel``
    consecutive entries of ``inside`` become one channel of the restricted problem."""
    k, fit, heldout = problem.k, problem.fit, problem.heldout
    cols = block_indices(inside, k)
    return ReaderProblem(problem.reader, problem.weight[:, cols], problem.bias, problem.raw_weight[:, cols],
                         fit.residual(cols, problem.weight), heldout.residual(cols, problem.weight), k * per_channel)


def reader_problem(model: nn.Module, reader: Reader, fit: Moments, heldout: Moments) -> ReaderProblem:
    """A reader's folded and original weights with its moments, as the selection strategies see it
    (on the CPU in float64, where the solvers run, whatever the model's device)."""
    layer = model.get_submodule(reader.name)
    bn = model.get_submodule(reader.bn) if reader.bn else None
    weight, bias = (t.cpu() for t in folded_weight(layer, bn))
    raw = layer.weight.detach().double().cpu().reshape(len(weight), -1)
    return ReaderProblem(reader, weight, bias, raw, fit, heldout, channel_features(model, reader))


def channel_features(model: nn.Module, reader: Reader) -> int:
    """Input features one channel owns in ``reader``: H*W for a Linear after flatten, its kernel's
    area for a conv (times the channels per channel after a depthwise channel multiplier)."""
    layer = model.get_submodule(reader.name)
    return reader.channel_size if reader.kind == "linear" else reader.channel_size * math.prod(layer.kernel_size)
