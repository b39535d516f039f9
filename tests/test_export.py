"""ONNX and torch.export files of plain and channel-selecting models (chanprune.export)."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from chanprune.io.provenance import Provenance, attach
from chanprune.io.references import ArchRef
from chanprune.errors import ChanpruneError
from chanprune.export import (check_onnx, check_program, export_onnx, export_program, resolve_input_shape,
                              select_cost_onnx)
from chanprune.layers import SelectedConv2d
from chanprune.surgery import select_inputs

from conftest import IMAGE_SHAPE, make_tiny, randomise

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


class TinyResidual(nn.Module):
    """stem conv -> residual block whose first conv reads 5 of the 8 trunk channels through a
    select -> a second block with another select -> pool -> fc, for 3x8x8 inputs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(x + self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


def make_residual() -> TinyResidual:
    model = randomise(TinyResidual(), 3)
    model.conv1 = select_inputs(model.conv1, torch.tensor([0, 2, 3, 5, 7]))
    model.conv3 = select_inputs(model.conv3, torch.tensor([1, 4, 6]))
    return model.eval()


class Unexportable(nn.Module):
    """A conv followed by an eigenvalue op that has no ONNX translation."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)[:, :, :4, :4]
        return torch.linalg.eigvalsh(y @ y.transpose(-1, -2))


class DataDependent(nn.Module):
    """Python control flow on tensor values: torch.export cannot capture it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y if y.sum() > 0 else -y


def n_selects(model: nn.Module) -> int:
    return sum(isinstance(m, SelectedConv2d) for m in model.modules())


@pytest.mark.parametrize("make", [make_tiny, make_residual], ids=["plain", "residual"])
def test_onnx_matches_torch_at_any_batch(tmp_path, make):
    model = make()
    path = export_onnx(model, tmp_path / "m.onnx", IMAGE_SHAPE)
    assert path == tmp_path / "m.onnx" and path.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary left over
    for batch in (1, 3):
        result = check_onnx(model, path, IMAGE_SHAPE, batch_size=batch)
        assert result["ok"] and result["max_abs_diff"] <= 1e-4, result
        assert result["batch_size"] == batch and result["nodes"] > 0
        assert result["gather_nodes"] == n_selects(model)
    graph = onnx.load(str(path)).graph
    assert graph.input[0].name == "input" and graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert n_selects(make_residual()) == 2


def test_onnx_input_shape_from_model_and_mode_kept(tmp_path):
    model = make_residual().train()
    attach(model, Provenance(ArchRef.of_class(model), (), tuple(IMAGE_SHAPE)))
    path = export_onnx(model, tmp_path / "sub" / "m.onnx")  # the directory is created
    assert model.training  # exported in eval mode, mode restored
    assert check_onnx(model.eval(), path)["ok"]
    with pytest.raises(ChanpruneError, match="input shape is unknown"):
        export_onnx(make_tiny(), tmp_path / "x.onnx")
    with pytest.raises(ChanpruneError, match="positive"):
        resolve_input_shape(None, (3, 0, 8))


def test_fixed_batch(tmp_path):
    model = make_residual()
    path = export_onnx(model, tmp_path / "m.onnx", IMAGE_SHAPE, batch_size=2, dynamic_batch=False)
    assert onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    assert check_onnx(model, path, IMAGE_SHAPE, batch_size=2)["ok"]
    with pytest.raises(ChanpruneError, match="fixed batch size"):
        check_onnx(model, path, IMAGE_SHAPE, batch_size=3)


def test_check_reports_a_mismatch(tmp_path):
    path = export_onnx(make_residual(), tmp_path / "m.onnx", IMAGE_SHAPE)
    other = randomise(make_residual(), 7)
    result = check_onnx(other, path, IMAGE_SHAPE)
    assert not result["ok"] and result["max_abs_diff"] > 1e-3
    broken = make_residual()
    with torch.no_grad():
        broken.fc.bias[0] = float("nan")
    assert not check_onnx(broken, path, IMAGE_SHAPE)["ok"]  # a NaN is never hidden


def test_failed_exports_leave_no_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ChanpruneError, match="cannot write"):
        export_onnx(make_tiny(), blocker / "m.onnx", IMAGE_SHAPE)
    with pytest.raises(ChanpruneError, match="cannot export Unexportable to ONNX"):
        export_onnx(Unexportable(), tmp_path / "u.onnx", IMAGE_SHAPE)
    with pytest.raises(ChanpruneError, match="does not run on an input of shape"):
        export_onnx(make_tiny(), tmp_path / "s.onnx", (1, 8, 8))
    with pytest.raises(ChanpruneError, match="torch.export cannot capture DataDependent"):
        export_program(DataDependent(), tmp_path / "d.pt2", IMAGE_SHAPE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_failed_export_keeps_the_old_file(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous")
    with pytest.raises(ChanpruneError):
        export_onnx(Unexportable(), path, IMAGE_SHAPE)
    assert path.read_bytes() == b"previous" and len(list(tmp_path.iterdir())) == 1


def test_missing_packages_and_files(tmp_path, monkeypatch):
    with pytest.raises(ChanpruneError, match="does not exist"):
        check_onnx(make_tiny(), tmp_path / "none.onnx", IMAGE_SHAPE)
    (tmp_path / "bad.onnx").write_bytes(b"garbage")
    with pytest.raises(ChanpruneError, match="cannot load"):
        select_cost_onnx(tmp_path / "bad.onnx", IMAGE_SHAPE)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ChanpruneError, match=r"need onnxruntime, which is not installed; pip install 'chanprune\[export\]'"):
        check_onnx(make_tiny(), tmp_path / "none.onnx", IMAGE_SHAPE)
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ChanpruneError, match=r"need onnx, which is not installed; pip install 'chanprune\[export\]'"):
        export_onnx(make_tiny(), tmp_path / "m.onnx", IMAGE_SHAPE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_program_round_trip(tmp_path):
    model = make_residual()
    path = export_program(model, tmp_path / "m.pt2", IMAGE_SHAPE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt2"]
    loaded = torch.export.load(str(path)).module()
    for batch in (1, 3):
        x = torch.randn(batch, *IMAGE_SHAPE)
        with torch.no_grad():
            assert torch.allclose(loaded(x), model(x), atol=1e-5)
        assert check_program(model, path, IMAGE_SHAPE, batch_size=batch)["ok"]
    with pytest.raises(ChanpruneError, match="does not exist"):
        check_program(model, tmp_path / "none.pt2", IMAGE_SHAPE)


def test_select_cost(tmp_path):
    plain = export_onnx(make_tiny(), tmp_path / "plain.onnx", IMAGE_SHAPE)
    selects = export_onnx(make_residual(), tmp_path / "res.onnx", IMAGE_SHAPE)
    for path in (plain, selects):
        cost = select_cost_onnx(path, batch_size=2, repeats=5, warmup=1)  # shape read from the file
        assert cost["ms_median"] > 0 and 0.0 <= cost["gather_share"] <= 1.0
        assert cost["gather_ms"] <= cost["kernel_ms"]
    assert select_cost_onnx(plain, IMAGE_SHAPE, repeats=3)["gather_share"] == 0.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.onnx", "res.onnx"]  # profiles removed


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch-internal pytree deprecation
def test_dynamo_exporter(tmp_path):
    pytest.importorskip("onnxscript")
    with pytest.raises(ChanpruneError, match="opset 18 or newer"):
        export_onnx(make_residual(), tmp_path / "m.onnx", IMAGE_SHAPE, dynamo=True)
    model = make_residual()
    path = export_onnx(model, tmp_path / "m.onnx", IMAGE_SHAPE, dynamo=True, opset=18)
    for batch in (1, 3):
        result = check_onnx(model, path, IMAGE_SHAPE, batch_size=batch)
        assert result["ok"] and result["gather_nodes"] == 2, result
