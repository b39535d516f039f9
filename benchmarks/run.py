"""The results suite: every table and plot of the README's Results section, from scratch.

    python -m benchmarks.run                  # full size (3 seeds, four reference models)
    python -m benchmarks.run --quick          # minutes: one seed, VGG-16 and ResNet-20, small budgets
    python -m benchmarks.run --update-readme  # also rewrite the README's suite block
    python -m benchmarks.run --sections curves,latency  # rerun parts; the report is rebuilt from all results
    python -m benchmarks.run --sections accuracy --parts trunk --models resnet56-mnist  # one comparison

The accuracy jobs append each finished row to ``OUT_DIR/rows/MODEL-seedN.jsonl``; a run that stops
continues where it stopped when started again. ``accuracy.json`` (what the report reads) is rebuilt
from every saved rows file by every run (``--sections ''`` included), so a run of some models, seeds or ``--parts`` adds to
the results instead of replacing them; ``latency.json`` likewise keeps the models a latency run
did not measure. ``--restart`` deletes the rows first (after a code change); ``--redo ARMS`` deletes
only those arms' rows and saved models (after a change of the recipe they use).

Accuracy jobs (one per model and calibration seed) and the single-layer curves run in parallel
worker processes (one thread each); latency runs afterwards, alone, at the machine's thread count,
on the seed-0 models the jobs saved. Writes ``report.md``, JSON and PNGs to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
import torch
from tqdm.auto import tqdm

from benchmarks import latency, report
from benchmarks.accuracy import DEFAULT_ARM, PARTS, Budget, arm_options, run_job
from benchmarks.peers import require_torch_pruning
from chanprune.analysis import analyze_layers
from chanprune.graph import build_graph
from chanprune.io.checkpoint import load_model, save_model
from chanprune.data import calibration_subset, mnist_split
from chanprune.errors import SparseSamplesWarning
from chanprune.evaluate import accuracy
from chanprune.files import write_text_atomic
from chanprune.models import create_model
from chanprune.pruner import prune

README = Path("README.md")
MARKERS = ("<!-- suite:start -->", "<!-- suite:end -->")
ROUND_TO = 8


@dataclass(frozen=True)
class Size:
    """Everything the two sizes differ in."""

    models: tuple[str, ...]
    seeds: tuple[int, ...]
    budget: Budget
    curve_model: str = "vgg16-mnist"
    curve_speedups: tuple[float, ...] = (2.0, 3.0, 4.0, 5.0)
    curve_methods: tuple[str, ...] = ("lasso", "max_response", "first_k")
    latency_repeats: int = 30


FULL = Size(models=("vgg16-mnist", "resnet20-mnist", "resnet56-mnist", "resnet50-mnist", "xception50-mnist"),
            seeds=(0, 1, 2), budget=Budget())
QUICK = Size(models=("vgg16-mnist", "resnet20-mnist"), seeds=(0,),
             budget=Budget(calib_images=200, samples_per_image=5, table1_speedups=(2.0, 4.0),
                           allocation_speedups=(4.0,), peer_speedups=(4.0,),
                           trunk_models=("resnet20-mnist",), trunk_speedups=(4.0,),
                           criteria=("l1", "taylor"), ft_epochs=(), ft_epochs_default=1, scratch_epochs=1),
             curve_speedups=(2.0, 4.0), curve_methods=("lasso", "first_k"), latency_repeats=5)


def run_curves(size: Size, threads: int) -> list[dict]:
    """The paper's Fig. 4: every conv layer of the curve model pruned alone (test split)."""
    torch.set_num_threads(threads)
    warnings.simplefilter("ignore", SparseSamplesWarning)
    model = create_model(size.curve_model)
    images = calibration_subset(mnist_split("train"), size.budget.calib_images, 0)
    return analyze_layers(model, images, mnist_split("test"), size.curve_speedups, size.curve_methods,
                          size.budget.samples_per_image, seed=0, progress=False, ridge=size.budget.ridge)


def run_parallel(size: Size, out_dir: Path, workers: int, sections: set[str],
                 parts: tuple[str, ...] = PARTS, threads: int | None = None) -> list[dict]:
    """Accuracy jobs (the arms of ``parts``) and/or the curves, in ``workers`` processes of
    ``threads`` threads each (default: the machine's cores shared out); returns the curve rows
    (the jobs' rows are in their rows files)."""
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    rows_dir = out_dir / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    # seed by seed (a stopped run leaves whole seeds), the longest (residual) jobs first within a seed
    jobs = [(run_job, (m, s, size.budget, str(out_dir / "models") if s == size.seeds[0] else None,
                       str(rows_dir / f"{m}-seed{s}.jsonl"), threads, parts))
            for s in size.seeds for m in sorted(size.models, key=lambda m: m == "vgg16-mnist")
            ] if "accuracy" in sections else []
    if "curves" in sections:
        jobs.append((run_curves, (size, threads)))
    curve_rows: list[dict] = []
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pending = [(fn, pool.apply_async(fn, args)) for fn, args in jobs]
        for fn, result in tqdm(pending, desc="jobs", file=sys.stderr):
            value = result.get()  # a worker's exception is raised here
            if fn is run_curves:
                curve_rows = value
    return curve_rows


def discard_arms(out_dir: Path, arms: set[str], models: tuple[str, ...]) -> int:
    """Forget the saved rows and seed-0 models of ``arms`` for ``models`` (after a change of the
    recipe those arms use), so the next accuracy run measures them again; returns how many rows went."""
    dropped = 0
    for path in (out_dir / "rows").glob("*.jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        kept = [r for r in rows if not (r["arm"] in arms and r["model"] in models)]
        if len(kept) < len(rows):
            write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
            dropped += len(rows) - len(kept)
    for model in models:
        for arm in arms:
            for saved in (out_dir / "models").glob(f"{model}-{arm}-*x.safetensors"):
                saved.unlink()
    return dropped


def saved_rows(rows_dir: Path) -> list[dict]:
    """Every row the accuracy jobs saved, job by job (files in name order)."""
    return [json.loads(line) for path in sorted(rows_dir.glob("*.jsonl")) for line in path.read_text().splitlines()]


def run_latency(size: Size, out_dir: Path) -> dict[str, list[dict]]:
    """Latency of the seed-0 default-recipe models against their originals, one table per model,
    next to the same models pruned again with widths rounded to multiples of ``ROUND_TO`` (and,
    for residual nets, the paper's enhanced variant with its channel selects, and for FCP's models
    the fine-grained trunks with their selects and scatters). The accuracy jobs
    save those models; one that is missing (a run continued on another machine) is pruned again
    the same way (same images and seed)."""
    warnings.simplefilter("ignore", SparseSamplesWarning)
    test = mnist_split("test")
    images = calibration_subset(mnist_split("train"), size.budget.calib_images, size.seeds[0])
    b = size.budget
    results = {}
    for name in size.models:
        original = create_model(name)
        residual = any(g.residual for g in build_graph(original, images[:1], warn=False).groups)

        def saved(arm: str, speedup: float) -> torch.nn.Module:
            path = out_dir / "models" / f"{name}-{arm}-{speedup:g}x.safetensors"
            if path.exists():
                return load_model(path)
            net = prune(original, images, speedup, seed=size.seeds[0], progress=False, **arm_options(arm, b, name))[0]
            save_model(net, path)
            return net

        arm = DEFAULT_ARM
        pruned = {}
        if residual:  # the paper's feature-map sampling: what its channel selects cost
            pruned[f"enhanced-{b.residual_speedups[0]:g}x"] = saved("enhanced", b.residual_speedups[0])
        for s in sorted({*b.allocation_speedups, *b.peer_speedups, *(b.residual_speedups if residual else ())}):
            pruned[f"{arm}-{s:g}x"] = saved(arm, s)
            pruned[f"{arm}-{s:g}x round-to {ROUND_TO}"] = prune(
                original, images, s, round_to=ROUND_TO, progress=False, **arm_options(arm, b, name))[0]
        if name in b.trunk_models:  # what fine-grained trunks' gathers and scatters cost, at joint's FLOPs
            for s in b.trunk_speedups:
                if f"{arm}-{s:g}x" not in pruned:
                    pruned[f"{arm}-{s:g}x"] = saved(arm, s)
                pruned[f"trunk-fine-{s:g}x"] = saved("trunk-fine", s)
        print(f"latency: {name} ({len(pruned)} pruned)", file=sys.stderr, flush=True)
        rows = latency.compare(original, pruned, (1, 32, 32), size.latency_repeats)
        for row, net in zip(rows, [original, *pruned.values()]):
            row["test_acc"] = accuracy(net, test)
        results[name] = rows
    return results


def machine() -> str:
    """One line naming the machine, for the report."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu}, {os.cpu_count()} cores{gpu}; {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def update_readme(body: str) -> None:
    """Replace the README's suite block (between the markers) with ``body``."""
    text = README.read_text()
    start, end = MARKERS
    if start not in text or end not in text:
        raise SystemExit(f"README.md has no {start} ... {end} block to update")
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    README.write_text(pattern.sub(lambda _: f"{start}\n{body}\n{end}", text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="the minutes-long size (CI)")
    parser.add_argument("--models", help="comma-separated subset of the size's models")
    parser.add_argument("--seeds", help="comma-separated calibration seeds (default: the size's)")
    parser.add_argument("--sections", default="accuracy,curves,latency",
                        help="any of accuracy,curves,latency; '' rewrites the report from the saved results")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"the accuracy jobs' comparisons to run, any of {','.join(PARTS)}")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per worker (default: the cores shared out among the workers)")
    parser.add_argument("--out-dir", type=Path)
    parser.add_argument("--restart", action="store_true", help="discard the saved rows of earlier accuracy runs")
    parser.add_argument("--redo", default="", help="comma-separated arms whose saved rows (of --models) are "
                        "discarded first, e.g. after a change of the default recipe: default,trunk-keep,trunk-fine")
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so the worker pool is terminated with the run instead of orphaned
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    size = QUICK if args.quick else FULL
    if args.models:
        size = replace(size, models=tuple(args.models.split(",")))
    if args.seeds:
        size = replace(size, seeds=tuple(int(s) for s in args.seeds.split(",")))
    sections = {s for s in args.sections.split(",") if s}  # empty: only rewrite the report (and README)
    if sections - {"accuracy", "curves", "latency"}:
        parser.error(f"unknown sections {sorted(sections - {'accuracy', 'curves', 'latency'})}")
    parts = tuple(p for p in PARTS if p in args.parts.split(","))
    if set(args.parts.split(",")) - set(PARTS):
        parser.error(f"unknown parts {sorted(set(args.parts.split(',')) - set(PARTS))}; choose from {','.join(PARTS)}")
    require_torch_pruning()
    out_dir = args.out_dir or Path("benchmarks/results/suite-quick" if args.quick else "benchmarks/results/suite")
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.restart:
        shutil.rmtree(out_dir / "rows", ignore_errors=True)
    if args.redo:
        dropped = discard_arms(out_dir, set(args.redo.split(",")), size.models)
        print(f"discarded {dropped} saved rows of {args.redo}", file=sys.stderr)
    command = "python -m benchmarks.run" + (" --quick" if args.quick else "")
    minutes_file = out_dir / "minutes.json"
    minutes = json.loads(minutes_file.read_text()) if minutes_file.exists() else {}
    started = time.perf_counter()
    if sections & {"accuracy", "curves"}:
        resumed = "accuracy" in sections and any((out_dir / "rows").glob("*.jsonl"))
        curves = run_parallel(size, out_dir, args.workers, sections, parts, args.threads)
        if curves:
            (out_dir / "single_layer.json").write_text(json.dumps(curves, indent=1))
        label = " and ".join(sorted(sections & {"accuracy", "curves"}))
        # a resumed run adds its minutes to those of the runs it continues
        minutes[label] = minutes.get(label, 0.0) * resumed + (time.perf_counter() - started) / 60
    if any((out_dir / "rows").glob("*.jsonl")):  # the report reads every saved row, whatever this run did
        (out_dir / "accuracy.json").write_text(json.dumps(saved_rows(out_dir / "rows"), indent=1))
    if "latency" in sections:
        started = time.perf_counter()
        latency_file = out_dir / "latency.json"
        measured = json.loads(latency_file.read_text()) if latency_file.exists() else {}
        latency_file.write_text(json.dumps({**measured, **run_latency(size, out_dir)}, indent=1))
        minutes["latency"] = (time.perf_counter() - started) / 60
    minutes_file.write_text(json.dumps(minutes, indent=1))
    body = report.write(out_dir, size, command, machine(), minutes)
    if args.update_readme:
        update_readme(body)
    print(f"report: {out_dir / 'report.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
