"""Model specs ``torchvision:NAME`` / ``timm:NAME``: parsing, clear errors, and save/load round trips."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from chanprune.io import libraries
from chanprune.io.checkpoint import load_model, save_model
from chanprune.io.provenance import provenance
from chanprune.io.references import ArchRef, build_architecture, parse_constructor
from chanprune.io.state_file import load_state_file
from chanprune.errors import ChanpruneError
from chanprune.flops import count_flops
from chanprune.experiment import calibration_images, constructor_model, load_model_spec

from conftest import randomise, vision_libraries


def vision():
    """torchvision (and timm, or None); skip without them."""
    return vision_libraries()


# ---------------------------------------------------------------- parsing (no torchvision needed)


@pytest.mark.parametrize("spec, parsed", [
    ("torchvision:resnet50", ("torchvision", "resnet50")),
    ("timm:resnet50", ("timm", "resnet50")),
    ("timm:resnet50.a1_in1k", ("timm", "resnet50.a1_in1k")),
    ("vgg16-mnist", None),
    ("pruned.safetensors", None),
    ("runs/a:b/model.safetensors", None),
    ("keras:resnet50", None),
    ("C:/models/net.safetensors", None),
])
def test_parse_constructor(spec, parsed):
    assert parse_constructor(spec) == parsed


@pytest.mark.parametrize("spec", ["torchvision:", "timm:", "timm:  "])
def test_constructor_without_a_name(spec):
    with pytest.raises(ChanpruneError, match=r"NAME.*list"):
        parse_constructor(spec)
    with pytest.raises(ChanpruneError, match="NAME"):
        load_model_spec(spec)


def test_unknown_spec_mentions_constructors(tmp_path):
    with pytest.raises(ChanpruneError, match="torchvision:NAME or timm:NAME"):
        load_model_spec(str(tmp_path / "nothing-here"))


@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_library_not_installed(monkeypatch, source):
    monkeypatch.setitem(sys.modules, source, None)  # makes `import source` fail as if it were not installed
    with pytest.raises(ChanpruneError, match=rf"need {source}, which is not installed; pip install {source}"):
        load_model_spec(f"{source}:resnet18")


def test_library_that_fails_to_import(monkeypatch):
    def broken(name, *args, **kwargs):
        raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setattr(libraries.importlib, "import_module", broken)
    with pytest.raises(ChanpruneError) as info:
        load_model_spec("torchvision:resnet18")
    message = str(info.value)
    assert "installed but cannot be imported" in message and "torchvision::nms" in message
    assert "download.pytorch.org/whl/cpu" in message
    with pytest.raises(ChanpruneError, match="timm build that matches"):
        load_model_spec("timm:resnet18")


# ---------------------------------------------------------------- building (torchvision installed)


@pytest.mark.parametrize("spec, name", [("torchvision:resnet5", "resnet50"), ("timm:resnet5", "resnet50"),
                                        ("torchvision:mobilenetv2", "mobilenet_v2")])
def test_unknown_name_suggests_and_says_how_to_list(spec, name):
    _, timm = vision()
    if spec.startswith("timm") and timm is None:
        pytest.skip("timm is not installed")
    with pytest.raises(ChanpruneError) as info:
        load_model_spec(spec)
    message = str(info.value)
    assert "unknown" in message and "did you mean" in message and name in message
    assert "list_models(" in message


def test_bad_constructor_arguments():
    vision()
    with pytest.raises(ChanpruneError, match="takes no argument 'no_such_argument'; it accepts .*num_classes"):
        constructor_model("torchvision:resnet18", no_such_argument=3)
    with pytest.raises(ChanpruneError, match="cannot build torchvision:resnet18 with arguments"):
        constructor_model("torchvision:resnet18", num_classes="ten")  # accepted name, value the class rejects


def test_torchvision_spec_records_its_architecture():
    vision()
    loaded = load_model_spec("torchvision:resnet18")
    assert loaded.entry is None and loaded.constructor == "torchvision:resnet18"
    assert not loaded.model.training
    assert provenance(loaded.model).to_json() == {"arch": {"constructor": "torchvision:resnet18", "kwargs": {}}, "plan": [],
                                       "input_shape": [3, 224, 224]}
    # the input size a model was made for: inception_v3 299, efficientnet_b3 300; or what the caller asks
    assert provenance(load_model_spec("torchvision:inception_v3").model).input_shape == (3, 299, 299)
    assert provenance(load_model_spec("torchvision:resnet18", input_size=(64, 48)).model).input_shape == (3, 64, 48)
    googlenet = load_model_spec("torchvision:googlenet").model
    assert googlenet.aux1 is None  # training-only auxiliary heads are off by default
    assert provenance(googlenet).arch.kwargs == {"aux_logits": False, "init_weights": True}


def test_timm_spec_records_its_architecture():
    _, timm = vision()
    if timm is None:
        pytest.skip("timm is not installed")
    model = constructor_model("timm:mobilenetv3_small_050", num_classes=7)
    assert provenance(model).arch == ArchRef("constructor", "timm:mobilenetv3_small_050", {"num_classes": 7})
    assert provenance(model).input_shape == (3, 224, 224)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_constructor_spec_without_calibration_data_asks_for_it():
    vision()
    loaded = load_model_spec("torchvision:squeezenet1_1")
    with pytest.raises(ChanpruneError, match=r"--data DIR.*--calib-data.*--input-size H W"):
        calibration_images(loaded, None, None, 0, None)
    from chanprune.cli import main

    result = CliRunner().invoke(main, ["prune", "--model", "torchvision:squeezenet1_1", "--speedup", "2",
                                       "--out", "never.safetensors", "--report", "never.json"])
    assert result.exit_code == 2
    assert "torchvision:squeezenet1_1 has no data set of its own; pass --data DIR" in result.output
    assert "--calib-data" in result.output


def test_constructor_spec_with_calibration_tensor(tmp_path):
    vision()
    images = torch.randn(3, 3, 40, 40)
    torch.save(images, tmp_path / "calib.pt")
    loaded = load_model_spec("torchvision:squeezenet1_1")
    assert torch.equal(calibration_images(loaded, str(tmp_path / "calib.pt"), None, 0, None), images)


def test_cli_prunes_a_library_model_in_a_fresh_interpreter(tmp_path):
    """`chanprune prune --model torchvision:...` imports torchvision itself (next to the CPU torch,
    the compiled-operator workaround lives in the library), with nothing imported beforehand."""
    vision()
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    done = subprocess.run([sys.executable, "-m", "chanprune", "prune", "--model", "torchvision:resnet18",
                           "--calib-data", str(folder), "--input-size", "32", "32", "--speedup", "2",
                           "--out", str(tmp_path / "r18.safetensors"), "--report", str(tmp_path / "r18.json")],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    pruned = load_model(tmp_path / "r18.safetensors")
    assert provenance(pruned).arch == ArchRef("constructor", "torchvision:resnet18", {})
    report = json.loads((tmp_path / "r18.json").read_text())
    assert abs(report["speedup_achieved"] / 2 - 1) <= 0.02
    assert count_flops(pruned, (1, 3, 32, 32)) < count_flops(constructor_model("torchvision:resnet18"), (1, 3, 32, 32))


# ---------------------------------------------------------------- save / load round trips


def assert_same(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize("spec, kwargs", [
    ("torchvision:squeezenet1_1", {}),
    ("torchvision:mobilenet_v3_small", {"num_classes": 10}),
    ("timm:mobilenetv3_small_050", {"num_classes": 5}),
])
def test_unpruned_constructor_model_round_trip(tmp_path, spec, kwargs):
    _, timm = vision()
    if spec.startswith("timm") and timm is None:
        pytest.skip("timm is not installed")
    model = randomise(constructor_model(spec, (32, 32), **kwargs), seed=3)  # BN statistics that matter
    path = tmp_path / "model.safetensors"
    save_model(model, path)
    loaded = load_model(path)
    assert type(loaded) is type(model) and not loaded.training
    assert provenance(loaded) == provenance(model)
    assert provenance(loaded).arch.to_json() == {"constructor": spec, "kwargs": kwargs}
    assert_same(model, loaded, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert load_state_file(path)[1]["arch"] == {"constructor": spec, "kwargs": kwargs}
    # and the spec loader reads it back as a constructor model
    again = load_model_spec(str(path))
    assert again.constructor == spec and again.entry is None


def test_architecture_reference_errors():
    vision()
    with pytest.raises(ChanpruneError, match="unknown torchvision classification model"):
        build_architecture(ArchRef("constructor", "torchvision:no_such_net"))
    with pytest.raises(ChanpruneError, match="not a constructor reference"):
        build_architecture(ArchRef("constructor", "keras:resnet50"))
