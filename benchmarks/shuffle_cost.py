"""What rewriting channel shuffles as slices costs in latency (ShuffleNet v2 at 224x224).

chanprune replaces each channel shuffle by a concatenation of slices of its input and permutes the
layers downstream (``chanprune/shuffle.py``). This measures, in one run, the original model, the
same model with its shuffles rewritten and every channel kept (the same function: what the
rewrite alone costs or saves), and the default recipe at 2x, in torch eager and ONNX Runtime.
Random weights with BatchNorm statistics re-estimated on crops of real photos, as the
generality sweep prepares them.

    OMP_NUM_THREADS=1 python -m benchmarks.shuffle_cost --models shufflenet_v2_x0_5,shufflenet_v2_x1_0
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch

from benchmarks.generality import SweepConfig, prepared_model
from benchmarks.latency import compare, table
from chanprune.config import PruneConfig
from chanprune.files import write_text_atomic
from chanprune.graph import build_graph
from chanprune.pruner import prune
from chanprune.units import pruning_units


def every_channel_kept(model: torch.nn.Module, images: torch.Tensor) -> torch.nn.Module:
    """``model`` with its shuffles rewritten and every unit at its full width (no refit)."""
    graph = build_graph(model, images[:1], warn=False)
    widths = {(u.reader.name if u.reader else f"group:{u.name}"): u.channels for u in pruning_units(graph, PruneConfig())}
    kept, _ = prune(model, images, None, widths=widths, reconstruct=False, progress=False)
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="shufflenet_v2_x0_5,shufflenet_v2_x1_0", help="torchvision names")
    parser.add_argument("--speedup", type=float, default=2.0)
    parser.add_argument("--images", type=int, default=64, help="calibration images")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/shuffle-cost.json"))
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    cfg = SweepConfig(images=args.images)
    results, text = {}, [f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), median of "
                         f"{args.repeats} runs; speed-up over the original in the same run"]
    for name in args.models.split(","):
        model, images = prepared_model(f"torchvision:{name}", cfg)
        kept = every_channel_kept(model, images)
        with torch.no_grad():
            assert torch.allclose(kept(images[:4]), model(images[:4]), rtol=1e-4, atol=1e-4)
        pruned, _ = prune(model, images, args.speedup, progress=False)
        rows = compare(model, {"shuffles rewritten, every channel kept": kept,
                               f"default recipe {args.speedup:g}x": pruned}, tuple(images.shape[1:]), args.repeats)
        results[name] = rows
        text += [f"\n### {name}\n", table(rows)]
        print("\n".join(text[-2:]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(results, indent=2))
    write_text_atomic(args.out.with_suffix(".md"), "\n".join(text) + "\n")


if __name__ == "__main__":
    main()
