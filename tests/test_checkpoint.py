"""save_model -> load_model gives the same model; bad files raise ChanpruneError."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import save_file

from chanprune.io.checkpoint import FORMAT, load_model, save_model
from chanprune.io.provenance import provenance
from chanprune.io.state_file import load_state_file, save_state_file
from chanprune.surgery import PlanOp
from chanprune.errors import ChanpruneError
from chanprune.models import create_model
from chanprune.pruner import prune

from conftest import TinyCNN, make_tiny, outputs, random_images


@pytest.fixture(scope="module")
def pruned_tiny():
    model = make_tiny(0)
    images = random_images(150)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruned, report = prune(model, images, 1.5, samples_per_image=6, progress=False)
    return model, pruned, images


def assert_same_model(a, b, x):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert torch.equal(outputs(a, x), outputs(b, x))


def test_save_load_pruned_model_with_an_added_bias(pruned_tiny, tmp_path):
    original, pruned, images = pruned_tiny
    # conv3 had neither BN nor bias: reconstruction gave it one, and the plan records that
    assert original.conv3.bias is None and pruned.conv3.bias is not None
    assert PlanOp("add_bias", "conv3") in provenance(pruned).plan
    assert provenance(pruned).arch.kind == "class" and provenance(pruned).arch.name.endswith(":TinyCNN")
    path = tmp_path / "sub" / "tiny.safetensors"
    save_model(pruned, path)
    assert [p.name for p in path.parent.iterdir()] == ["tiny.safetensors"]  # no temporary files left
    loaded = load_model(path, trust=True)
    assert isinstance(loaded, TinyCNN) and not loaded.training
    assert loaded.conv3.bias is not None
    assert provenance(loaded).plan == provenance(pruned).plan
    assert provenance(loaded).input_shape == (3, 8, 8)
    assert_same_model(pruned, load_model(path, model=TinyCNN()), images)  # the caller supplies the class
    assert_same_model(pruned, loaded, images)


def test_prune_a_loaded_model_again_and_round_trip(pruned_tiny, tmp_path):
    _, pruned, images = pruned_tiny
    save_model(pruned, tmp_path / "a.safetensors")
    first = load_model(tmp_path / "a.safetensors", trust=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        # widths name the reader: conv2 keeps 3 input channels, so conv1 keeps 3 filters
        again, report = prune(first, images, None, widths={"conv2": 3}, samples_per_image=6, progress=False)
    assert again.conv1.out_channels == 3 and again.conv2.in_channels == 3
    assert len(provenance(again).plan) > len(provenance(pruned).plan)
    assert provenance(again).plan[: len(provenance(pruned).plan)] == provenance(pruned).plan
    save_model(again, tmp_path / "b.safetensors")
    assert_same_model(again, load_model(tmp_path / "b.safetensors", trust=True), images)


def test_save_load_bundled_vgg_pruned_in_one_layer(tmp_path):
    model = create_model("vgg16-mnist")
    images = torch.randn(16, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruned, _ = prune(model, images, None, widths={"features.conv1_2.conv": 20}, samples_per_image=8,
                          progress=False)
    assert pruned.features.conv1_1.conv.out_channels == 20
    assert pruned.features.conv1_2.conv.in_channels == 20
    path = tmp_path / "vgg.safetensors"
    save_model(pruned, path)
    loaded = load_model(path)
    assert provenance(loaded).arch.to_json() == {"bundled": "vgg16-mnist"}
    assert_same_model(pruned, loaded, images)


def test_missing_and_corrupt_files(tmp_path, pruned_tiny):
    with pytest.raises(ChanpruneError, match="does not exist"):
        load_model(tmp_path / "nope.safetensors")
    rng = torch.Generator().manual_seed(0)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=rng, dtype=torch.uint8).tolist()))
    with pytest.raises(ChanpruneError, match="corrupt"):
        load_model(garbage)
    tiny = tmp_path / "tiny_file.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(ChanpruneError):
        load_model(tiny)
    # a real checkpoint cut in half
    _, pruned, _ = pruned_tiny
    good = tmp_path / "good.safetensors"
    save_model(pruned, good)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: os.path.getsize(good) // 2])
    with pytest.raises(ChanpruneError):
        load_model(cut)
    with pytest.raises(ChanpruneError):
        load_state_file(tmp_path)  # a directory


def write_with_meta(path, metadata):
    save_file({"w": torch.zeros(2)}, str(path), metadata=metadata)


@pytest.mark.parametrize("metadata", [
    None,  # a plain safetensors file
    {"chanprune": json.dumps({"format": "something-else/9"})},
    {"chanprune": "{not json"},
    {"other": "x"},
])
def test_wrong_header_is_a_chanprune_error(tmp_path, metadata):
    path = tmp_path / "m.safetensors"
    write_with_meta(path, metadata)
    with pytest.raises(ChanpruneError):
        load_model(path)


@pytest.mark.parametrize("meta", [[1, 2], {"format": FORMAT}])
def test_malformed_header_structure_is_a_chanprune_error(tmp_path, meta):
    path = tmp_path / "m.safetensors"
    write_with_meta(path, {"chanprune": json.dumps(meta)})
    with pytest.raises(ChanpruneError):
        load_model(path)


def test_header_naming_an_unknown_architecture_or_mismatched_weights(tmp_path, pruned_tiny):
    _, pruned, _ = pruned_tiny
    path = tmp_path / "m.safetensors"
    save_state_file(path, pruned.state_dict(), {"format": FORMAT, "arch": {"class": "no_such_module:Net"}, "plan": []})
    with pytest.raises(ChanpruneError, match="architecture|no_such_module"):
        load_model(path, trust=True)
    # the right class but no plan: the pruned weights do not fit the unpruned architecture
    save_state_file(path, pruned.state_dict(), {"format": FORMAT, "arch": provenance(pruned).arch.to_json(), "plan": []})
    with pytest.raises(ChanpruneError, match="do not match"):
        load_model(path, trust=True)
    save_state_file(path, pruned.state_dict(), {"format": FORMAT, "arch": {"bundled": "resnet-9000"}, "plan": []})
    with pytest.raises(ChanpruneError):
        load_model(path)
