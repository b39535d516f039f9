"""The carried-activation engine: moments from carried values equal moments recomputed from the
input, spilling to disk changes nothing, runs are deterministic, in-place ops never leak."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from torch import fx, nn

from chanprune import prune
from chanprune.config import PruneConfig
from chanprune.engine.calibration import Calibration, Sampling
from chanprune.engine.frontier import Frontier, without_inplace
from chanprune.engine.store import BatchStore
from chanprune.graph import build_graph
from chanprune.engine.run import PruneRun
from chanprune.units import pruning_units, resolve_widths
from chanprune.allocation import FlopModel
from chanprune.flops import flop_breakdown
from chanprune.stats import Moments

from conftest import make_tiny, outputs, random_images
from test_multibranch import MBConvNet, MiniResNet, images as multi_images, make


def _recomputed(graph, run, images, sampling, readers, kept_outputs, residual_correction):
    """Reference moments: the working model as it is now, run again from the input."""
    with BatchStore(2**30, torch.device("cpu")) as store:
        fresh = Calibration(graph, copy.deepcopy(run.work), copy.deepcopy(graph.gm), images, 16, sampling,
                            readers, store, images.shape[1])
        return {k: (a.fold(), b.fold()) for k, (a, b) in
                fresh.moments(readers, kept_outputs, residual_correction).items()}


def _close(a: Moments, b: Moments) -> None:
    assert a.count == b.count
    scale = float(b.xtx.abs().max()) + 1e-12
    torch.testing.assert_close(a.xtx / scale, b.xtx / scale, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.xty / scale, b.xty / scale, rtol=0, atol=1e-6)
    assert a.yty == pytest.approx(b.yty, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("model, x, options", [
    (make_tiny(0), random_images(48), {}),
    (make(MiniResNet), multi_images(40), {"trunk": "joint"}),
    (make(MiniResNet), multi_images(40), {"trunk": "keep"}),
    (make(MBConvNet), multi_images(40), {}),
], ids=["chain", "resnet-joint", "resnet-select", "mbconv"])
def test_carried_moments_equal_moments_recomputed_from_the_input(model, x, options):
    """After every unit, the next unit's moments from carried activations (sliced and advanced)
    equal those of the pruned working model run again from the input."""
    model.eval()
    cfg = PruneConfig(speedup=1.6, samples_per_image=4, allocation="uniform", **options)
    graph = build_graph(model, x[:1])
    flops, per_layer = flop_breakdown(model, (1, *x.shape[1:]))
    units = pruning_units(graph, cfg)
    widths = resolve_widths(cfg, graph, units, FlopModel(graph, flops, per_layer), dict)
    todo = [u for u in units if widths[u.name] < u.channels]
    assert len(todo) >= 2
    sampling = Sampling(cfg.samples_per_image, cfg.seed, cfg.heldout_every)
    run = PruneRun(graph, cfg)
    with warnings.catch_warnings(), BatchStore(2**30, torch.device("cpu")) as store:
        warnings.simplefilter("ignore", UserWarning)
        calibration = Calibration(graph, run.work, copy.deepcopy(graph.gm), x, 16, sampling,
                                  [r for u in todo for r in u.readers], store, x.shape[1])
        for i, unit in enumerate(todo):
            reference = _recomputed(graph, run, x, sampling, unit.readers, run.kept_outputs,
                                    cfg.residual_correction)
            carried = calibration.moments(unit.readers, run.kept_outputs, cfg.residual_correction)
            for name, (fit, held) in carried.items():
                _close(fit.fold(), reference[name][0])
                _close(held.fold(), reference[name][1])
            before = dict(run.widths)
            keep = run.prune_unit(unit, widths[unit.name], carried)
            if unit.reader is None:
                calibration.drop_channels(unit.group.name, keep, before)
            if i + 1 < len(todo):
                calibration.advance(calibration.reader_position(todo[i + 1].readers))


def test_spilling_every_batch_to_disk_gives_the_same_model(monkeypatch, tmp_path):
    model, x = make(MiniResNet), multi_images(40)
    folders = []
    real = BatchStore.folder.fget

    def tracked(self):
        path = real(self)
        folders.append(path)
        return path

    monkeypatch.setattr(BatchStore, "folder", property(tracked))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        a, rep_a = prune(model, x, 1.6, samples_per_image=4, trunk="joint", progress=False, batch_size=8)
        b, rep_b = prune(model, x, 1.6, samples_per_image=4, trunk="joint", progress=False, batch_size=8,
                         memory_budget=0)
    assert rep_a.spilled_bytes == 0 and rep_a.peak_activation_bytes > 0
    assert rep_b.spilled_bytes > 0 and rep_b.peak_activation_bytes == 0
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    assert folders and not any(Path(f).exists() for f in folders), "the spill folder was not removed"


def test_same_seed_gives_bit_identical_weights():
    model, x = make(MiniResNet), multi_images(40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        runs = [prune(model, x, 2.0, "greedy", samples_per_image=4, trunk="joint", progress=False)[0]
                for _ in range(2)]
    for (ka, va), (kb, vb) in zip(runs[0].state_dict().items(), runs[1].state_dict().items()):
        assert ka == kb and va.numpy().tobytes() == vb.numpy().tobytes(), ka


class InPlace(nn.Module):
    """In-place ops of every kind a traced model can hold."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = self.act(self.conv1(x))
        z = self.conv2(y)
        z += y
        z.relu_()
        z = torch.nn.functional.relu(z, inplace=True)
        return self.conv3(z.add_(1.0))


def test_in_place_ops_are_made_out_of_place_with_the_same_function():
    model = InPlace().eval()
    x = random_images(4)
    gm = without_inplace(copy.deepcopy(build_graph(model, x[:1], warn=False).gm))
    assert not gm.act.inplace
    targets = {n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")}
    assert not {"add_", "relu_"} & {t for t in targets if isinstance(t, str)}
    torch.testing.assert_close(gm(x), model(x))
    # a look-ahead past the in-place ops leaves the frontier's values as they were
    with BatchStore(2**30, torch.device("cpu")) as store:
        frontier = Frontier(gm, store, "work", 1)
        frontier.start(0, x)
        frontier.advance(frontier.index["conv2"])
        kept = {k: v.clone() for k, v in store.get(0, "work").items()}
        last = gm.graph.find_nodes(op="call_module", target="conv3")[0].args[0].name  # z.add_(1.0)
        list(frontier.look_ahead({last}))
        assert all(torch.equal(kept[k], v) for k, v in store.get(0, "work").items())


def test_frontier_keeps_only_live_values():
    model = make_tiny(0)
    x = random_images(8)
    gm = copy.deepcopy(build_graph(model, x[:1]).gm)
    with BatchStore(2**30, torch.device("cpu")) as store:
        frontier = Frontier(gm, store, "work", 1)
        frontier.start(0, x)
        frontier.advance(frontier.index["conv3"])
        assert set(store.get(0, "work")) == {"pool1"}  # only what conv3 (and later nodes) read
        torch.testing.assert_close(store.get(0, "work")["pool1"], model.pool1(model.relu2(model.bn2(model.conv2(
            model.relu1(model.bn1(model.conv1(x))))))))


def test_running_ahead_lets_each_value_go_after_its_last_use(monkeypatch):
    """A look-ahead (the error curves' pass, a unit's statistics) holds what a forward pass holds:
    every value computed on the way is dropped once the nodes after it no longer read it, except
    the ones asked for. (Keeping them all took inception_resnet_v2 at 299² over 20 GiB.)"""
    model = make_tiny(0)
    x = random_images(8)
    gm = copy.deepcopy(build_graph(model, x[:1]).gm)
    held = []
    real_run_node = fx.Interpreter.run_node

    def run_node(self, node):
        held.append({n.name for n in self.env})  # what the run holds when each node starts
        return real_run_node(self, node)

    monkeypatch.setattr(fx.Interpreter, "run_node", run_node)
    with BatchStore(2**30, torch.device("cpu")) as store:
        frontier = Frontier(gm, store, "work", 1)
        frontier.start(0, x)
        ((_, values),) = list(frontier.look_ahead({"relu1", "pool1"}))
    torch.testing.assert_close(values["pool1"], model.pool1(model.relu2(model.bn2(model.conv2(
        model.relu1(model.bn1(model.conv1(x))))))))
    ran = [n.name for n in frontier.nodes[frontier.position:frontier.index["pool1"] + 1]]
    assert held[ran.index("bn2")] == {"relu1", "conv2"}  # x, conv1, bn1 are gone; relu1 was asked for
    assert max(len(h) for h in held) == 2


def test_moments_fold_and_merge_match_one_float64_sum():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5000, 12, generator=g) * 3 + 1, torch.randn(5000, 5, generator=g)
    whole, parts = Moments(12, 5), [Moments(12, 5) for _ in range(3)]
    for start in range(0, 5000, 700):
        whole.update(x[start:start + 700], y[start:start + 700])
        parts[(start // 700) % 3].update(x[start:start + 700], y[start:start + 700])
    merged = parts[0].merge(parts[1]).merge(parts[2])
    whole.fold()
    xd, yd = x.double(), y.double()
    for m in (whole, merged):
        assert m.count == 5000
        torch.testing.assert_close(m.xtx, xd.T @ xd, rtol=1e-6, atol=1e-3)
        torch.testing.assert_close(m.xty, xd.T @ yd, rtol=1e-6, atol=1e-3)
        torch.testing.assert_close(m.sum_x, xd.sum(0), rtol=1e-7, atol=1e-4)  # float32 sums of shifted batches
        assert m.yty == pytest.approx(float(yd.square().sum()), rel=1e-7)


def test_streamed_data_is_read_once():
    model = make_tiny(0)
    x = random_images(48)
    reads = []

    class Loader:
        def __iter__(self):
            for i in range(0, 48, 16):
                reads.append(i)
                yield x[i:i + 16], torch.zeros(16)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruned, report = prune(model, Loader(), 1.5, samples_per_image=4, progress=False)
    assert reads == [0, 16, 32] and report.calibration_images == 48
    assert outputs(pruned, x).shape == (48, 5)


def test_units_whose_statistics_do_not_fit_stay_whole_with_a_warning(monkeypatch):
    import chanprune.units as units_module

    model = make_tiny(0)
    x = random_images(40)
    graph = build_graph(model, x[:1])
    units = pruning_units(graph, PruneConfig(speedup=1.5))
    sizes = {u.name: units_module.statistics_bytes(model, u) for u in units}
    biggest = max(sizes, key=sizes.get)
    # free memory such that only the biggest unit's statistics exceed 80% of it
    free = int(max(v for k, v in sizes.items() if k != biggest) / 0.8) + 1
    assert sizes[biggest] > 0.8 * free
    monkeypatch.setattr(units_module, "available_memory", lambda device: free)
    with pytest.warns(UserWarning, match="statistics of .* would need more than .* stay whole"):
        kept = units_module.units_that_fit(model, units)
    assert [u.name for u in kept] == [u.name for u in units if u.name != biggest]


def test_store_spills_values_that_share_memory_and_reads_them_back():
    """A value and a view of it may both be live at a frontier; safetensors refuses shared memory."""
    value = torch.arange(24.0).reshape(2, 3, 4)
    with BatchStore(0, torch.device("cpu")) as store:
        store.put(0, "work", {"x": value, "flat": value.view(2, -1), "shape": 7})
        assert store.spilled_bytes > 0 and not store.memory
        back = store.get(0, "work")
        assert torch.equal(back["x"], value) and torch.equal(back["flat"], value.view(2, -1)) and back["shape"] == 7
        store.put(0, "work", {})
        assert store.get(0, "work") == {}


class ShapeReadEarly(nn.Module):
    """``b, c, h, w = x.shape`` is read before conv2 (where the frontier stops for conv1's unit,
    once conv0's has moved it) and used after it, to view conv1's channels: the carried sizes
    must follow the new width."""

    def __init__(self):
        super().__init__()
        self.conv0, self.conv1 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(8, 4), nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.conv1(torch.relu(self.conv0(x))))
        b, c, h, w = x.shape
        y = torch.relu(self.conv2(x))
        return self.fc1(x.reshape(b, c, h * w).mean(2)) + self.fc2(y.mean((2, 3)))


def test_sizes_read_before_the_frontier_follow_pruned_channels():
    torch.manual_seed(0)
    model, x = ShapeReadEarly().eval(), random_images(16)
    # conv2's unit runs the frontier on past the view, after conv1's unit narrowed x
    pruned, report = prune(model, x, None, widths={"group:conv0": 4, "group:conv1": 5, "group:conv2": 4},
                           method="max_response", progress=False)
    assert pruned.conv1.out_channels == pruned.fc1.in_features == 5 and pruned.fc2.in_features == 4
    assert pruned(x).shape == (16, 4) and report.flops_after < report.flops_before
    frontier = Frontier(build_graph(model, x[:1]).gm, None, "work", 0)
    assert {"getattr_1", "getitem_1"} <= frontier.shapes  # x.shape and its channel count
