"""Hostile model files: loading never imports or calls what a header names, and nothing runs.

Each case writes a safetensors file whose chanprune header names something dangerous, loads it
through the library and through the CLI, and checks three things: a ChanpruneError that names the
problem, exit code 2 with one line on the CLI, and that a sentinel file the payload would create
does not exist afterwards.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

from chanprune.cli import main
from chanprune.data import load_calibration_file
from chanprune.errors import ChanpruneError
from chanprune.io.checkpoint import FORMAT, load_model, save_model
from chanprune.io.references import ArchRef, build_architecture
from chanprune.models import create_model

from conftest import TinyCNN, make_tiny, vision_libraries

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this object runs ``touch SENTINEL``."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def hostile_file(path: Path, arch=None, plan=None, state=None) -> Path:
    meta = {"format": FORMAT, "arch": arch if arch is not None else {"bundled": "resnet20-mnist"},
            "plan": plan if plan is not None else [], "input_shape": [1, 32, 32]}
    save_file(state or {"w": torch.zeros(1)}, str(path), metadata={"chanprune": json.dumps(meta)})
    return path


def arch_cases(sentinel: Path, evil_pickle: Path) -> dict[str, dict]:
    touch = f"touch {sentinel}"
    return {
        "os:system": {"class": "os:system", "kwargs": {"command": touch}},
        "builtins:eval": {"class": "builtins:eval", "kwargs": {"source": f"__import__('os').system('{touch}')"}},
        "subprocess:Popen": {"class": "subprocess:Popen", "kwargs": {"args": ["touch", str(sentinel)]}},
        "importlib:import_module": {"class": "importlib:import_module", "kwargs": {"name": "this"}},
        "class with code in kwargs": {"class": "conftest:TinyCNN", "kwargs": {"__init__": touch}},
        "timm checkpoint_path": {"constructor": "timm:resnet18", "kwargs": {"checkpoint_path": str(evil_pickle)}},
        "torchvision weights": {"constructor": "torchvision:resnet18", "kwargs": {"weights": str(evil_pickle)}},
        "bundled path": {"bundled": "../../../etc/passwd"},
        "two kinds": {"bundled": "resnet20-mnist", "class": "os:system"},
        "kwargs not a mapping": {"constructor": "torchvision:resnet18", "kwargs": [touch]},
    }


@pytest.fixture
def sentinel(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a hostile file ran code"


@pytest.fixture
def evil_pickle(tmp_path, sentinel):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump(Payload(sentinel), f)
    return path


CASES = ["os:system", "builtins:eval", "subprocess:Popen", "importlib:import_module", "class with code in kwargs",
         "timm checkpoint_path", "torchvision weights", "bundled path", "two kinds", "kwargs not a mapping"]


@pytest.mark.parametrize("case", CASES)
def test_hostile_architecture_reference_is_refused_and_runs_nothing(tmp_path, sentinel, evil_pickle, case):
    path = hostile_file(tmp_path / "evil.safetensors", arch=arch_cases(sentinel, evil_pickle)[case])
    with pytest.raises(ChanpruneError) as err:
        load_model(path)
    message = str(err.value)
    if case.startswith(("os:", "builtins:", "subprocess:", "importlib:", "class ")):
        name = arch_cases(sentinel, evil_pickle)[case]["class"]
        assert name in message and "never imports" in message
        assert "model=" in message and "trust=True" in message  # the two safe ways out
    result = CliRunner().invoke(main, ["eval", "--model", str(path)])
    assert result.exit_code == 2 and result.output.startswith("error: ")
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


@pytest.mark.parametrize("case", ["os:system", "builtins:eval", "subprocess:Popen", "importlib:import_module"])
def test_trusting_a_file_still_only_builds_module_classes(tmp_path, sentinel, evil_pickle, case):
    path = hostile_file(tmp_path / "evil.safetensors", arch=arch_cases(sentinel, evil_pickle)[case])
    with pytest.raises(ChanpruneError, match="not an nn.Module class"):
        load_model(path, trust=True)


def test_a_file_run_as_a_user_would_gets_exit_2_and_runs_nothing(tmp_path):
    """The report's reproduction: a header naming os:system, opened with `chanprune eval` (no flag)."""
    sentinel = tmp_path / "PWNED"
    path = hostile_file(tmp_path / "evil.safetensors", arch={"class": "os:system", "kwargs": {"command": f"touch {sentinel}"}})
    proc = subprocess.run([sys.executable, "-m", "chanprune", "eval", "--model", str(path)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and not sentinel.exists()
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "os:system" in proc.stderr and "--trust-checkpoint" in proc.stderr


@pytest.mark.parametrize("plan, match", [
    ([{"op": "exec", "layer": "conv1", "keep": [0]}], "not one of chanprune's"),
    ([{"op": "__import__", "layer": "os"}], "not one of chanprune's"),
    (["keep_outputs"], "not one of chanprune's"),
    ([{"op": "keep_outputs", "layer": "conv1", "keep": ["0"]}], "malformed"),
    ([{"op": "keep_outputs", "layer": "conv1", "keep": [-1]}], "malformed"),
    ([{"op": "keep_outputs", "layer": "conv1", "keep": [0], "code": "x"}], "malformed"),
    ([{"op": "keep_inputs", "layer": "conv2", "keep": [0], "channel_size": 0}], "malformed"),
    ([{"op": "keep_outputs", "layer": "conv1", "keep": [10**6]}], "fewer"),
    ([{"op": "keep_outputs", "layer": "no.such.layer", "keep": [0]}], "lacks"),
    ({"op": "keep_outputs"}, "plan"),
])
def test_hostile_or_damaged_plan_is_refused(tmp_path, plan, match):
    path = hostile_file(tmp_path / "m.safetensors", arch={"bundled": "resnet20-mnist"}, plan=plan)
    with pytest.raises(ChanpruneError, match=match):
        load_model(path)


@pytest.mark.parametrize("shape", [[1, 32], "1,32,32", [1, -3, 32], [1.5, 32, 32]])
def test_bad_input_shape_in_header_is_refused(tmp_path, shape):
    path = tmp_path / "m.safetensors"
    meta = {"format": FORMAT, "arch": {"bundled": "resnet20-mnist"}, "plan": [], "input_shape": shape}
    save_file({"w": torch.zeros(1)}, str(path), metadata={"chanprune": json.dumps(meta)})
    with pytest.raises(ChanpruneError, match="input shape"):
        load_model(path)


def test_constructor_arguments_are_checked_against_the_signature():
    vision_libraries()
    with pytest.raises(ChanpruneError, match="takes no argument 'evil'"):
        build_architecture(ArchRef("constructor", "torchvision:resnet18", {"evil": 1}))
    with pytest.raises(ChanpruneError, match="may not be given pretrained"):
        build_architecture(ArchRef("constructor", "timm:resnet18", {"pretrained": True}))
    model = build_architecture(ArchRef("constructor", "torchvision:resnet18", {"num_classes": 3}))
    assert model.fc.out_features == 3


def test_the_caller_can_supply_the_class_instead_of_trusting_the_file(tmp_path):
    model = make_tiny(0)
    path = tmp_path / "tiny.safetensors"
    save_model(model, path)  # a user class: the header names conftest:TinyCNN
    with pytest.raises(ChanpruneError, match="never imports"):
        load_model(path)
    fresh = TinyCNN()
    loaded = load_model(path, model=fresh)
    for a, b in zip(loaded.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    assert all(not torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values())
               if a.dtype.is_floating_point and a.numel() > 1), "the caller's instance was modified"
    with pytest.raises(ChanpruneError, match="must be an nn.Module"):
        load_model(path, model="conftest:TinyCNN")


def test_bundled_and_plan_round_trip_still_load_without_trust(tmp_path):
    model = create_model("resnet20-mnist")
    save_model(model, tmp_path / "r.safetensors")
    loaded = load_model(tmp_path / "r.safetensors")
    assert type(loaded) is type(model)


# ---------------------------------------------------------------- the other readers


def test_npy_with_pickled_objects_is_refused(tmp_path, sentinel):
    path = tmp_path / "calib.npy"
    np.save(path, np.array([Payload(sentinel)], dtype=object), allow_pickle=True)
    with pytest.raises(ChanpruneError, match="cannot read"):
        load_calibration_file(path)


def test_pt_tensor_file_with_a_pickled_payload_is_refused(tmp_path, sentinel):
    path = tmp_path / "calib.pt"
    torch.save({"x": Payload(sentinel)}, path)
    with pytest.raises(ChanpruneError, match="cannot read"):
        load_calibration_file(path)


def test_widths_yaml_with_python_tags_is_refused(tmp_path, sentinel):
    path = tmp_path / "widths.yaml"
    path.write_text(f"conv2: !!python/object/apply:os.system ['touch {sentinel}']\n")
    with pytest.raises(yaml.YAMLError):
        yaml.safe_load(path.read_text())  # what the CLI uses
    out = tmp_path / "o.safetensors"
    result = CliRunner().invoke(main, ["prune", "--model", "resnet20-mnist", "--widths", str(path), "--out", str(out),
                                       "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 2 and "widths file" in result.output and not out.exists()
