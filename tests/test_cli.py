"""The command line: a pruned model whose FLOPs match its report; bad input -> exit 2, one line, no files."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from chanprune.io.checkpoint import load_model, save_model
from chanprune.io.provenance import Provenance, attach
from chanprune.io.references import ArchRef
from chanprune.data import mnist_split
from chanprune.errors import ChanpruneError
from chanprune.evaluate import accuracy
from chanprune.experiment import load_model_spec
from chanprune.flops import count_flops
from chanprune.graph import build_graph

from chanprune.cli import main

from conftest import TinyCNN, make_tiny, outputs, random_images


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


# ---------------------------------------------------------------- end to end on the bundled VGG


@pytest.fixture(scope="module")
def vgg_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("vgg")
    out, report = out_dir / "pruned.safetensors", out_dir / "REPORT.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # few samples per input in a quick run
        result = invoke("prune", "--model", "vgg16-mnist", "--speedup", "2", "--calib-images", "64",
                        "--samples-per-image", "2", "--out", out, "--report", report)
    assert result.exit_code == 0, result.output
    return result, out, json.loads(report.read_text())


@pytest.mark.slow
def test_cli_prune_flops_match_the_report(vgg_run):
    result, out, report = vgg_run
    loaded = load_model(out)
    flops = count_flops(loaded, (1, 1, 32, 32))
    assert report["flops_after"] == flops
    assert report["flops_before"] == count_flops(load_model_spec("vgg16-mnist").model, (1, 1, 32, 32))
    assert abs(report["flops_before"] / report["flops_after"] / 2.0 - 1) <= 0.02
    assert report["speedup_achieved"] == pytest.approx(report["flops_before"] / report["flops_after"])
    assert report["params_after"] == sum(p.numel() for p in loaded.parameters())
    assert f"({report['speedup_achieved']:.2f}× fewer)" in result.stdout and str(out) in result.stdout
    markdown = out.with_name("REPORT.md").read_text()  # --report REPORT.json: REPORT.md and REPORT.png beside it
    assert "| FLOPs |" in markdown and all(f"| {layer['name']} |" in markdown for layer in report["layers"])
    assert out.with_name("REPORT.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = report["config"]
    assert (cfg["speedup"], cfg["method"], cfg["samples_per_image"], cfg["calib_images"]) == (2.0, "greedy", 2, 64)
    assert 0.0 <= report["accuracy_after"] <= 1.0 and report["accuracy_before"] > 0.9
    assert report["logit_rel_error"] >= 0


@pytest.mark.slow
def test_cli_finetune_with_distillation_keeps_the_pruned_shapes(vgg_run, tmp_path):
    _, out, report = vgg_run
    tuned_path = tmp_path / "tuned.safetensors"
    result = invoke("finetune", "--model", out, "--epochs", "1", "--lr", "0.005", "--distill", "0.5",
                    "--out", tuned_path)
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.stdout
    pruned, tuned = load_model(out), load_model(tuned_path)
    assert [p.shape for p in tuned.parameters()] == [p.shape for p in pruned.parameters()]
    assert not torch.equal(tuned.classifier.fc2.weight, pruned.classifier.fc2.weight)
    test = mnist_split("test")
    assert accuracy(tuned, test) >= report["accuracy_after"] - 0.01


def test_cli_finetune_refuses_models_without_bundled_data(tmp_path):
    model = make_tiny(0)
    path = tmp_path / "user.safetensors"
    save_model(attach(model, Provenance(ArchRef("class", "conftest:TinyCNN"), (), (3, 8, 8))), path)
    result = invoke("finetune", "--model", path, "--out", tmp_path / "t.safetensors")
    assert result.exit_code == 2 and "never imports code" in result.output and "--trust-checkpoint" in result.output
    result = invoke("finetune", "--model", path, "--trust-checkpoint", "--out", tmp_path / "t.safetensors")
    assert result.exit_code == 2 and "needs labelled images; pass --data DIR" in result.output
    assert not (tmp_path / "t.safetensors").exists()


@pytest.mark.slow
def test_cli_prune_report_layers_match_the_model(vgg_run):
    _, out, report = vgg_run
    loaded = load_model(out)
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert len(layers) == 15  # every conv and linear changed shape
    readers = [layer for layer in layers.values() if layer["kept_indices"] is not None]
    assert len(readers) == 14  # every layer but conv1_1 (reads the image) lost input channels
    for layer in readers:
        assert len(layer["kept_indices"]) == layer["in_channels_after"] < layer["in_channels_before"]
        assert len(set(layer["kept_indices"])) == len(layer["kept_indices"])
        assert max(layer["kept_indices"]) < layer["in_channels_before"]
        assert layer["rel_error"] <= layer["rel_error_before"] + 1e-9
    for name, layer in layers.items():
        module = loaded.get_submodule(name)
        assert module.weight.shape[0] == layer["out_channels_after"]
        assert module.weight.shape[1] == layer["in_channels_after"]


@pytest.mark.slow
def test_cli_pruned_vgg_shapes_are_consistent_and_eval_runs(vgg_run):
    _, out, _ = vgg_run
    loaded = load_model(out)
    original = load_model_spec("vgg16-mnist").model
    graph = build_graph(original, torch.zeros(1, 1, 32, 32))
    for g in graph.groups:
        writer = loaded.get_submodule(g.writer)
        n = writer.weight.shape[0]
        for f in g.followers:
            assert loaded.get_submodule(f).num_features == n
        for r in g.readers:
            assert loaded.get_submodule(r.name).weight.shape[1] == n * r.channel_size
    assert outputs(loaded, torch.zeros(2, 1, 32, 32)).shape == (2, 10)
    result = invoke("eval", "--model", out)
    assert result.exit_code == 0, result.output
    assert f"flops {count_flops(loaded, (1, 1, 32, 32)):,}" in result.stdout


# ---------------------------------------------------------------- a user model through the CLI


@pytest.fixture
def tiny_files(tmp_path):
    model = make_tiny(0)
    attach(model, Provenance(ArchRef("class", "conftest:TinyCNN"), (), (3, 8, 8)))
    save_model(model, tmp_path / "tiny.safetensors")
    torch.save(model, tmp_path / "tiny.pt")
    np.save(tmp_path / "calib.npy", random_images(120).numpy())
    return model, tmp_path


def test_cli_prunes_a_user_checkpoint(tiny_files):
    model, d = tiny_files
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = invoke("prune", "--model", d / "tiny.safetensors", "--trust-checkpoint", "--calib-data",
                        d / "calib.npy", "--speedup", "1.5", "--samples-per-image", "4", "--out",
                        d / "out.safetensors", "--report", d / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((d / "r.json").read_text())
    loaded = load_model(d / "out.safetensors", model=TinyCNN())
    assert report["flops_after"] == count_flops(loaded, (1, 3, 8, 8))
    assert abs(report["speedup_achieved"] / 1.5 - 1) <= 0.02
    assert report["accuracy_before"] is None  # no labelled data for a user model
    x = random_images(30, seed=5)
    assert outputs(loaded, x).shape == (30, 5)
    for layer in report["layers"]:
        if layer["kept_indices"] is not None:
            size = 4 if layer["name"] == "fc1" else 1
            assert len(layer["kept_indices"]) * size == layer["in_channels_after"]


def test_cli_trusted_pickle_and_no_reconstruction(tiny_files):
    model, d = tiny_files
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = invoke("prune", "--model", d / "tiny.pt", "--trust-checkpoint", "--calib-data", d / "calib.npy",
                        "--speedup", "1.5", "--samples-per-image", "4", "--no-reconstruction",
                        "--out", d / "out.safetensors", "--report", d / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((d / "r.json").read_text())
    assert report["config"]["reconstruct"] is False
    loaded = load_model(d / "out.safetensors", trust=True)
    assert loaded.conv3.bias is None  # nothing was refitted, so no bias was added
    for layer in report["layers"]:
        if layer["kept_indices"] is not None:
            assert layer["rel_error"] == pytest.approx(layer["rel_error_before"])


# ---------------------------------------------------------------- bad input


def bad_inputs(d: Path) -> dict[str, list]:
    """name -> CLI arguments (before --out/--report) that must be refused."""
    vgg_calib = np.random.default_rng(0).standard_normal((8, 1, 32, 32)).astype(np.float32)
    np.save(d / "vgg_calib.npy", vgg_calib)
    nan = vgg_calib.copy()
    nan[2, 0, 5, 5] = np.nan
    np.save(d / "nan.npy", nan)
    np.save(d / "three_dims.npy", vgg_calib[:, 0])
    np.save(d / "rgb.npy", np.repeat(vgg_calib, 3, axis=1))
    (d / "corrupt.safetensors").write_bytes(bytes(np.random.default_rng(1).integers(0, 256, 2048, dtype=np.uint8)))
    (d / "widths.json").write_text(json.dumps({"features.conv9_9.conv": 3}))
    (d / "widths_bad_value.json").write_text(json.dumps({"features.conv1_1.conv": "many"}))
    vgg = ["--model", "vgg16-mnist"]
    calib = ["--calib-data", d / "vgg_calib.npy"]
    tiny = ["--model", d / "tiny.safetensors", "--calib-data", d / "calib.npy"]
    return {
        "speedup below 1": [*vgg, *calib, "--speedup", "0.5"],
        "unreachable speedup vgg": [*vgg, *calib, "--speedup", "5000"],
        "unreachable speedup tiny": [*tiny, "--speedup", "1000"],
        "nan calibration": [*vgg, "--calib-data", d / "nan.npy", "--speedup", "2"],
        "3-dim calibration": [*vgg, "--calib-data", d / "three_dims.npy", "--speedup", "2"],
        "wrong channel count": [*vgg, "--calib-data", d / "rgb.npy", "--speedup", "2"],
        "missing calibration": [*vgg, "--calib-data", d / "nope.npy", "--speedup", "2"],
        "missing checkpoint": ["--model", d / "missing.safetensors", *calib, "--speedup", "2"],
        "corrupt checkpoint": ["--model", d / "corrupt.safetensors", *calib, "--speedup", "2"],
        "untrusted pickle": ["--model", d / "tiny.pt", "--calib-data", d / "calib.npy", "--speedup", "1.5"],
        "unknown layer in widths": [*vgg, *calib, "--widths", d / "widths.json"],
        "bad width value": [*vgg, *calib, "--widths", d / "widths_bad_value.json"],
        "neither speedup nor widths": [*vgg, *calib],
        "user model without data": ["--model", d / "tiny.safetensors", "--speedup", "1.5"],
    }


BAD_NAMES = [
    "speedup below 1", "unreachable speedup vgg", "unreachable speedup tiny", "nan calibration",
    "3-dim calibration", "wrong channel count", "missing calibration", "missing checkpoint",
    "corrupt checkpoint", "untrusted pickle", "unknown layer in widths", "bad width value",
    "neither speedup nor widths", "user model without data"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(tiny_files, name):
    _, d = tiny_files
    args = bad_inputs(d)[name]
    out_dir = d / "results"
    result = invoke("prune", *args, "--out", out_dir / "m.safetensors", "--report", out_dir / "r.json")
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    assert not (out_dir / "m.safetensors").exists() and not (out_dir / "r.json").exists()
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_cli_rejects_an_output_that_is_not_safetensors(tmp_path):
    result = invoke("prune", "--model", "vgg16-mnist", "--speedup", "2", "--out", tmp_path / "m.pt",
                    "--report", tmp_path / "r.json")
    assert result.exit_code == 2
    assert "safetensors" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_api_raises_chanprune_error_for_the_same_bad_files(tiny_files):
    _, d = tiny_files
    bad_inputs(d)
    with pytest.raises(ChanpruneError):
        load_model_spec(str(d / "missing.safetensors"))
    with pytest.raises(ChanpruneError):
        load_model_spec(str(d / "corrupt.safetensors"))
    with pytest.raises(ChanpruneError, match="trust"):
        load_model_spec(str(d / "tiny.pt"))
    assert isinstance(load_model_spec(str(d / "tiny.pt"), trust_checkpoint=True).model, nn.Module)
    from chanprune.data import load_calibration_file
    from chanprune.pruner import prune

    model = load_model_spec("vgg16-mnist").model
    for name in ("nan.npy", "three_dims.npy", "rgb.npy"):
        with pytest.raises(ChanpruneError):
            prune(model, load_calibration_file(d / name), 2.0, progress=False)
    with pytest.raises(ChanpruneError):
        load_calibration_file(d / "nope.npy")
    images = load_calibration_file(d / "vgg_calib.npy")
    for speedup in (0.5, 5000.0):
        with pytest.raises(ChanpruneError):
            prune(model, images, speedup, progress=False)
    with pytest.raises(ChanpruneError, match="unknown layer"):
        prune(model, images, None, widths={"features.conv9_9.conv": 3}, progress=False)


def test_console_script_exit_code(tmp_path):
    # the real entry point, not the test runner: exit status 2 and one line on stderr
    script = Path(sys.executable).with_name("chanprune")
    if not script.exists():
        pytest.skip("console script not installed")
    proc = subprocess.run([str(script), "prune", "--model", str(tmp_path / "missing.safetensors"), "--speedup", "2",
                           "--out", str(tmp_path / "m.safetensors"), "--report", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: ")
    assert list(tmp_path.iterdir()) == []


def test_cli_export_writes_a_checked_onnx_file_and_program(tmp_path):
    pytest.importorskip("onnxruntime")
    model = make_tiny(0)
    attach(model, Provenance(ArchRef("class", "conftest:TinyCNN"), (), (3, 8, 8)))
    path = tmp_path / "tiny.safetensors"
    save_model(model, path)
    result = invoke("export", "--model", path, "--trust-checkpoint", "--out", tmp_path / "tiny.onnx",
                    "--program", tmp_path / "tiny.pt2")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "tiny.onnx").stat().st_size > 0 and (tmp_path / "tiny.pt2").stat().st_size > 0
    assert "0 channel selects" in result.stdout and "max difference to torch" in result.stdout
