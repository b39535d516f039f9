"""The results suite end to end at its quick size, on one residual model (`--quick`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch_pruning")


@pytest.mark.slow
def test_quick_suite_writes_every_table_with_matched_flops(tmp_path):
    out = tmp_path / "suite"
    subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--models", "resnet20-mnist",
                    "--sections", "accuracy,latency", "--workers", "1", "--out-dir", str(out)],
                   check=True, cwd=Path(__file__).parents[1], capture_output=True, text=True)
    arms = json.loads((out / "accuracy.json").read_text())
    assert {r["arm"] for r in arms} == {"plain", "enhanced", "joint", "tp-l1", "tp-taylor"}
    for r in arms:
        assert abs(r["achieved"] / r["speedup"] - 1) <= 0.03
        assert r["ft"]["epochs"] == 1 and 0.0 <= r["ft"]["test_acc"] <= 1.0
    joint4 = next(r for r in arms if r["arm"] == "joint" and r["speedup"] == 4.0)
    peers4 = [r for r in arms if r["family"] == "torch-pruning"]
    assert joint4["as_is"]["test_acc"] > max(r["as_is"]["test_acc"] for r in peers4)  # data-free BN is stale
    latency = json.loads((out / "latency.json").read_text())["resnet20-mnist"]
    assert [r["model"] for r in latency] == ["original", "enhanced-2x", "joint-2x", "joint-2x round-to 8",
                                             "joint-4x", "joint-4x round-to 8"]
    assert latency[1]["selects"] > 0 and 0 < latency[1]["onnx_select_share"] < 0.5
    assert all(0.5 < r["test_acc"] <= 1 for r in latency)
    report = (out / "report.md").read_text()
    for heading in ("Residual analog", "Torch-Pruning at equal FLOPs", "Latency", "Targets"):
        assert heading in report
    assert (out / "latency.png").stat().st_size > 0
