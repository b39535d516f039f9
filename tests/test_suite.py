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
    command = [sys.executable, "-m", "benchmarks.run", "--quick", "--models", "resnet20-mnist", "--workers", "1",
               "--out-dir", str(out), "--sections"]
    subprocess.run([*command, "accuracy", "--parts", "trunk"], check=True, cwd=Path(__file__).parents[1],
                   capture_output=True, text=True)
    trunk = json.loads((out / "accuracy.json").read_text())
    assert sorted(r["arm"] for r in trunk) == ["default", "trunk-fine", "trunk-keep"]  # only that comparison
    subprocess.run([*command, "accuracy,latency"], check=True, cwd=Path(__file__).parents[1], capture_output=True,
                   text=True)
    arms = json.loads((out / "accuracy.json").read_text())
    assert arms[:3] == trunk  # the rows saved by the first run are kept, not pruned again
    rerun = subprocess.run([*command, "accuracy"], check=True, cwd=Path(__file__).parents[1], capture_output=True,
                           text=True)
    assert " 4x " not in rerun.stderr  # every row was already saved: nothing is pruned again
    assert json.loads((out / "accuracy.json").read_text()) == arms
    assert {r["arm"] for r in arms} == {"plain", "enhanced", "joint", "default", "uniform", "preset",
                                             "tp-l1", "tp-taylor", "trunk-keep", "trunk-fine"}
    for r in arms:
        assert abs(r["achieved"] / r["speedup"] - 1) <= 0.03
        assert r["ft"]["epochs"] == 1 and 0.0 <= r["ft"]["test_acc"] <= 1.0
    peers4 = [r for r in arms if r["family"] == "torch-pruning"]
    for arm in ("joint", "default"):
        ours4 = next(r for r in arms if r["arm"] == arm and r["speedup"] == 4.0)
        assert ours4["as_is"]["test_acc"] > max(r["as_is"]["test_acc"] for r in peers4)  # data-free BN is stale
        assert ours4["ft"]["test_acc"] >= 0.0 and ours4["ft"]["best_epoch"] in (0, 1)
    latency = json.loads((out / "latency.json").read_text())["resnet20-mnist"]
    assert [r["model"] for r in latency] == ["original", "enhanced-2x", "default-2x", "default-2x round-to 8",
                                             "default-4x", "default-4x round-to 8", "trunk-fine-4x"]
    assert latency[1]["selects"] > 0 and 0 < latency[1]["onnx_copy_share"] < 0.5
    assert all(0.5 < r["test_acc"] <= 1 for r in latency)
    report = (out / "report.md").read_text()
    assert len((out / "rows" / "resnet20-mnist-seed0.jsonl").read_text().splitlines()) == len(arms)
    for heading in ("Residual analog", "Width allocations", "Torch-Pruning at equal FLOPs", "Residual trunks",
                    "Latency", "Targets"):
        assert heading in report
    assert (out / "latency.png").stat().st_size > 0


def test_redo_discards_only_the_named_arms_of_the_named_models(tmp_path):
    from benchmarks.run import discard_arms, saved_rows

    rows = [{"model": m, "arm": a, "speedup": s} for m in ("vgg16-mnist", "resnet20-mnist")
            for a in ("default", "uniform") for s in (2.0, 4.0)]
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "models").mkdir()
    for name in ("resnet20-mnist-default-4x", "resnet20-mnist-uniform-4x", "vgg16-mnist-default-4x"):
        (tmp_path / "models" / f"{name}.safetensors").write_bytes(b"")
    assert discard_arms(tmp_path, {"default"}, ("resnet20-mnist",)) == 2
    left = saved_rows(tmp_path / "rows")
    assert left == [r for r in rows if not (r["model"] == "resnet20-mnist" and r["arm"] == "default")]
    assert sorted(p.stem for p in (tmp_path / "models").iterdir()) == ["resnet20-mnist-uniform-4x",
                                                                       "vgg16-mnist-default-4x"]
