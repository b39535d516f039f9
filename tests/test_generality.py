"""Library CNNs pruned at 2x with lasso: a fast subset of ``benchmarks/generality.py`` at small input.

Each case builds a torchvision/timm constructor with random weights and prunes it on 4 random
32x32 images. ``CASES`` is an expected-status table: every model is either ``supported`` or
``refused`` with a substring of chanprune's ``ChanpruneError`` message. Any change fails the
test: a supported model that chanprune now refuses, a refused one with another message, and a
refused one that now prunes (the failure says to update the table), so support can neither
silently shrink nor silently grow.

Three checks per supported model:

- lasso at 2x: the pruned forward pass works, the output shape is unchanged and finite, the
  FLOPs ratio is within 5% of 2x, the provenance names the constructor and input shape;
- keep-all: reconstruction off and explicit widths equal to every unit's full width give a
  model whose output is bit-identical to the original's (equal in float64 up to summation order
  where channel shuffles were rewritten as slices, the plan's only steps);
- no reconstruction at 2x (``max_response``, which picks scattered channels): the pruned model
  computes exactly what the original computes when the removed channels are zeroed out of every
  layer that reads them. The removed channels come from the recorded surgery plan
  (``keep_inputs`` / ``select_inputs`` of each reader, composed in order, in the reader's
  original input coordinates; a Linear after ``flatten`` owns H*W features per channel). Zeroing
  the readers' input slices is the exact reference for every family here, channel selects
  (feature-map sampling), concatenations (googlenet, ghostnet) and gating multiplies
  (squeeze-excitation) included: a removed channel is removed from every reader, while writers
  and channel-wise followers (BatchNorm, depthwise convs) only lose entries no kept channel
  depends on. The comparison runs in float64, so only summation order differs.

The last two run on He-scaled random weights with random BatchNorm statistics
(``conftest.randomise``), so that every model's output depends on its input and on the removed
channels (checked), which some library initialisations do not give at this depth.

torchvision is imported through the benchmarks' set-up, which works around the CUDA wheel's
missing compiled operators (docs/generality.md); the cases skip when it is not installed.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from chanprune import ChanpruneError, load_model, prune, save_model
from chanprune.config import PruneConfig
from chanprune.experiment import constructor_model, load_model_spec
from chanprune.folding import FOLD_OP
from chanprune.functional_convs import CONV_MODULE_OP
from chanprune.graph import build_graph
from chanprune.io.provenance import provenance
from chanprune.io.references import ArchRef
from chanprune.shuffle import REWRITE_OPS
import chanprune.units as units_module
from chanprune.units import pruning_units

from conftest import in_float64, make_tiny, random_images, randomise, vision_libraries, zeroed_reference

pytestmark = pytest.mark.generality

TARGET = 2.0
N_IMAGES = 4
SAMPLES_PER_IMAGE = 2

SUPPORTED = ("supported", None)


def refused(message: str) -> tuple[str, str]:
    """Expected status of a model chanprune refuses: a substring of its ChanpruneError message."""
    return ("refused", message)


# (spec, input side, expected status): one model per family, the cheapest member, at the smallest
# practical input. densenet121 (~1 min) and convnext_tiny (several minutes) are left to the sweep.
# When a change makes a refused model prunable, or a supported one refused, update this table.
CASES = [
    ("torchvision:resnet18", 32, SUPPORTED),
    ("torchvision:mobilenet_v2", 32, SUPPORTED),
    ("torchvision:mobilenet_v3_small", 32, SUPPORTED),
    ("torchvision:efficientnet_b0", 32, SUPPORTED),
    ("torchvision:squeezenet1_0", 32, SUPPORTED),
    ("torchvision:shufflenet_v2_x0_5", 32, SUPPORTED),  # channel shuffles rewritten as slices
    ("torchvision:regnet_x_400mf", 32, SUPPORTED),  # grouped convs: pruned group by group
    ("torchvision:googlenet", 32, SUPPORTED),  # aux_logits off (chanprune's default for googlenet)
    ("timm:dla46_c", 32, SUPPORTED),
    ("timm:mobilenetv3_small_050", 32, SUPPORTED),
    ("timm:ghostnet_050", 32, SUPPORTED),
    ("timm:mixnet_s", 32, SUPPORTED),  # mixed-kernel convs: channels split into pieces, concatenated, added
    ("timm:fastvit_t8", 32, SUPPORTED),  # depthwise convs with a channel multiplier, layer scale on their blocks
    ("timm:mambaout_femto", 32, SUPPORTED),  # channels-last gated blocks: a split and a cat along the last axis
    ("timm:tf_efficientnet_b0", 32, SUPPORTED),  # Conv2dSame: padding computed in forward (traced as a leaf)
    ("timm:nf_regnet_b0", 32, SUPPORTED),  # weight-standardized convs, folded into plain ones
    ("timm:resnetblur18", 32, SUPPORTED),  # BlurPool2d: a functional depthwise conv, made a conv module
    ("timm:skresnet18", 32, SUPPORTED),  # selective kernels: paths stacked, attention viewed per path
    ("timm:gcresnet33ts", 32, SUPPORTED),  # global context: reshapes and a matrix product per channel
    ("timm:resnest14d", 32, SUPPORTED),  # split attention: a grouped conv's paths, a radix softmax
]
EXPECTED = {spec: status for spec, _, status in CASES}
EXPECTED["torchvision:squeezenet1_1"] = SUPPORTED  # the save/load and CLI round trips below
IDS = [c[0] for c in CASES]


@pytest.fixture(scope="module")
def libraries():
    return vision_libraries()


def images(size: int, n: int = N_IMAGES, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def build(spec: str, size: int, libraries, signal: bool = False) -> torch.nn.Module:
    """The constructor's model with random weights; with ``signal``, He-scaled weights and random
    BatchNorm statistics instead of the library's initialisation, under which some models
    (googlenet: conv weights of std 0.01) give nearly the same logits for every input, so that
    a wrongly removed channel would hardly show in the output."""
    if spec.startswith("timm:") and libraries[1] is None:
        pytest.skip("timm is not installed")
    torch.manual_seed(0)
    model = constructor_model(spec, (size, size))
    return randomise(model, 0) if signal else model


def as_expected(name: str, expected: tuple[str, str | None], run):
    """``run()`` (a pruning call) checked against the expected status: its result when the model
    is supported, None when it is refused with the expected message; a failure on any change."""
    status, message = expected
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # unpruned channels, few samples per input
            result = run()
    except ChanpruneError as err:
        if status == "supported":
            pytest.fail(f"{name} is listed as supported, but chanprune now refuses it: {err}")
        assert message in str(err), f"{name} is refused with another message than {message!r}: {err}"
        return None
    if status == "refused":
        pytest.fail(f"{name} now prunes, but the expected-status table says it is refused ({message!r}); "
                    f"update its entry in CASES (tests/test_generality.py) to SUPPORTED")
    return result


def prune_as_expected(spec: str, model: nn.Module, x: torch.Tensor, speedup: float | None = TARGET,
                      method: str = "lasso", **options):
    return as_expected(spec, EXPECTED[spec], lambda: prune(model, x, speedup, method, progress=False,
                                                           samples_per_image=SAMPLES_PER_IMAGE, **options))


def full_widths(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Every pruning unit at its full width, keyed as ``widths=`` takes them."""
    graph = build_graph(model, x[:1], warn=False)
    units = pruning_units(graph, PruneConfig())
    assert units, "the model has no pruning unit"
    return {(u.reader.name if u.reader else f"group:{u.name}"): u.channels for u in units}


@pytest.mark.parametrize("spec, size, expected", CASES, ids=IDS)
def test_prune_2x(spec, size, expected, libraries):
    model = build(spec, size, libraries)
    x = images(size)
    result = prune_as_expected(spec, model, x)
    if result is None:  # refused with the expected message
        return
    pruned, report = result
    with torch.no_grad():
        before, after = model(x), pruned(x)
    assert after.shape == before.shape
    assert torch.isfinite(after).all()
    achieved = report.flops_before / report.flops_after
    assert abs(achieved / TARGET - 1) <= 0.05, f"{spec}: {achieved:.3f}x instead of {TARGET}x"
    assert provenance(pruned).arch == ArchRef("constructor", spec, provenance(model).arch.kwargs)
    assert provenance(pruned).input_shape == (3, size, size)


@pytest.mark.parametrize("spec, size, expected", CASES, ids=IDS)
def test_keep_all_is_identical(spec, size, expected, libraries, monkeypatch):
    """Reconstruction off and every unit at its full width: the same function, bit for bit.
    (Every unit is named, so none may be left whole because the machine's free memory is low at
    the time: ``test_engine`` tests that guard.)"""
    monkeypatch.setattr(units_module, "available_memory", lambda device: 1 << 40)
    model = build(spec, size, libraries, signal=True)
    x = images(size)
    result = as_expected(spec, expected, lambda: prune(
        model, x, None, "lasso", progress=False, samples_per_image=SAMPLES_PER_IMAGE,
        widths=full_widths(model, x), reconstruct=False))
    if result is None:
        return
    pruned, report = result
    plan = provenance(pruned).plan
    assert all(op.op in (*REWRITE_OPS, FOLD_OP, CONV_MODULE_OP) for op in plan)  # steps on the trace only
    assert report.flops_after == report.flops_before
    assert pruned is not model
    if not plan:
        with torch.no_grad():
            assert torch.equal(pruned(x), model(x))
    else:  # permuted channels: equal up to summation order; folded convs: up to their float32 weights
        tol = 1e-5 if any(op.op == FOLD_OP for op in plan) else 1e-10
        torch.testing.assert_close(in_float64(pruned, x), in_float64(model, x), rtol=tol, atol=tol)


@pytest.mark.parametrize("spec, size, expected", CASES, ids=IDS)
def test_no_reconstruction_equals_zeroed_channels(spec, size, expected, libraries):
    """Reconstruction off at 2x: the pruned model is the original with the removed channels
    zeroed out of every layer that reads them (see the module docstring)."""
    model = build(spec, size, libraries, signal=True)
    x = images(size)
    result = prune_as_expected(spec, model, x, method="max_response", reconstruct=False)
    if result is None:
        return
    pruned, report = result
    reference, zeroed = zeroed_reference(model, provenance(pruned).plan)
    assert zeroed > 0, "nothing was pruned"
    x64 = x.double()
    with torch.no_grad():
        expected_out = reference.double()(x64)
        got = copy.deepcopy(pruned).double()(x64)
        original = copy.deepcopy(model).double()(x64)
    scale = float(expected_out.abs().max())
    torch.testing.assert_close(got, expected_out, rtol=1e-9, atol=1e-9 * scale)
    # the check has teeth: the removed channels and the input change the output by far more than
    # the tolerance above (1e-9 of the largest logit)
    assert not torch.allclose(original, expected_out, rtol=1e-6, atol=1e-6 * scale)
    assert not torch.allclose(expected_out[0], expected_out[1], rtol=1e-6, atol=1e-6 * scale)


def test_expected_status_table_fails_on_any_change():
    """The table's check is live: a supported model refused, a refused model pruning, and a
    refusal with another message all fail; the expected refusal passes."""

    class DataDependent(nn.Module):  # python control flow on tensor values: torch.fx cannot trace it
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            y = self.conv(x)
            return self.fc((y if y.sum() > 0 else -y).mean((2, 3)))

    x = random_images(4)

    def run(model):
        return lambda: prune(model, x, 1.5, "first_k", progress=False, samples_per_image=2)

    untraceable, tiny = DataDependent().eval(), make_tiny(0)
    assert as_expected("DataDependent", refused("cannot trace"), run(untraceable)) is None
    with pytest.raises(pytest.fail.Exception, match="now refuses it"):
        as_expected("DataDependent", SUPPORTED, run(untraceable))
    with pytest.raises(AssertionError, match="another message"):
        as_expected("DataDependent", refused("out of memory"), run(untraceable))
    with pytest.raises(pytest.fail.Exception, match="update its entry in CASES"):
        as_expected("TinyCNN", refused("cannot trace"), run(tiny))
    assert as_expected("TinyCNN", SUPPORTED, run(tiny)) is not None


def test_pruned_constructor_model_round_trip(tmp_path, libraries):
    model = build("torchvision:squeezenet1_1", 32, libraries)
    x = images(32)
    pruned, _ = prune_as_expected("torchvision:squeezenet1_1", model, x)
    assert provenance(pruned).plan, "nothing was pruned"
    path = tmp_path / "pruned.safetensors"
    save_model(pruned, path)
    loaded = load_model(path)
    assert provenance(loaded).arch.to_json() == {"constructor": "torchvision:squeezenet1_1", "kwargs": {}}
    assert provenance(loaded).plan == provenance(pruned).plan
    assert list(loaded.state_dict()) == list(pruned.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))


def test_cli_prunes_a_constructor_spec(tmp_path, libraries):
    """`chanprune prune --model torchvision:NAME` with a folder of images resized by --input-size."""
    from PIL import Image

    from chanprune.cli import main

    assert EXPECTED["torchvision:squeezenet1_1"] == SUPPORTED
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out, report = tmp_path / "sq.safetensors", tmp_path / "report.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = CliRunner().invoke(main, ["prune", "--model", "torchvision:squeezenet1_1", "--speedup", "2",
                                           "--calib-data", str(folder), "--input-size", "32", "32",
                                           "--samples-per-image", str(SAMPLES_PER_IMAGE),
                                           "--out", str(out), "--report", str(report)])
    assert result.exit_code == 0, f"torchvision:squeezenet1_1 is listed as supported: {result.output}"
    loaded = load_model_spec(str(out))
    assert loaded.constructor == "torchvision:squeezenet1_1"
    assert provenance(loaded.model).input_shape == (3, 32, 32)
    with torch.no_grad():
        assert loaded.model(images(32)).shape == (N_IMAGES, 1000)
    evaluated = CliRunner().invoke(main, ["eval", "--model", str(out)])
    assert evaluated.exit_code == 0, evaluated.output
    assert "flops" in evaluated.output


def test_split_pieces_are_pruned_and_their_cuts_moved(libraries):
    """timm's MixedConv2d splits its input into pieces (``torch.split`` with fixed sizes) read by
    convs of different kernels: the pieces themselves lose channels, and the pruned model's splits
    cut at the new widths."""
    model, x = build("timm:mixnet_s", 32, libraries), images(32)
    graph = build_graph(model, x[:1], warn=False)
    pieces = {g for writer, layout in graph.out_layouts.items() for g in layout if len(layout) > 1}
    assert len(pieces) >= 20 and any(cut.node.startswith("split") for cut in graph.cuts)
    pruned, report = prune_as_expected("timm:mixnet_s", model, x)
    cuts = [op for op in provenance(pruned).plan if op.op == "cut_channels"]
    assert cuts, "no split was moved: the pieces were not pruned"
    last = {op.layer: op for op in cuts}  # a split moves each time one of its pieces is pruned
    for op in last.values():
        node = next(n for n in pruned.graph.nodes if n.name == op.layer)
        sizes = node.args[1]
        assert list(op.keep[1:]) == [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    assert abs(report.flops_before / report.flops_after / TARGET - 1) <= 0.05
    assert pruned.pretrained_cfg == model.pretrained_cfg  # the trace keeps the model's plain settings


def test_channel_shuffles_are_pruned_through(libraries):
    """ShuffleNet v2's channel shuffles become slices of their input: no group is left unpruned by
    them, the convs that read shuffled channels (a chunk of them, or all of them) lose inputs, and
    the pruned model has no shuffle left."""
    spec = "torchvision:shufflenet_v2_x0_5"
    model, x = build(spec, 32, libraries), images(32)
    graph = build_graph(model, x[:1], warn=False)
    assert sum(r.op == "slice_shuffle" for r in graph.rewrites) == 16  # every unit's shuffle
    assert [g.blocked_by for g in graph.groups if g.blocked_by] == [["its channels are a model output"]]
    pruned, report = prune_as_expected(spec, model, x)
    for name in ("stage2.1.branch2.0", "stage3.0.branch1.2", "conv5.0"):  # after a chunk, a shuffle, the last
        assert pruned.get_submodule(name).in_channels < model.get_submodule(name).in_channels, name
    assert not any(n.target == "transpose" or n.target is torch.transpose for n in pruned.graph.nodes)
    assert abs(report.flops_before / report.flops_after / TARGET - 1) <= 0.05


def test_channels_last_gates_lose_hidden_channels(libraries):
    """MambaOut's gated blocks split fc1's channels-last output into a gate and two pieces that are
    concatenated along the last axis again (it was refused: nothing prunable): the hidden channels
    of every block now lose channels."""
    spec = "timm:mambaout_femto"
    model, x = build(spec, 32, libraries), images(32)
    pruned, report = prune_as_expected(spec, model, x)
    hidden = [name for name, m in model.named_modules() if name.endswith(".fc2")]
    assert hidden and all(pruned.get_submodule(n).in_features < model.get_submodule(n).in_features for n in hidden)
    assert abs(report.flops_before / report.flops_after / TARGET - 1) <= 0.05


def test_ghost_modules_lose_channels_in_both_copies(libraries):
    """timm's Ghost module concatenates a primary conv's output with a depthwise copy of it, so the
    next layers hold that group twice: the primary convs lose channels (they were left whole, and
    ghostnet_050 was refused at 2x), and the pruned model is exact where it kept every channel."""
    spec = "timm:ghostnet_050"
    model, x = build(spec, 32, libraries, signal=True), images(32)
    graph = build_graph(model, x[:1], warn=False)
    assert sum(len(layout) != len(set(layout)) for layout in graph.layouts.values()) >= 20
    pruned, report = prune_as_expected(spec, model, x)
    primaries = [n for n, m in model.named_modules() if n.endswith("primary_conv.0")]
    narrowed = [n for n in primaries if pruned.get_submodule(n).out_channels < model.get_submodule(n).out_channels]
    assert len(narrowed) >= 8  # none before: every group a Ghost module concatenates was blocked
    assert abs(report.flops_before / report.flops_after / TARGET - 1) <= 0.05


def test_channel_multiplier_convs_lose_whole_blocks(libraries):
    """timm's FastViT downsamples with depthwise convs that double the channels (``groups ==
    in_channels``): the channels before them are pruned, each taking its block of outputs with
    it, and the convs stay depthwise (they, and the trunks after them, were left whole)."""
    spec = "timm:fastvit_t8"
    model, x = build(spec, 32, libraries, signal=True), images(32)
    pruned, report = prune_as_expected(spec, model, x)
    multipliers = [n for n, m in model.named_modules()
                   if isinstance(m, nn.Conv2d) and m.groups == m.in_channels and m.out_channels > m.in_channels]
    assert len(multipliers) >= 6
    narrowed = [n for n in multipliers if pruned.get_submodule(n).in_channels < model.get_submodule(n).in_channels]
    assert narrowed
    for name in narrowed:
        after = pruned.get_submodule(name)
        assert after.groups == after.in_channels and after.out_channels == 2 * after.in_channels
    assert abs(report.flops_before / report.flops_after / TARGET - 1) <= 0.05


def test_grouped_conv_inputs_are_pruned_group_by_group(libraries):
    """RegNet's 3x3 convs (groups of 16 channels): the channels they read and write lose as many in
    every conv group, and the convs stay grouped."""
    spec = "torchvision:regnet_x_400mf"
    model, x = build(spec, 32, libraries), images(32)
    pruned, _ = prune_as_expected(spec, model, x)
    plan = provenance(pruned).plan
    for side in ("keep_inputs", "keep_outputs"):
        narrowed = {op.layer for op in plan if op.op == side and getattr(model.get_submodule(op.layer), "groups", 1) > 1}
        assert narrowed, f"no grouped conv lost channels ({side})"
        for name in narrowed:
            before, after = model.get_submodule(name), pruned.get_submodule(name)
            assert after.groups == before.groups
            assert after.in_channels % after.groups == 0 and after.out_channels % after.groups == 0
            assert (after.in_channels, after.out_channels) != (before.in_channels, before.out_channels)


def test_stochastic_depth_passes_channels_so_trunks_prune(libraries):
    """torchvision's stochastic_depth scales whole samples: the residual trunks behind it are
    pruned (they were left whole while it blocked them)."""
    model = build("torchvision:efficientnet_b0", 32, libraries)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = build_graph(model, images(32)[:1])
    assert not [w for w in caught if "stochastic_depth" in str(w.message)]
    trunks = [g for g in graph.prunable() if g.residual]
    assert len(trunks) == 5
    _, report = prune(model, images(32), 2.0, trunk="joint", allocation="uniform",  # global keeps them here
                      samples_per_image=SAMPLES_PER_IMAGE, progress=False)
    assert any(layer.kind == "trunk" and layer.in_channels_after < layer.in_channels_before
               for layer in report.layers)


def test_weight_standardized_convs_are_folded_and_pruned(libraries):
    """NF-RegNet's ScaledStdConv2d standardize their weights in forward, so they could not be
    refitted and the model was refused (1.01x reachable): each is folded into a plain conv, and
    the convs of every block lose input channels."""
    spec = "timm:nf_regnet_b0"
    model, x = build(spec, 32, libraries), images(32)
    std = [name for name, m in model.named_modules() if type(m).__name__ == "ScaledStdConv2d"]
    pruned, report = prune_as_expected(spec, model, x)
    folds = [op.layer for op in provenance(pruned).plan if op.op == FOLD_OP]
    assert std and folds == std
    assert all(type(pruned.get_submodule(n)) is nn.Conv2d for n in std)
    def shape(m: nn.Module) -> tuple[int, int]:
        return m.in_channels, m.out_channels

    narrowed = [n for n in std if shape(pruned.get_submodule(n)) != shape(model.get_submodule(n))]
    assert len(narrowed) > len(std) / 2 and "final_conv" in narrowed
    assert abs(report.flops_before / report.flops_after / TARGET - 1) <= 0.05


def test_blur_pools_are_followed_so_the_layers_around_them_prune(libraries):
    """ResNet-blur's BlurPool2d filters each channel with F.conv2d (a functional call, so the stem and
    every downsampling block's channels stayed whole): each becomes a depthwise conv module that
    narrows with the channels it filters."""
    spec = "timm:resnetblur18"
    model, x = build(spec, 32, libraries), images(32)
    pruned, report = prune_as_expected(spec, model, x, allocation="uniform")
    blurs = [op.layer for op in provenance(pruned).plan if op.op == CONV_MODULE_OP]
    assert len(blurs) == 4
    groups = [pruned.get_submodule(n).groups for n in blurs]
    assert all(g < before for g, before in zip(groups, (64, 128, 256, 512))), groups
    assert all(pruned.get_submodule(n).in_channels == pruned.get_submodule(n).out_channels == g
               for n, g in zip(blurs, groups))
    assert pruned.conv1.out_channels == groups[0]  # the stem, filtered by the first blur
    assert abs(report.flops_before / report.flops_after / TARGET - 1) <= 0.05


def test_selective_kernel_paths_and_their_attention_lose_channels(libraries):
    """SK-ResNet stacks its paths, views the attention conv's output as (paths, channels) and sums
    the weighted paths: each block's paths and attention lose the same channels (they were all
    left whole while ``stack`` blocked them)."""
    spec = "timm:skresnet18"
    model, x = build(spec, 32, libraries), images(32)
    pruned, report = prune_as_expected(spec, model, x, allocation="uniform")
    blocks = [n for n, m in model.named_modules() if type(m).__name__ == "SelectiveKernel"]
    assert len(blocks) == 8
    for name in blocks:
        paths = [f"{name}.paths.{i}.conv" for i in range(len(model.get_submodule(name).paths))]
        (width,) = {pruned.get_submodule(p).out_channels for p in paths}
        assert width < model.get_submodule(paths[0]).out_channels, name
        assert pruned.get_submodule(f"{name}.attn.fc_select").out_channels == len(paths) * width, name
    assert abs(report.flops_before / report.flops_after / TARGET - 1) <= 0.05


def test_split_attention_paths_and_their_attention_lose_channels(libraries):
    """ResNeSt writes its paths with one grouped conv (a conv group per path), views them as
    (paths, channels) and weights them by a softmax over the paths of an attention conv's output
    (viewed, transposed and merged back): each block's grouped conv keeps the same channels in
    every path and its attention conv loses them too (both were whole while the views blocked)."""
    spec = "timm:resnest14d"
    model, x = build(spec, 32, libraries), images(32)
    pruned, report = prune_as_expected(spec, model, x, allocation="uniform")
    blocks = [n for n, m in model.named_modules() if type(m).__name__ == "SplitAttn"]
    assert len(blocks) == 4
    for name in blocks:
        conv, before = pruned.get_submodule(f"{name}.conv"), model.get_submodule(f"{name}.conv")
        assert conv.groups == before.groups == 2 and conv.out_channels < before.out_channels, name
        assert pruned.get_submodule(f"{name}.fc2").out_channels == conv.out_channels, name
    assert abs(report.flops_before / report.flops_after / TARGET - 1) <= 0.05


def test_the_sweep_runs_each_target_in_a_child_and_continues_where_it_stopped(tmp_path, libraries):
    """``benchmarks.generality``: one row per target, each pruned in a child process under its own
    time limit (a target that runs out of time is a ``timeout`` row, not a lost model); a rerun
    skips the saved rows, ``--force`` adds new ones."""
    import json

    from benchmarks import generality

    out = tmp_path / "sweep"
    args = ["--models", "torchvision:squeezenet1_1", "--input-size", "64", "--images", "8", "--bn-images", "8",
            "--out", str(out)]
    rows_path = out.with_suffix(".rows.jsonl")

    def rows() -> list[dict]:
        return [json.loads(line) for line in rows_path.read_text().splitlines()]

    generality.main(args)
    assert [(r["target"], r["status"]) for r in rows()] == [(2.0, "ok"), (4.0, "ok")]
    assert all(abs(r["speedup"] / r["target"] - 1) <= 0.05 and r["time_ratio"] > 0 for r in rows())
    generality.main(args)
    assert len(rows()) == 2  # nothing was run again
    generality.main([*args, "--force", "--timeout", "0.001"])
    assert [(r["target"], r["status"]) for r in rows()[2:]] == [(2.0, "timeout"), (4.0, "timeout")]
    table = out.with_suffix(".md").read_text()
    assert "squeezenet1_1" in table and "timeout" in table


def test_the_sweep_summary_counts_statuses_times_and_the_peer():
    """The sentence under the table: ok among all and among the models run, the other statuses,
    the median and largest prune time over a forward pass, and Torch-Pruning's statuses."""
    from benchmarks.generality import summary

    def row(status: str, ratio: float | None = None, peer: str | None = None) -> dict:
        r = {"target": 2.0, "status": status, "supported": status == "ok", "peer": peer and {"status": peer}}
        return {**r, "time_ratio": ratio} if ratio is not None else r

    rows = [row("ok", 10.0, "ok"), row("ok", 30.0, "failed"), row("ok", 12.0, "ok"), row("refused", None, "ok"),
            row("not run"), {**row("ok", 99.0), "target": 4.0}]
    assert summary(rows, 2.0, True) == (
        "At 2x: 3 of 5 models ok (forward pass works, output shape unchanged and finite, FLOPs ratio within 5% "
        "of the target), 3 of the 4 run (75.0%); 1 not run, 1 refused; prune time 12.0x a forward pass at the "
        "median, 30x at most; Torch-Pruning on the same models: 3 ok, 1 failed.")


def test_global_context_blocks_lose_channels_with_the_convs_they_follow(libraries):
    """GC-ResNet pools each channel with an attention map through reshapes and a matrix product,
    then adds a transformed context back: the convs before every GC block and the context's last
    conv narrow together (they were whole while the reshape blocked them)."""
    spec = "timm:gcresnet33ts"
    model, x = build(spec, 32, libraries), images(32)
    pruned, report = prune_as_expected(spec, model, x, allocation="uniform")
    blocks = [n for n, m in model.named_modules() if type(m).__name__ == "GlobalContext"]
    assert len(blocks) == 10
    for name in blocks:
        conv = name.replace(".attn", ".conv2_kxk.conv")
        width = pruned.get_submodule(conv).out_channels
        assert width < model.get_submodule(conv).out_channels, name
        assert pruned.get_submodule(f"{name}.mlp_add.fc2").out_channels == width, name
    assert abs(report.flops_before / report.flops_after / TARGET - 1) <= 0.05
