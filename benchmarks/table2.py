"""The paper's Table 2 analog on the bundled VGG-16: channel pruning alone, spatial factorization
alone, channel factorization alone and 3C (all three), at 4× and 5×.

Every arm meets the same FLOPs target (within 2%) with the default recipe; the factorizations
alone keep every channel (``channel_pruning=False``). Scored on the test split as pruned (logit
error against the unpruned model, accuracy) and after the suite's fine-tuning (learning rate
chosen on validation). Each finished row is appended to ``rows.jsonl`` at once and a rerun skips
it. CPU latency (eager torch and ONNX Runtime) is measured last, for the unpruned model and every
arm in one pass, so that all ratios come from the same minutes of this shared machine (a pruned
model missing from ``models/``, e.g. on another machine, is pruned again the same way).

    python -m benchmarks.table2
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.latency import timings
from chanprune.data import calibration_subset, mnist_split
from chanprune.errors import SparseSamplesWarning
from chanprune.evaluate import accuracy, logit_rel_error, predict
from chanprune.finetune import FINETUNE_DEFAULTS, finetune
from chanprune.flops import count_flops
from chanprune.io.checkpoint import load_model, save_model
from chanprune.models import create_model
from chanprune.pruner import prune

MODEL = "vgg16-mnist"
SPEEDUPS = (4.0, 5.0)
ARMS = {  # arm -> prune() options besides the default recipe
    "channel pruning": {},
    "spatial factorization": {"factorize": ("spatial",), "channel_pruning": False},
    "channel factorization": {"factorize": ("channel",), "channel_pruning": False},
    "3C": {"factorize": ("spatial", "channel")},
}
CALIB_IMAGES, SEED, REPEATS = 500, 0, 20
OUT = Path("benchmarks/results/table2")


def pruned(arm: str, speedup: float, model: torch.nn.Module, images: torch.Tensor, out_dir: Path) -> torch.nn.Module:
    """The arm's pruned model: from ``out_dir/models`` when saved there, else pruned and saved."""
    path = out_dir / "models" / f"{arm.replace(' ', '-')}-{speedup:g}x.safetensors"
    if path.exists():
        return load_model(path)
    net, _ = prune(model, images, speedup, seed=SEED, progress=False, **ARMS[arm])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(net, path)
    return net


def run_row(arm: str, speedup: float, model: torch.nn.Module, images: torch.Tensor, out_dir: Path) -> dict[str, Any]:
    """Prune one arm and score it as pruned and fine-tuned."""
    train, val, test = mnist_split("train"), mnist_split("val"), mnist_split("test")
    start = time.perf_counter()
    net = pruned(arm, speedup, model, images, out_dir)
    seconds = time.perf_counter() - start
    shape = (1, *images.shape[1:])
    reference = predict(model, test.images)
    row = {"arm": arm, "speedup": speedup, "achieved": count_flops(model, shape) / count_flops(net, shape),
           "seconds": seconds, "logit_err": logit_rel_error(predict(net, test.images), reference),
           "test_acc": accuracy(net, test)}
    tuned = copy.deepcopy(net)
    chosen = finetune(tuned, train, val, replace(FINETUNE_DEFAULTS, seed=SEED), progress=False)
    row["ft"] = {"test_acc": accuracy(tuned, test), "val_acc": chosen["val_accuracy"], "lr": chosen["lr"]}
    return row


def table(base: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """Markdown: accuracy and logit error as pruned, accuracy fine-tuned, measured speed-ups."""
    engines = list(base["ms"])
    lines = [f"Unpruned: {100 * base['test_acc']:.2f}% test accuracy; measured speed-ups against it "
             "(median of repeated runs, this machine's CPU).", "",
             "| speed-up | arm | achieved | logit error | acc. | FT acc. | " + " | ".join(engines) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(engines)]
    for r in rows:
        measured = " | ".join(f"{base['ms'][e] / r['ms'][e]:.2f}×" for e in engines)
        lines.append(f"| {r['speedup']:g}× | {r['arm']} | {r['achieved']:.2f}× | {r['logit_err']:.4f} | "
                     f"{100 * r['test_acc']:.2f} | {100 * r['ft']['test_acc']:.2f} | {measured} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=OUT)
    args = parser.parse_args()
    warnings.simplefilter("ignore", SparseSamplesWarning)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows_file = args.out_dir / "rows.jsonl"
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
    model = create_model(MODEL)
    images = calibration_subset(mnist_split("train"), CALIB_IMAGES, SEED)
    order = [(arm, s) for s in SPEEDUPS for arm in ARMS]
    for arm, speedup in order:
        if any(r["arm"] == arm and r["speedup"] == speedup for r in rows):
            continue
        row = run_row(arm, speedup, model, images, args.out_dir)
        rows.append(row)
        with rows_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{arm} {speedup:g}x ({row['achieved']:.2f}x): logit error {row['logit_err']:.4f}, "
              f"{100 * row['test_acc']:.2f}% -> {100 * row['ft']['test_acc']:.2f}%", file=sys.stderr, flush=True)
    shape = tuple(images.shape[1:])
    base = {"test_acc": accuracy(model, mnist_split("test")), "ms": timings(model, shape, REPEATS)[0]}
    rows.sort(key=lambda r: order.index((r["arm"], r["speedup"])))
    for r in rows:  # one pass, right after the unpruned model's
        r["ms"] = timings(pruned(r["arm"], r["speedup"], model, images, args.out_dir), shape, REPEATS)[0]
    (args.out_dir / "results.json").write_text(json.dumps({"unpruned": base, "rows": rows}, indent=2) + "\n")
    (args.out_dir / "report.md").write_text("Produced by `python -m benchmarks.table2` (calibration: "
                                            f"{CALIB_IMAGES} training images, seed {SEED}).\n\n"
                                            + table(base, rows) + "\n")


if __name__ == "__main__":
    main()
