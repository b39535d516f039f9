"""Whole-model comparison of selection strategies on the bundled VGG-16 (no fine-tuning).

Means and spreads over calibration seeds of test accuracy and relative logit error, at equal
FLOPs (uniform allocation). A method may carry a LASSO round count, e.g. ``lasso:2``.

    python -m benchmarks.strategies --seeds 0,1,2 --speedups 2,4,5
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings
from pathlib import Path

from benchmarks.summary import mean_sd
from chanprune.data import calibration_subset, mnist_split
from chanprune.errors import SparseSamplesWarning
from chanprune.evaluate import accuracy, logit_rel_error, predict
from chanprune.models import create_model
from chanprune.pruner import prune


def run(methods: list[str], speedups: list[float], seeds: list[int], calib_images: int,
        samples_per_image: int) -> list[dict]:
    """One row per (method, speed-up, seed)."""
    model = create_model("vgg16-mnist")
    test = mnist_split("test")
    reference = predict(model, test.images)
    rows = []
    for seed in seeds:
        images = calibration_subset(mnist_split("train"), calib_images, seed)
        for speedup in speedups:
            for spec in methods:
                method, _, rounds = spec.partition(":")
                pruned, report = prune(model, images, speedup, method=method, recipe="paper", seed=seed,
                                       samples_per_image=samples_per_image, lasso_rounds=int(rounds or 1),
                                       progress=False)
                rows.append({"method": spec, "speedup": speedup, "seed": seed,
                             "achieved": report.speedup_achieved, "seconds": report.seconds,
                             "test_acc": accuracy(pruned, test),
                             "logit_err": logit_rel_error(predict(pruned, test.images), reference)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def summarise(rows: list[dict]) -> str:
    """Markdown table: mean ± standard deviation over seeds."""
    lines = ["| speed-up | method | test acc (%) | logit error | seconds |", "|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["speedup"], r["method"]) for r in rows))
    for speedup, method in keys:
        sel = [r for r in rows if r["speedup"] == speedup and r["method"] == method]
        acc = mean_sd([100 * r["test_acc"] for r in sel])
        lines.append(f"| {speedup:g}x | {method} | {acc} | {mean_sd([r['logit_err'] for r in sel], '.4f')} | "
                     f"{statistics.mean(r['seconds'] for r in sel):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="lasso,lasso:2,greedy,input_l1,max_response,first_k")
    parser.add_argument("--speedups", default="2,4,5")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--calib-images", type=int, default=1000)
    parser.add_argument("--samples-per-image", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/strategies.json"))
    args = parser.parse_args()
    warnings.simplefilter("ignore", SparseSamplesWarning)
    rows = run(args.methods.split(","), [float(s) for s in args.speedups.split(",")],
               [int(s) for s in args.seeds.split(",")], args.calib_images, args.samples_per_image)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    table = summarise(rows)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
