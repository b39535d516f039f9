"""The whole-model loop: keeping everything is exact, reconstruction helps, dead channels go for free,
shapes stay consistent."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from chanprune.errors import ChanpruneError
from chanprune.flops import count_flops, count_params
from chanprune.models import create_model
from chanprune.graph import build_graph
from chanprune.pruner import prune
from chanprune.units import first_in_channels
from chanprune.selection import STRATEGIES
from chanprune.surgery import Plan

from conftest import (IMAGE_SHAPE, ODD_SHAPE, make_odd, make_tiny, outputs, prune_groups_directly,
                      random_images, randomise, rel_error)


def full_widths(model, images):
    return {g.name: g.channels for g in build_graph(model, images[:1]).prunable()}


@pytest.mark.parametrize("make, shape", [(make_tiny, IMAGE_SHAPE), (make_odd, ODD_SHAPE)])
def test_keeping_every_channel_reproduces_every_layer(make, shape):
    model = make(0)
    images = random_images(200, shape)
    pruned, errors, plan, graph = prune_groups_directly(model, images, full_widths(model, images))
    # every reader went through least squares and was written back, yet nothing changed
    assert set(errors) == {r.name for g in graph.prunable() for r in g.readers}
    for name, err in errors.items():
        assert err["rel_error"] < 1e-3, name
        assert err["rel_error_before"] < 1e-3, name
    fresh = random_images(50, shape, seed=7)  # not the calibration images
    assert rel_error(outputs(pruned, fresh), outputs(model, fresh)) < 1e-4
    # every intermediate layer output too (pre-activation), not only the logits
    for name, layer in model.named_modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            got, ref = [], []
            h1 = pruned.get_submodule(name).register_forward_hook(lambda m, i, o: got.append(o))
            h2 = layer.register_forward_hook(lambda m, i, o: ref.append(o))
            outputs(pruned, fresh), outputs(model, fresh)
            h1.remove(), h2.remove()
            assert rel_error(got[0], ref[0]) < 1e-4, name
    assert [op.op for op in plan.ops].count("keep_inputs") == len(errors)


def test_speedup_one_changes_nothing():
    model = make_tiny(0)
    images = random_images(40)
    pruned, report = prune(model, images, 1.0, progress=False)
    assert report.flops_after == report.flops_before
    assert torch.equal(outputs(pruned, images), outputs(model, images))


@pytest.mark.parametrize("method", sorted(STRATEGIES))
def test_reconstruction_never_raises_the_fitted_error(method):
    model = make_tiny(3)
    images = random_images(150, seed=4)
    # a fixed small ridge: least squares then never fits worse than the original weights ("auto" may
    # trade fitted for held-out error)
    pruned, report = prune(model, images, 1.5, method, samples_per_image=6, ridge=1e-6, progress=False)
    checked = 0
    for layer in report.layers:
        if layer.kept_indices is None:
            continue
        assert layer.rel_error <= layer.rel_error_before * (1 + 1e-6) + 1e-6, layer.name
        assert layer.rel_error_heldout is not None and layer.rel_error_heldout >= 0
        checked += 1
    assert checked == 4


def test_no_reconstruction_keeps_original_weights_and_reconstruction_helps():
    model = make_tiny(3)
    images = random_images(600, seed=4)  # enough samples per input that the fit generalises
    recon, rep_recon = prune(model, images, 1.5, "lasso", samples_per_image=6, progress=False)
    plain, rep_plain = prune(model, images, 1.5, "lasso", samples_per_image=6, reconstruct=False, progress=False)
    assert rep_plain.config["reconstruct"] is False
    for layer in rep_plain.layers:
        if layer.kept_indices is not None:
            assert layer.rel_error == pytest.approx(layer.rel_error_before, rel=1e-12)
    # kept channels keep their original weights: conv2's weights are a slice of the original
    kept = next(l for l in rep_plain.layers if l.name == "conv2").kept_indices
    conv2_rows = next(l for l in rep_plain.layers if l.name == "conv3").kept_indices
    assert torch.equal(plain.conv2.weight, model.conv2.weight[conv2_rows][:, kept])
    # the whole model follows the original better with reconstruction
    fresh = random_images(300, seed=9)
    ref = outputs(model, fresh)
    assert rel_error(outputs(recon, fresh), ref) < 0.9 * rel_error(outputs(plain, fresh), ref)


def test_removing_zero_weight_channels_leaves_outputs_unchanged():
    model = make_tiny(0)
    dead = [1, 4, 5, 10]
    with torch.no_grad():
        model.conv3.weight[:, dead] = 0  # conv3 (the only reader of conv2's channels) ignores them
    images = random_images(120)
    fresh = random_images(40, seed=8)
    ref = outputs(model, fresh)
    alive = [c for c in range(12) if c not in dead]

    # plain surgery
    surgeon = copy.deepcopy(model)
    plan = Plan()
    keep = torch.tensor(alive)
    plan.keep_outputs(surgeon, "conv2", keep)
    plan.keep_outputs(surgeon, "bn2", keep)
    plan.keep_inputs(surgeon, "conv3", keep)
    assert surgeon.conv2.out_channels == 8 and surgeon.conv3.in_channels == 8
    assert rel_error(outputs(surgeon, fresh), ref) < 1e-6

    # the LASSO drops the zero-weight channels first, with and without reconstruction
    for reconstruct, tol in ((False, 1e-5), (True, 1e-4)):
        pruned, errors, _, _ = prune_groups_directly(model, images, {"conv2": 8}, reconstruct=reconstruct)
        assert errors["conv3"]["kept_indices"] == alive
        assert errors["conv3"]["rel_error_before"] < 1e-3
        assert rel_error(outputs(pruned, fresh), ref) < tol, reconstruct


def test_removing_zero_weight_channels_of_a_flattened_map():
    # fc1 reads conv3's 16 channels as 16 blocks of 2x2 = 4 features; zero 5 whole blocks
    model = make_tiny(0)
    dead = [0, 7, 8, 13, 15]
    with torch.no_grad():
        w = model.fc1.weight.view(24, 16, 4)
        w[:, dead] = 0
    images = random_images(120)
    fresh = random_images(40, seed=8)
    pruned, errors, _, _ = prune_groups_directly(model, images, {"conv3": 11}, reconstruct=False)
    assert errors["fc1"]["kept_indices"] == [c for c in range(16) if c not in dead]
    assert pruned.fc1.in_features == 44 and pruned.conv3.out_channels == 11
    assert rel_error(outputs(pruned, fresh), outputs(model, fresh)) < 1e-5


def assert_consistent_shapes(original: nn.Module, pruned: nn.Module, images: torch.Tensor) -> None:
    """Every reader's inputs equal its writer's outputs after pruning; followers match; it runs."""
    graph = build_graph(original, images[:1], warn=False)
    for g in graph.groups:
        writer = pruned.get_submodule(g.writer)
        out = writer.out_channels if isinstance(writer, nn.Conv2d) else writer.out_features
        for f in g.followers:
            assert pruned.get_submodule(f).num_features == out, f
            assert pruned.get_submodule(f).running_mean.shape == (out,)
        for r in g.readers:
            reader = pruned.get_submodule(r.name)
            if isinstance(reader, nn.Conv2d):
                assert reader.in_channels == out == reader.weight.shape[1], r.name
            else:
                assert reader.in_features == out * r.channel_size == reader.weight.shape[1], r.name
    assert outputs(pruned, images[:3]).shape == outputs(original, images[:3]).shape


@pytest.mark.parametrize("make, shape, speedup", [(make_tiny, IMAGE_SHAPE, 1.5), (make_odd, ODD_SHAPE, 1.3)])
def test_pruned_shapes_are_consistent(make, shape, speedup):
    model = make(0)
    images = random_images(120, shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruned, report = prune(model, images, speedup, samples_per_image=5, progress=False)
    assert_consistent_shapes(model, pruned, images)
    assert report.flops_after == count_flops(pruned, (1, *shape))
    assert abs(report.speedup_achieved / speedup - 1) <= 0.02
    assert report.params_after < report.params_before
    for layer in report.layers:
        assert layer.out_channels_after == pruned.get_submodule(layer.name).weight.shape[0]


def test_exclude_leaves_every_member_of_the_group_whole():
    model = make_tiny(0)
    images = random_images(120)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruned, report = prune(model, images, 1.8, exclude=["conv3"], samples_per_image=4, progress=False)
    assert abs(report.speedup_achieved / 1.8 - 1) <= 0.02
    # conv3 is a member of group conv2 (reader) and group conv3 (writer): both stay whole
    assert pruned.conv2.out_channels == 12 and pruned.bn2.num_features == 12 and pruned.conv3.in_channels == 12
    assert pruned.conv3.out_channels == 16 and pruned.fc1.in_features == 64
    assert pruned.conv1.out_channels < 8 or pruned.fc1.out_features < 24
    assert report.config["exclude"] == ["conv3"]
    assert_consistent_shapes(model, pruned, images)


def test_pruning_is_deterministic_for_a_seed():
    model = make_tiny(0)
    images = random_images(80)
    a, rep_a = prune(model, images, 1.5, "random", seed=3, samples_per_image=4, progress=False)
    b, rep_b = prune(model, images, 1.5, "random", seed=3, samples_per_image=4, progress=False)
    assert [l.kept_indices for l in rep_a.layers] == [l.kept_indices for l in rep_b.layers]
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    # the original model is not modified
    assert model.conv2.out_channels == 12 and model.fc1.in_features == 64


def test_prune_accepts_an_iterable_of_batches():
    model = make_tiny(0)
    images = random_images(80)
    batches = [(images[i:i + 16], torch.zeros(16)) for i in range(0, 80, 16)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        a, _ = prune(model, images, 1.5, samples_per_image=4, progress=False)
        b, _ = prune(model, batches, 1.5, samples_per_image=4, progress=False)
        c, _ = prune(model, iter(batches), 1.5, samples_per_image=4, progress=False, batch_size=16)
    # the same samples (positions follow the image, not its batch): only the float32 summation
    # order differs between batch sizes 64 and 16
    assert rel_error(outputs(a, images), outputs(b, images)) < 1e-4
    assert torch.equal(outputs(b, images), outputs(c, images))  # a one-shot iterator, read once


class SameEvenCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 2, padding="same")
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.mean((2, 3)))


def test_prune_a_reader_with_same_padding_and_an_even_kernel():
    model = SameEvenCNN().eval()
    images = random_images(30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruned, errors, _, _ = prune_groups_directly(model, images, {"conv1": 4}, samples_per_image=64)
    assert pruned.conv2.in_channels == 4


def test_api_rejects_bad_requests_with_chanprune_error():
    model = make_tiny(0)
    images = random_images(20)
    nan_images = images.clone()
    nan_images[3, 1, 2, 2] = float("nan")
    cases = [
        dict(calib=images, speedup=0.5),
        dict(calib=images, speedup=1000.0),
        dict(calib=nan_images, speedup=1.5),
        dict(calib=images[:, :, :, 0], speedup=1.5),  # 3 dims
        dict(calib=images[:, :2], speedup=1.5),  # wrong channel count
        dict(calib=images[:0], speedup=1.5),  # empty
        dict(calib=images, speedup=1.5, method="nope"),
        dict(calib=images, speedup=1.5, allocation="nope"),
        dict(calib=images, speedup=None),  # neither speed-up nor widths
        dict(calib=images, speedup=1.5, samples_per_image=0),
        dict(calib=images, speedup=None, widths={"no_such_layer": 3}),
        dict(calib=images, speedup=None, widths={"conv2": 0}),
        dict(calib=images, speedup=None, widths={"conv2": 9}),  # more than the 8 channels conv2 reads
    ]
    for case in cases:
        calib = case.pop("calib")
        speedup = case.pop("speedup")
        with pytest.raises(ChanpruneError):
            prune(model, calib, speedup, progress=False, **case)


def test_auto_ridge_never_does_worse_on_held_out_samples_than_the_fixed_one():
    model = make_tiny(0)
    images = random_images(40)  # 4 held-out images, few samples per input: the fixed ridge overfits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _, fixed = prune(model, images, 2.0, samples_per_image=2, progress=False)
        _, auto = prune(model, images, 2.0, samples_per_image=2, progress=False, ridge="auto")
    fixed_errors = {layer.name: layer.rel_error_heldout for layer in fixed.layers if layer.rel_error_heldout is not None}
    auto_errors = {layer.name: layer.rel_error_heldout for layer in auto.layers if layer.rel_error_heldout is not None}
    assert fixed_errors.keys() == auto_errors.keys() and fixed_errors
    # the first layer sees the same inputs in both runs, so there the choice can only help
    first = next(iter(fixed_errors))
    assert auto_errors[first] <= fixed_errors[first] + 1e-9
    assert auto.config["ridge"] == "auto"


def test_bad_ridge_is_refused():
    with pytest.raises(ChanpruneError, match="ridge"):
        prune(make_tiny(0), random_images(20), 2.0, ridge="big", progress=False)


def test_round_to_gives_layers_in_whole_blocks_of_channels():
    model = make_tiny(5)  # widths 8, 12, 16
    images = random_images(60, seed=6)
    pruned, report = prune(model, images, 2.0, samples_per_image=5, round_to=2, progress=False)
    assert abs(report.speedup_achieved / 2.0 - 1) <= 0.02
    widths = [m.out_channels for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w % 2 == 0 for w in widths) and widths != [8, 12, 16]
    with pytest.raises(ChanpruneError, match="round_to"):
        prune(model, images, 2.0, round_to=0, progress=False)


def _snapshot(model: nn.Module) -> dict:
    """Everything about a model that pruning must leave alone."""
    return {
        "training": {n: m.training for n, m in model.named_modules()},
        "tensors": {n: (t.detach().clone(), t.requires_grad) for n, t in
                    [*model.named_parameters(), *model.named_buffers()]},
        "hooks": {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
                  for n, m in model.named_modules()},
        "modules": {n: type(m) for n, m in model.named_modules()},
    }


@pytest.mark.parametrize("maker", [make_tiny, lambda seed: randomise(create_model("resnet20-mnist"), seed)])
def test_prune_never_changes_the_callers_model(maker):
    model = maker(0)
    model.train()
    model.conv1.eval() if hasattr(model, "conv1") else None  # a mix of modes must come back as it was
    first = next(model.parameters())
    first.requires_grad_(False)
    handle = model.register_forward_hook(lambda m, i, o: None)
    before = _snapshot(model)
    channels = first_in_channels(model)
    images = torch.randn(40, channels, 8 if channels == 3 else 32, 8 if channels == 3 else 32,
                         generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruned, _ = prune(model, images, 1.5, samples_per_image=4, progress=False)
    after = _snapshot(model)
    assert after["training"] == before["training"]
    assert after["modules"] == before["modules"]
    assert after["hooks"].keys() == before["hooks"].keys()
    for name, hooks in before["hooks"].items():
        assert [list(h) for h in after["hooks"][name]] == [list(h) for h in hooks], name
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, (value, grad) in before["tensors"].items():
        now, now_grad = after["tensors"][name]
        assert now.dtype == value.dtype and now.shape == value.shape, name
        assert now.numpy().tobytes() == value.numpy().tobytes(), name
        assert now_grad == grad, name
    assert pruned is not model and count_params(pruned) < count_params(model)
    handle.remove()


def test_a_stem_that_rearranges_its_input_takes_the_model_s_own_input_channels():
    """TResNet's space-to-depth makes 48 channels of an RGB image before its first conv: 3-channel
    data must not be refused because the first conv reads 48; data the model cannot run still is."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(12, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4)).eval()
    x = torch.randn(40, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    pruned, report = prune(model, x, None, widths={"group:1": 5}, samples_per_image=4, progress=False)
    assert pruned[1].out_channels == pruned[3].in_channels == 5 and pruned(x).shape == (40, 4)
    with pytest.raises(ChanpruneError, match="has 1 channels but the model's first layer expects 12"):
        prune(model, torch.randn(4, 1, 16, 16), 1.5, progress=False)
