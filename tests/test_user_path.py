"""A user's own model and data through the command line: a torchvision model with trained weights
(--weights), a labelled ImageFolder tree (--data), prune -> eval -> finetune -> eval -> export, the
report files, and the errors of the pieces that can go wrong (weights, devices, missing extras)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from chanprune.cli import main
from chanprune.devices import resolve_device
from chanprune.errors import ChanpruneError
from chanprune.experiment import constructor_model
from chanprune.folders import folder_splits, make_preprocess
from chanprune.io.checkpoint import load_model, load_original
from chanprune.io.provenance import provenance
from chanprune.io.weights import load_weights
from chanprune.train import TrainConfig, train

from conftest import vision_libraries

ROOT = Path(__file__).parents[1]


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def write_tree(root: Path, per_class: int = 12, classes: int = 3, size: int = 16) -> None:
    """Classes told apart by which third of the image is bright, plus noise."""
    rng = np.random.default_rng(0)
    for part, count in (("train", per_class), ("val", per_class // 2), ("test", per_class // 2)):
        for c in range(classes):
            folder = root / part / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                image = rng.integers(0, 60, (size, size, 3))
                image[:, c * size // classes : (c + 1) * size // classes] += 180
                Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A labelled tree and a torchvision ResNet-18 trained on it, saved as a plain state dict."""
    vision_libraries()
    root = tmp_path_factory.mktemp("user")
    write_tree(root / "data")
    torch.manual_seed(0)
    model = constructor_model("torchvision:resnet18", (16, 16), num_classes=3)
    splits = folder_splits(root / "data", make_preprocess("imagenet", model, (16, 16), 3), 3)
    train(model, splits.train, splits.val, TrainConfig(epochs=3, lr=0.05, warmup_epochs=0, batch_size=12),
          progress=False)
    torch.save(model.state_dict(), root / "weights.pth")
    return root


@pytest.mark.slow
def test_the_whole_path_through_the_cli(trained):
    root = trained
    data = ["--data", root / "data"]
    result = invoke("prune", "--model", "torchvision:resnet18", "--arch-kwargs", '{"num_classes": 3}',
                    "--weights", root / "weights.pth", *data, "--input-size", "16", "16", "--speedup", "2",
                    "--device", "cpu", "--out", root / "pruned.safetensors", "--report", root / "REPORT.json")
    assert result.exit_code == 0, result.output
    report = json.loads((root / "REPORT.json").read_text())
    assert abs(report["speedup_achieved"] / 2 - 1) <= 0.02 and report["accuracy_before"] is not None
    assert report["latency_before_ms"] > 0 and report["latency_after_ms"] > 0
    assert "test accuracy (top-1)" in result.output and "latency, batch 1 (cpu)" in result.output
    markdown = (root / "REPORT.md").read_text()
    assert report["layers"] and all(f"| {layer['name']} |" in markdown for layer in report["layers"])
    assert "![kept widths and reconstruction errors](REPORT.png)" in markdown
    assert (root / "REPORT.png").read_bytes()[:4] == b"\x89PNG"

    pruned = load_model(root / "pruned.safetensors")  # the architecture and plan come from the file alone
    original = load_original(provenance(pruned))  # the recorded weights file, checked by its hash
    reference = constructor_model("torchvision:resnet18", (16, 16), num_classes=3)
    reference.load_state_dict(torch.load(root / "weights.pth", weights_only=True))
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(original(x), reference(x))

    evaluated = invoke("eval", "--model", root / "pruned.safetensors", *data)
    assert evaluated.exit_code == 0, evaluated.output
    top1 = float(evaluated.output.split("test top-1 ")[1].split("%")[0])
    assert top1 == pytest.approx(100 * report["accuracy_after"], abs=0.01)
    assert "top-5 100.00%" in evaluated.output  # 3 classes: the label is always among the top 5
    assert "logit error vs. the original" in evaluated.output and "× faster" in evaluated.output

    tuned = invoke("finetune", "--model", root / "pruned.safetensors", *data, "--epochs", "1", "--batch-size", "12",
                   "--out", root / "tuned.safetensors")
    assert tuned.exit_code == 0, tuned.output
    again = invoke("eval", "--model", root / "tuned.safetensors", *data)
    assert again.exit_code == 0 and "test top-1" in again.output

    exported = invoke("export", "--model", root / "tuned.safetensors", "--out", root / "tuned.onnx")
    assert exported.exit_code == 0, exported.output
    assert (root / "tuned.onnx").stat().st_size > 0


def test_weights_that_do_not_match_name_the_keys(trained):
    model = constructor_model("torchvision:resnet18", (16, 16))  # 1000 classes, not 3
    with pytest.raises(ChanpruneError, match=r"different shape \(file vs model\) \(2\): fc.weight \(3, 512\) vs "
                                             r"\(1000, 512\).*num_classes"):
        load_weights(model, trained / "weights.pth")
    torch.save({"state_dict": {"conv.weight": torch.zeros(1)}}, trained / "other.pth")
    with pytest.raises(ChanpruneError, match=r"missing \(\d+\): conv1.weight.*unexpected \(1\): conv.weight"):
        load_weights(model, trained / "other.pth")
    torch.save({"conv": [1, 2]}, trained / "not-a-state-dict.pth")
    with pytest.raises(ChanpruneError, match="holds no state dict"):
        load_weights(model, trained / "not-a-state-dict.pth")


def test_changed_original_weights_are_refused(trained, tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes((trained / "weights.pth").read_bytes())
    result = invoke("prune", "--model", "torchvision:resnet18", "--arch-kwargs", '{"num_classes": 3}', "--weights",
                    weights, "--data", trained / "data", "--input-size", "16", "16", "--speedup", "1.5",
                    "--out", tmp_path / "p.safetensors", "--report", tmp_path / "p.json")
    assert result.exit_code == 0, result.output
    state = torch.load(weights, weights_only=True)
    state["fc.bias"] += 1
    torch.save(state, weights)
    result = invoke("eval", "--model", tmp_path / "p.safetensors", "--data", trained / "data")
    assert result.exit_code == 2 and "has changed since" in result.output and "--original" in result.output


def test_arch_needs_trust_and_a_module_class():
    result = invoke("eval", "--arch", "conftest:TinyCNN")
    assert result.exit_code == 2 and "imports and runs that module's code" in result.output
    result = invoke("eval", "--arch", "TinyCNN", "--trust-checkpoint")
    assert result.exit_code == 2 and "expected module:Class" in result.output
    result = invoke("eval", "--model", "vgg16-mnist", "--arch", "conftest:TinyCNN", "--trust-checkpoint")
    assert result.exit_code == 2 and "not both" in result.output


def test_devices_are_checked_before_any_work():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ChanpruneError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ChanpruneError, match="CUDA is not available here"):
            resolve_device("cuda")
    result = invoke("eval", "--model", "vgg16-mnist", "--device", "tpu")
    assert result.exit_code == 2 and "device 'tpu'" in result.output


def test_folder_errors_name_the_layout(tmp_path):
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "flat" / "a.png")
    transform = make_preprocess("none", torch.nn.Identity(), None, 1)
    with pytest.raises(ChanpruneError, match="one subfolder per class"):
        folder_splits(tmp_path / "flat", transform, 1)
    write_tree(tmp_path / "tree", per_class=4)
    (tmp_path / "odd" / "class9").mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "odd" / "class9" / "a.png")
    with pytest.raises(ChanpruneError, match="classes the training part lacks \\(class9\\)"):
        folder_splits(tmp_path / "tree", transform, 3, val_dir=tmp_path / "odd")
    with pytest.raises(ChanpruneError, match="needs a timm model"):
        make_preprocess("timm", torch.nn.Identity(), None, 3)


def test_a_single_tree_is_split_by_seed_without_overlap(tmp_path):
    write_tree(tmp_path, per_class=20)
    tree = tmp_path / "train"  # one tree, no train/val/test folders inside
    transform = make_preprocess("none", torch.nn.Identity(), None, 3)
    a, b = folder_splits(tree, transform, 3, seed=0), folder_splits(tree, transform, 3, seed=0)
    assert a.train.files == b.train.files and a.classes == ("class0", "class1", "class2")
    parts = [set(a.train.files), set(a.val.files), set(a.test.files)]
    assert sum(map(len, parts)) == 60 and len(set.union(*parts)) == 60
    assert len(a.val) == len(a.test) == 6
    assert folder_splits(tree, transform, 3, seed=1).val.files != a.val.files
    image, label = a.train[0]
    assert image.shape == (3, 16, 16) and label == a.train.labels[0]


def test_a_core_install_prunes_and_names_each_missing_extra(tmp_path):
    """The extras' packages made unimportable (as in an install without them): pruning a user model
    on a tensor file works, and each extra fails with its install command."""
    torch.save(torch.randn(16, 3, 8, 8), tmp_path / "calib.pt")
    from chanprune.io.checkpoint import save_model
    from chanprune.io.provenance import Provenance, attach
    from chanprune.io.references import ArchRef
    from conftest import make_tiny

    save_model(attach(make_tiny(0), Provenance(ArchRef("class", "conftest:TinyCNN"), (), (3, 8, 8))),
               tmp_path / "tiny.safetensors")
    blocked = ["matplotlib", "onnx", "onnxruntime", "mlxtend"]
    script = ("import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in blocked) +
              "sys.argv = ['chanprune'] + sys.argv[1:]\nfrom chanprune.cli import main\nmain()\n")

    def run(*args: object) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                              cwd=tmp_path, env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"})

    done = run("prune", "--model", "tiny.safetensors", "--trust-checkpoint", "--calib-data", "calib.pt",
               "--speedup", "1.5", "--out", "p.safetensors", "--report", "p.json")
    assert done.returncode == 0, done.stderr
    assert "no plot: plots (REPORT.png, the single-layer analysis) need matplotlib" in done.stdout
    assert "pip install 'chanprune[plots]'" in done.stdout and (tmp_path / "p.md").exists()
    exported = run("export", "--model", "p.safetensors", "--trust-checkpoint", "--out", "p.onnx")
    assert exported.returncode == 2 and "pip install 'chanprune[export]'" in exported.stderr
    demo = run("eval", "--model", "vgg16-mnist")
    assert demo.returncode == 2 and "pip install 'chanprune[demo]'" in demo.stderr
    assert "Traceback" not in exported.stderr + demo.stderr


def test_imagenet_preprocessing_equals_torchvisions_eval_transform(tmp_path):
    torchvision, _ = vision_libraries()
    from torchvision import transforms

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 451, 3), dtype=np.uint8))
    ours = make_preprocess("imagenet", torch.nn.Identity(), (224, 224), 3)(image)
    theirs = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                 transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])(image)
    assert ours.shape == theirs.shape == (3, 224, 224)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_timm_preprocessing_follows_the_models_pretrained_cfg():
    _, timm = vision_libraries()
    if timm is None:
        pytest.skip("timm is not installed")
    model = constructor_model("timm:resnet18")
    cfg = model.pretrained_cfg
    transform = make_preprocess("timm", model, None, 3)
    assert transform.crop == tuple(cfg["input_size"][-2:]) and transform.mean == tuple(cfg["mean"])
    assert transform.resize == int(cfg["input_size"][-2] / cfg["crop_pct"])
    image = Image.fromarray(np.full((260, 300, 3), 128, np.uint8))
    assert transform(image).shape == (3, *cfg["input_size"][-2:])
