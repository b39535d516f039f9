"""Moments for each pruning unit from activations carried forward, not recomputed from the input.

Two frontiers move through the network in execution order: the working model's (pruned so far)
and the original's. For a unit, the working frontier yields the readers' inputs (and, for the
residual correction, the current shortcut); the original's frontier has recorded the readers'
targets at the same sampled positions as it passed them. When a unit removes channels, the values
the working frontier keeps lose the same channels, exactly as if the pruned model had computed
them. Over a whole prune each model is run about once.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import fx

from ..data import iterate_batches, validate_images
from ..errors import ChanpruneError
from ..graph import ChannelGraph, NodeLayout, Reader
from ..outputs import output_tensors
from ..stats import (GroupedMoments, Moments, Positions, block_indices, reader_dim, reader_samples, sample_output,
                     sample_positions)
from .frontier import Frontier, without_inplace
from .store import BatchStore

_TARGETS = "targets"


SAMPLES_PER_INPUT = 10  # fitted samples per input feature that per_image=None aims at


@dataclass(frozen=True)
class Sampling:
    """Where samples are taken: ``per_image`` positions per image, drawn from ``seed``; every
    ``heldout_every``-th image is held out of the fit. ``per_image=None`` lets every reader take
    as many as it needs for :data:`SAMPLES_PER_INPUT` fitted samples per input feature, up to
    its whole output map."""

    per_image: int | None
    seed: int
    heldout_every: int


class Calibration:
    """The calibration data carried through the working and the original model.

    ``work`` is the traced working copy (it will be pruned), ``original`` a traced copy that never
    changes; ``readers`` are all readers whose targets will be asked for. With ``shard = (rank,
    world)`` this process keeps every ``world``-th batch; moments are then summed over all ranks
    (torch.distributed), so every rank sees the same statistics and makes the same decisions.
    With ``hash_data``, ``fingerprint`` is a hash of the images this process read (a resumed run
    checks that its data did not change); else None, and nothing is hashed.
    """

    def __init__(self, graph: ChannelGraph, work: fx.GraphModule, original: fx.GraphModule, data: Iterable,
                 batch_size: int, sampling: Sampling, readers: list[Reader], store: BatchStore,
                 in_channels: int | None, shard: tuple[int, int] = (0, 1), hash_data: bool = False):
        self.graph, self.sampling, self.store = graph, sampling, store
        self.device = store.device
        self.reader_index = {r.name: i for i, r in enumerate(graph_readers(graph))}
        self.pending = Counter(r.name for r in readers)  # units still to ask for each reader's targets
        self.readers = {r.name: r for r in readers}
        self.sizes: list[int] = []
        self.offsets: list[int] = []
        self._positions: dict[tuple[str, int], Positions] = {}
        first_shape = None
        without_inplace(work)
        without_inplace(original)
        count = 0
        self.shard = shard
        self.work = Frontier(work, store, "work", 0)
        self.original = Frontier(original, store, "original", 0)
        digest = hashlib.sha256() if hash_data else None
        for b, batch in enumerate(iterate_batches(data, batch_size)):
            batch = validate_batch(batch, in_channels, first_shape)
            first_shape = first_shape or tuple(batch.shape[1:])
            if b % shard[1] == shard[0]:
                if digest is not None:
                    digest.update(batch.cpu().numpy().tobytes())
                batch = batch.to(self.device)
                self.work.start(len(self.sizes), batch)
                self.original.start(len(self.sizes), batch)
                self.offsets.append(count)
                self.sizes.append(len(batch))
            count += len(batch)
        if count == 0:
            raise ChanpruneError("calibration data is empty; give at least one image")
        if not self.sizes:
            raise ChanpruneError(f"rank {shard[0]} of {shard[1]} got no calibration batch; use more images or a "
                                 "smaller batch size, so that every rank gets at least one")
        self.fingerprint = digest.hexdigest() if digest is not None else None
        self.work.batches = self.original.batches = len(self.sizes)
        self.images = count

    def positions(self, reader: Reader, batch: int) -> Positions:
        """The sampled output positions of ``reader`` in ``batch``: the same in both models, and
        the same however often they are asked for (kept until the reader's last unit is done)."""
        if (reader.name, batch) not in self._positions:
            self._positions[(reader.name, batch)] = self._draw_positions(reader, batch)
        return self._positions[(reader.name, batch)]

    def _draw_positions(self, reader: Reader, batch: int) -> Positions:
        size = self.sizes[batch]
        if reader.layout == "nc":
            empty = torch.zeros(0, dtype=torch.long)
            return Positions(torch.arange(size), empty, empty)
        h, w = self._map_size(reader)
        key = self.sampling.seed * 65_537 + self.reader_index[reader.name]
        ids = torch.arange(self.offsets[batch], self.offsets[batch] + size)
        return sample_positions(ids, h, w, self.per_image(reader), key)

    def _map_size(self, reader: Reader) -> tuple[int, int]:
        shape = self.graph.gm.graph.find_nodes(op="call_module", target=reader.name)[0].meta["tensor_meta"].shape
        return (shape[1], shape[2]) if reader.layout == "nhwc" else (shape[2], shape[3])

    def per_image(self, reader: Reader) -> int:
        """Positions per image ``reader`` samples: the fixed number, or enough for
        SAMPLES_PER_INPUT fitted samples per input feature over all images, at most its map size
        and as many as keep one batch's samples within a quarter of the memory budget (1 for a
        Linear reader: one sample per image)."""
        if reader.layout == "nc":
            return 1
        h, w = self._map_size(reader)
        if self.sampling.per_image is not None:
            return min(self.sampling.per_image, h * w)
        every = self.sampling.heldout_every
        fitted_images = max(1, self.images - self.images // every)
        dim = reader_dim(self.graph.gm, reader)
        need = math.ceil(SAMPLES_PER_INPUT * dim // reader.groups / fitted_images)  # features fitted together
        # one batch's sample matrix (float32) stays within a quarter of the memory budget
        affordable = self.store.budget // (4 * 4 * max(self.sizes) * dim)
        return max(1, min(need, h * w, affordable))

    def images_needed(self, reader: Reader) -> int:
        """Calibration images that would give SAMPLES_PER_INPUT fitted samples per input of ``reader``
        at its positions per image."""
        every = self.sampling.heldout_every
        features = reader_dim(self.graph.gm, reader) // reader.groups  # fitted together
        fitted = math.ceil(SAMPLES_PER_INPUT * features / self.per_image(reader))
        return math.ceil(fitted * every / (every - 1)) if every > 1 else fitted

    def record_targets(self, position: int) -> None:
        """Move the original model's frontier to node ``position``, keeping every pending reader's
        output (and shortcut) at its sampled positions on the way."""
        by_node: dict[str, list[tuple[str, Reader]]] = {}
        for r in (self.readers[name] for name in self.pending):
            by_node.setdefault(r.output_node, []).append(("output", r))
            if r.shortcut:
                by_node.setdefault(r.shortcut, []).append(("shortcut", r))
        rows: dict[int, dict[str, torch.Tensor]] = {}

        def keep(batch: int, node: str, value: torch.Tensor) -> None:
            for role, r in by_node.get(node, ()):
                rows.setdefault(batch, {})[f"{role}:{r.name}"] = \
                    sample_output(value, r.layout, self.positions(r, batch)).float()  # a copy (fancy indexing)

        self.original.advance(position, keep)
        for batch, new in rows.items():
            self.store.put(batch, _TARGETS, {**self.store.get(batch, _TARGETS), **new})

    @torch.no_grad()
    def moments(self, readers: list[Reader], kept_outputs: dict[str, torch.Tensor],
                residual_correction: bool) -> dict[str, tuple[Moments, Moments]]:
        """Moments (fitted, held-out) of ``readers``: inputs from the working model as pruned so far,
        targets from the original. With ``residual_correction`` a reader that feeds a residual add
        targets Y2 + Y1 - Y1' (its original output, the original shortcut, the current shortcut)."""
        self.targets_of(readers)
        want = {r.input_node for r in readers}
        want |= {r.shortcut for r in readers if residual_correction and r.shortcut}
        layers = {r.name: self.work.gm.get_submodule(r.name) for r in readers}
        result = self._new_moments(self.work.gm, readers)
        for batch, values in self.work.look_ahead(want):
            targets = self.store.get(batch, _TARGETS)
            for r in readers:
                pos = self.positions(r, batch)
                x = reader_samples(layers[r.name], r, values[r.input_node], pos)
                y = targets[f"output:{r.name}"]
                if residual_correction and r.shortcut:
                    y = y + targets[f"shortcut:{r.name}"]
                if r.name in kept_outputs:
                    y = y[:, kept_outputs[r.name].to(y.device)]
                if residual_correction and r.shortcut:
                    y = y - sample_output(values[r.shortcut], r.layout, pos).float()
                self._update(result[r.name], batch, pos, x, y)
        self.release(readers)
        return self._reduced(result)

    def _new_moments(self, gm: fx.GraphModule, readers: list[Reader]) -> dict[str, tuple[Moments, Moments]]:
        """Empty (fitted, held-out) moments for each of ``readers`` of ``gm``."""
        def empty(r: Reader) -> Moments | GroupedMoments:
            dim_x, dim_y = reader_dim(gm, r), gm.get_submodule(r.name).weight.shape[0]
            if r.groups > 1:
                return GroupedMoments.empty(dim_x, dim_y, r.groups, self.device)
            return Moments(dim_x, dim_y, device=self.device)

        return {r.name: (empty(r), empty(r)) for r in readers}

    def _update(self, pair: tuple[Moments, Moments], batch: int, pos: Positions, x: torch.Tensor,
                y: torch.Tensor) -> None:
        """Add the samples of ``batch`` to the fitted or the held-out moments, by image."""
        every = self.sampling.heldout_every
        held = ((pos.image.to(x.device) + self.offsets[batch]) % every) == every - 1
        pair[0].update(x[~held], y[~held])
        pair[1].update(x[held], y[held])

    def _reduced(self, result: dict[str, tuple[Moments, Moments]]) -> dict[str, tuple[Moments, Moments]]:
        """``result`` summed over every rank (each holds its own batches' sums)."""
        if self.shard[1] > 1:
            for fit, heldout in result.values():
                fit.all_reduce()
                heldout.all_reduce()
        return result

    @torch.no_grad()
    def unpruned(self, reader_sets: list[list[Reader]], noise: float | None = None) -> Iterator["Unpruned"]:
        """Statistics of each set of readers (in execution order) with inputs and targets both from
        the original model, set by set, at the positions the run itself will sample.

        A third frontier over the original model runs once through the network from the stored
        inputs (a reader in several sets, as of a long concatenation, is summed once and shared);
        it must start before the run moves (so a data-driven allocation can look at every unit
        first) and is dropped from the store when the iteration ends. With ``noise``
        ε, each set's output sensitivity is measured on this process's first batch (averaged
        over ranks): the relative squared change of the model's output when every reader's
        output gets Gaussian noise of relative energy ε², per ε² and per reader.
        """
        if self.work.position != self.work.start_position or self.original.position != self.original.start_position:
            raise RuntimeError("unpruned statistics must be gathered before any unit moves the frontiers")
        probe = Frontier(self.original.gm, self.store, "probe", self.work.batches)
        for batch in range(self.work.batches):
            self.store.put(batch, probe.slot, self.store.get(batch, self.work.slot))
        clean = _tensors(probe.output(0)) if noise is not None else None
        last_set = {r.name: i for i, readers in enumerate(reader_sets) for r in readers}
        found: dict[str, tuple[Moments, Moments]] = {}  # a reader in several sets is summed once
        try:
            for i, readers in enumerate(reader_sets):
                new = [r for r in readers if r.name not in found]
                want = {r.input_node for r in new} | {r.output_node for r in new}
                result = self._new_moments(probe.gm, new)
                for batch, values in probe.look_ahead(want) if new else ():
                    for r in new:
                        pos = self.positions(r, batch)
                        x = reader_samples(probe.gm.get_submodule(r.name), r, values[r.input_node], pos)
                        self._update(result[r.name], batch, pos, x,
                                     sample_output(values[r.output_node], r.layout, pos).float())
                found.update(self._reduced(result))
                sensitivity = None
                if clean is not None:
                    sensitivity = self._sensitivity(probe, readers, clean, noise, i)
                yield Unpruned({r.name: found[r.name] for r in readers}, sensitivity)
                for r in readers:
                    if last_set[r.name] == i:
                        del found[r.name]
                if i + 1 < len(reader_sets):
                    probe.advance(self.reader_position(reader_sets[i + 1], probe))
        finally:
            for batch in range(self.work.batches):
                self.store.drop(batch, probe.slot)

    def _sensitivity(self, probe: Frontier, readers: list[Reader], clean: torch.Tensor, noise: float,
                     index: int) -> float:
        """Relative squared output change per unit of relative squared error at each reader's output."""
        generator = torch.Generator().manual_seed(self.sampling.seed * 65_537 + index)

        def perturb(value: torch.Tensor) -> torch.Tensor:
            axes = [d for d in range(value.dim()) if d != 1]
            rms = value.float().square().mean(axes, keepdim=True).sqrt()
            z = torch.randn(value.shape, generator=generator).to(value.device, value.dtype)
            return value + noise * rms.to(value.dtype) * z

        noisy = _tensors(probe.output(0, {r.output_node: perturb for r in readers}))
        sums = torch.tensor([float((noisy - clean).square().sum()),
                             float((clean - clean.mean(0)).square().sum()) * noise**2 * len(readers)],
                            dtype=torch.float64)
        if self.shard[1] > 1:
            torch.distributed.all_reduce(sums)
        return float(sums[0] / sums[1].clamp_min(1e-300))

    def targets_of(self, readers: list[Reader]) -> None:
        """Make sure the original model has passed (and recorded the targets of) ``readers``."""
        nodes = [self.original.index[r.output_node] for r in readers]
        nodes += [self.original.index[r.shortcut] for r in readers if r.shortcut]
        self.record_targets(max(nodes) + 1)

    def release(self, readers: list[Reader]) -> None:
        """A unit of ``readers`` is done: forget targets and positions no later unit needs."""
        self.pending.subtract(r.name for r in readers)
        self.pending = +self.pending  # a reader of two units (a concatenation) keeps its targets for the second
        self._positions = {key: pos for key, pos in self._positions.items() if key[0] in self.pending}
        for batch in range(len(self.sizes)):
            targets = self.store.get(batch, _TARGETS)
            left = {k: v for k, v in targets.items() if k.partition(":")[2] in self.pending}
            if left.keys() != targets.keys():
                self.store.put(batch, _TARGETS, left)

    def skip(self, readers: list[Reader]) -> None:
        """Pass a unit whose result is already known (a resumed run) exactly as :meth:`moments` would,
        without gathering its moments."""
        self.targets_of(readers)
        self.release(readers)

    def drop_channels(self, group: str, keep: torch.Tensor, widths: dict[str, int]) -> None:
        """The working model's kept values lose the channels of ``group`` not in ``keep``;
        ``widths`` are the current widths of every group (before this change)."""
        layouts = self.graph.node_layouts
        names = {n for n, lay in layouts.items() if group in lay.groups}

        def change(node: str, value: torch.Tensor) -> torch.Tensor:
            index = _axis_index(layouts[node], group, keep, widths).to(value.device)
            return value.index_select(layouts[node].axis, index)

        self.work.update(change, names)

    def advance(self, position: int) -> None:
        """Move the working frontier to node ``position`` (the next unit's first reader)."""
        self.work.advance(position)

    def reader_position(self, readers: list[Reader], frontier: Frontier | None = None) -> int:
        """Index of the first call of any of ``readers`` in ``frontier``'s nodes (default: the working model's)."""
        frontier = frontier or self.work
        return min(frontier.index[_call_node(frontier.gm, r.name)] for r in readers)


@dataclass
class Unpruned:
    """Statistics of one set of readers on the original model: (fitted, held-out) moments per
    reader, and the output sensitivity when it was asked for."""

    moments: dict[str, tuple[Moments, Moments]]
    sensitivity: float | None = None


def _tensors(output: object) -> torch.Tensor:
    """Every tensor in a model output (a tensor, or tuples, lists and dicts of them), as one
    (batch, features) float matrix."""
    tensors = output_tensors(output)
    if tensors is not None:
        return torch.cat([t.detach().float().reshape(len(t), -1) for t in tensors], 1)
    raise ChanpruneError(f"the model returns a {type(output).__name__}; allocation='global' needs tensors "
                         "(or tuples, lists and dicts of them) to measure output sensitivity")


def validate_batch(batch: torch.Tensor, in_channels: int | None, shape: tuple[int, ...] | None) -> torch.Tensor:
    """A calibration batch as float, checked like a whole image tensor and against the first batch's shape."""
    if not isinstance(batch, torch.Tensor):
        raise ChanpruneError(f"calibration batches must be image tensors (N, C, H, W), got {type(batch).__name__}")
    validate_images(batch, in_channels)
    if shape is not None and tuple(batch.shape[1:]) != shape:
        raise ChanpruneError(f"calibration batches differ in shape: {tuple(batch.shape[1:])} after {shape}; "
                             "resize every image to one input size")
    return batch.detach().float()


def _axis_index(layout: NodeLayout, group: str, keep: torch.Tensor, widths: dict[str, int]) -> torch.Tensor:
    """Indices along a value's channel axis that stay when ``group`` keeps ``keep``."""
    offset = 0
    parts = []
    for g in layout.groups:
        if g == group:
            parts.append(offset + keep)
        else:
            parts.append(offset + torch.arange(widths[g]))
        offset += widths[g]
    index = torch.cat(parts)
    if layout.flat_size:
        index = block_indices(index, layout.flat_size)
    return index


def _call_node(gm: fx.GraphModule, target: str) -> str:
    return gm.graph.find_nodes(op="call_module", target=target)[0].name


def graph_readers(graph: ChannelGraph) -> list[Reader]:
    """Every reader of every group, in a fixed order (it seeds the sampled positions)."""
    return [r for g in graph.groups for r in g.readers]


def unpruned_moments(graph: ChannelGraph, data: Iterable, batch_size: int, sampling: Sampling,
                     reader_sets: list[list[Reader]], store: BatchStore,
                     in_channels: int | None) -> list[dict[str, tuple[Moments, Moments]]]:
    """Moments of each set of readers with inputs and targets both from the unpruned model (the
    single-layer analysis), in one pass; ``reader_sets`` must be in execution order."""
    readers = [r for rs in reader_sets for r in rs]
    calibration = Calibration(graph, copy.deepcopy(graph.gm).to(store.device),
                              copy.deepcopy(graph.gm).to(store.device), data, batch_size, sampling, readers, store,
                              in_channels)
    return [{k: (a.to("cpu"), b.to("cpu")) for k, (a, b) in found.moments.items()}
            for found in calibration.unpruned(reader_sets)]
