"""The paper's residual-branch variants and joint trunk pruning on the bundled residual nets.

Variants, all without fine-tuning, at equal FLOPs (uniform allocation unless given):
  plain     the trunk stays whole, no residual correction, no feature-map sampling
  enhanced  the paper's two fixes: residual correction + feature-map sampling
  joint     enhanced, and the trunk channels pruned too (one joint selection per trunk)
  branch    branch-only pruning with the residual correction (trunk whole, no sampling)
Means and spreads over calibration seeds of test accuracy and relative logit error.

    python -m benchmarks.residual --model resnet56-mnist --speedups 2,3 --seeds 0,1,2
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

VARIANTS = {
    "plain": dict(trunk="keep", residual_correction=False, feature_map_sampling=False),
    "branch": dict(trunk="keep", residual_correction=True, feature_map_sampling=False),
    "enhanced": dict(trunk="keep", residual_correction=True, feature_map_sampling=True),
    "joint": dict(trunk="joint", residual_correction=True, feature_map_sampling=True),
}


def run(model_name: str, variants: list[str], speedups: list[float], seeds: list[int], calib_images: int,
        samples_per_image: int, method: str, allocation: str) -> list[dict]:
    """One row per (variant, speed-up, seed)."""
    model = create_model(model_name)
    test = mnist_split("test")
    reference = predict(model, test.images)
    base = accuracy(model, test)
    rows = []
    for seed in seeds:
        images = calibration_subset(mnist_split("train"), calib_images, seed)
        for speedup in speedups:
            for variant in variants:
                pruned, report = prune(model, images, speedup, method=method, recipe="paper", seed=seed,
                                       samples_per_image=samples_per_image, allocation=allocation,
                                       progress=False, **VARIANTS[variant])
                rows.append({"model": model_name, "variant": variant, "speedup": speedup, "seed": seed,
                             "method": method, "allocation": allocation, "achieved": report.speedup_achieved,
                             "seconds": report.seconds, "base_acc": base, "test_acc": accuracy(pruned, test),
                             "logit_err": logit_rel_error(predict(pruned, test.images), reference)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def summarise(rows: list[dict]) -> str:
    """Markdown table: mean ± standard deviation over seeds."""
    lines = ["| model | speed-up | variant | achieved | test acc (%) | drop (points) | logit error | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["model"], r["speedup"], r["variant"]) for r in rows))
    for model, speedup, variant in keys:
        sel = [r for r in rows if (r["model"], r["speedup"], r["variant"]) == (model, speedup, variant)]
        lines.append(
            f"| {model} | {speedup:g}x | {variant} | {statistics.mean(r['achieved'] for r in sel):.2f}x | "
            f"{mean_sd([100 * r['test_acc'] for r in sel], '.2f')} | "
            f"{mean_sd([100 * (r['base_acc'] - r['test_acc']) for r in sel], '.2f')} | "
            f"{mean_sd([r['logit_err'] for r in sel], '.4f')} | {statistics.mean(r['seconds'] for r in sel):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet56-mnist")
    parser.add_argument("--variants", default="plain,enhanced,branch,joint")
    parser.add_argument("--speedups", default="2,3")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--method", default="lasso")
    parser.add_argument("--allocation", default="uniform")
    parser.add_argument("--calib-images", type=int, default=500)
    parser.add_argument("--samples-per-image", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/residual-MODEL.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore", SparseSamplesWarning)
    rows = run(args.model, args.variants.split(","), [float(s) for s in args.speedups.split(",")],
               [int(s) for s in args.seeds.split(",")], args.calib_images, args.samples_per_image,
               args.method, args.allocation)
    out = args.out or Path(f"benchmarks/results/residual-{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    table = summarise(rows)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
