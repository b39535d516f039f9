"""Width allocations side by side: uniform, the paper's presets and data-driven ``global`` widths.

For each bundled model, speed-up and calibration seed, the same prune (500 MNIST training images,
one recipe: ``--recipe paper`` is He et al.'s with ridge auto, ``--recipe default`` chanprune's
default) runs once per allocation arm; each pruned model is scored against the original on the
validation split (logit error, accuracy), which is what defaults are chosen on, and on the test
split (reported). ``global:energy`` and ``global:sensitivity`` are the two ways of making units
comparable (``PruneConfig.global_weight``); ``+r8`` / ``+rauto`` adds widths in blocks of 8 channels
(``+rauto``: in units of 64 channels or more; the other arms keep any width). No fine-tuning here (the results suite adds it).

Every finished item is saved at once, so a run that stops continues where it stopped; the report
says how many items each table holds. Run: ``python -m benchmarks.allocation``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from chanprune import create_model, prune
from chanprune.data import calibration_subset, mnist_split
from chanprune.errors import ChanpruneError
from chanprune.evaluate import accuracy, logit_rel_error, predict
from chanprune.files import write_text_atomic
from chanprune.recipes import RECIPES

MODELS = ("vgg16-mnist", "resnet20-mnist", "resnet56-mnist", "resnet50-mnist", "xception50-mnist")
PRESET = {"vgg16-mnist": "vgg-paper"}  # the others use resnet-paper
ARMS = ("uniform", "preset", "global:energy", "global:sensitivity")
RESULTS = Path(__file__).parent / "results"
RIDGE = {"paper": "auto"}  # the paper's fixed ridge fails on 500 images; every arm gets the same


def preset_for(model: str) -> str:
    """The paper's preset widths for a bundled model: vgg-paper for VGG-16, resnet-paper otherwise."""
    return PRESET.get(model, "resnet-paper")


def options(arm: str, model: str) -> dict[str, Any]:
    """prune() options of one arm: an allocation (``global:WEIGHT`` for a global weighting), with
    ``+rN`` / ``+rauto`` for ``round_to`` N or "auto" (every other arm keeps any width: round_to 1)."""
    arm, _, rounding = arm.partition("+r")
    round_to = {"round_to": 1 if not rounding else rounding if rounding == "auto" else int(rounding)}
    if arm == "preset":
        return {"allocation": preset_for(model), **round_to}
    allocation, _, weight = arm.partition(":")
    return {"allocation": allocation, **({"global_weight": weight} if weight else {}), **round_to}


def run_item(model_name: str, speedup: float, seed: int, arm: str, images: int, recipe: str) -> dict[str, Any]:
    """One prune, scored on validation and test."""
    model = create_model(model_name)
    calib = calibration_subset(mnist_split("train"), images, seed)
    scores: dict[str, Any] = {}
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruned, report = prune(model, calib, speedup, recipe=recipe, seed=seed, progress=False,
                                   **({"ridge": RIDGE[recipe]} if recipe in RIDGE else {}), **options(arm, model_name))
    except ChanpruneError as err:
        return {"status": f"refused: {err}"}
    scores["seconds"] = time.perf_counter() - start
    scores["speedup"] = report.speedup_achieved
    for split_name in ("val", "test"):
        split = mnist_split(split_name)
        scores[f"{split_name}_acc"] = 100 * accuracy(pruned, split)
        scores[f"{split_name}_logit"] = logit_rel_error(predict(pruned, split.images), predict(model, split.images))
    scores["status"] = "ok"
    return scores


def report(results: dict[str, Any], models: list[str], speedups: list[float], seeds: list[int],
           arms: list[str], recipe: str) -> str:
    """Markdown tables: mean over seeds of validation logit error and accuracy, test in brackets."""
    lines = [f"# Width allocations, {recipe} recipe", "",
             f"Produced by `python -m benchmarks.allocation --recipe {recipe}` "
             f"({platform.processor() or platform.machine()}, torch {torch.__version__}). Each cell: mean over "
             f"calibration seeds {', '.join(map(str, seeds))} of the validation value, test in brackets; "
             f"no fine-tuning; 500 calibration images; the {recipe} recipe's options"
             f"{' with ridge auto' if recipe in RIDGE else ''}. 'preset' is vgg-paper "
             "for VGG-16 and resnet-paper for the others. Best validation logit error per row in bold.", ""]
    for metric, label in (("logit", "logit error vs. the original (lower is better)"),
                          ("acc", "accuracy % (higher is better)")):
        lines += [f"## {label}", "", "| model | speed-up | " + " | ".join(arms) + " |",
                  "|---|---|" + "---|" * len(arms)]
        for model in models:
            for s in speedups:
                cells, means = [], []
                for arm in arms:
                    got = [results.get(key(model, s, seed, arm)) for seed in seeds]
                    ok = [g for g in got if g and g["status"] == "ok"]
                    if not ok:
                        refused = any(g and g["status"] != "ok" for g in got)
                        cells.append("refused" if refused else "–")
                        means.append(None)
                        continue
                    val = statistics.mean(g[f"val_{metric}"] for g in ok)
                    test = statistics.mean(g[f"test_{metric}"] for g in ok)
                    digits = 4 if metric == "logit" else 2
                    partial = "" if len(ok) == len(seeds) else f" ({len(ok)}/{len(seeds)} seeds)"
                    cells.append(f"{val:.{digits}f} ({test:.{digits}f}){partial}")
                    means.append(statistics.mean(g["val_logit"] for g in ok))
                valid = [m for m in means if m is not None]
                if valid and metric == "logit":
                    best = means.index(min(valid))
                    cells[best] = f"**{cells[best]}**"
                lines.append(f"| {model} | {s:g}x | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _ordered(values: Any) -> list:
    """Distinct values in first-seen order."""
    return list(dict.fromkeys(values))


def key(model: str, speedup: float, seed: int, arm: str) -> str:
    return f"{model}|{speedup:g}|{seed}|{arm}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--speedups", default="2,4,5")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--recipe", choices=list(RECIPES), default="default")
    parser.add_argument("--out-dir", type=Path, default=None, help="default: benchmarks/results/allocation-RECIPE")
    args = parser.parse_args()
    args.out_dir = args.out_dir or RESULTS / f"allocation-{args.recipe}"
    models, arms = args.models.split(","), args.arms.split(",")
    speedups = [float(s) for s in args.speedups.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    path = args.out_dir / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for model in models:
        for s in speedups:
            for seed in seeds:
                for arm in arms:
                    k = key(model, s, seed, arm)
                    if k in results:
                        continue
                    results[k] = run_item(model, s, seed, arm, args.images, args.recipe)
                    print(k, json.dumps(results[k]), flush=True)
                    write_text_atomic(path, json.dumps(results, indent=1, sort_keys=True))
    # the report covers everything saved so far, not only this run's selection
    saved = [k.split("|") for k in results]
    write_text_atomic(args.out_dir / "report.md", report(
        results, _ordered([*models, *(m for m, *_ in saved)]), sorted({*speedups, *(float(s) for _, s, *_ in saved)}),
        sorted({*seeds, *(int(s) for *_, s, _ in saved)}), _ordered([*arms, *(a for *_, a in saved)]), args.recipe))


if __name__ == "__main__":
    main()
