"""Measured latency speed-up next to FLOPs speed-up of pruned models.

torch eager on the CPU at batch 1 and 32 (NCHW and channels_last), ONNX Runtime on the CPU at
batch 1 and 32, and torch eager on CUDA when a GPU is present: the median of repeated runs
after warm-up, every engine at the process's thread count.

    python -m benchmarks.latency --model vgg16-mnist --speedups 2,4,5 --recipe paper
    python -m benchmarks.latency --recipe default --speedups 4 --round-to 1,8
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from chanprune.data import calibration_subset, mnist_split
from chanprune.errors import SparseSamplesWarning
from chanprune.export import export_onnx, select_cost_onnx
from chanprune.flops import count_flops
from chanprune.latency import measure_latency
from chanprune.layers import ScatteredBatchNorm2d, ScatteredConv2d, SelectedConv2d
from chanprune.models import create_model
from chanprune.pruner import prune

BATCHES = (1, 32)


def engines() -> list[str]:
    """The engine columns measured on this machine."""
    names = [f"eager b{b} {fmt}" for b in BATCHES for fmt in ("nchw", "channels_last")]
    names += [f"onnxruntime b{b}" for b in BATCHES]
    if torch.cuda.is_available():
        names += [f"cuda b{b}" for b in BATCHES]
    return names


def timings(net: nn.Module, shape: tuple[int, ...], repeats: int) -> tuple[dict[str, float], float]:
    """Milliseconds per forward pass of ``net`` for every engine of :func:`engines`, and the share
    of ONNX Runtime's kernel time (batch 32) spent copying channels: channel selects and
    fine-grained trunk scatters (Gather and Pad nodes)."""
    ms: dict[str, float] = {}
    for b in BATCHES:
        for fmt in ("nchw", "channels_last"):
            ms[f"eager b{b} {fmt}"] = 1e3 * measure_latency(net, shape, b, repeats,
                                                            channels_last=fmt == "channels_last")
    with tempfile.TemporaryDirectory(prefix="chanprune-latency-") as tmp:
        path = export_onnx(net, Path(tmp) / "model.onnx", shape)
        for b in BATCHES:
            cost = select_cost_onnx(path, shape, b, repeats, threads=torch.get_num_threads())
            ms[f"onnxruntime b{b}"] = cost["ms_median"]
    if torch.cuda.is_available():
        for b in BATCHES:
            ms[f"cuda b{b}"] = 1e3 * measure_latency(net, shape, b, repeats, device="cuda")
    return ms, cost["gather_share"] + cost["pad_share"]


def compare(original: nn.Module, pruned: dict[str, nn.Module], shape: tuple[int, ...], repeats: int) -> list[dict]:
    """One row per model (the original first): FLOPs speed-up, milliseconds and measured speed-ups."""
    flops0 = count_flops(original, (1, *shape))
    rows = []
    for label, net in {"original": original, **pruned}.items():
        ms, copy_share = timings(net, shape, repeats)
        rows.append({"model": label, "flops_speedup": flops0 / count_flops(net, (1, *shape)), "ms": ms,
                     "selects": sum(isinstance(m, SelectedConv2d) for m in net.modules()),
                     "scatters": sum(isinstance(m, (ScatteredConv2d, ScatteredBatchNorm2d)) for m in net.modules()),
                     "onnx_copy_share": copy_share})
    for row in rows:
        row["speedup"] = {k: rows[0]["ms"][k] / v for k, v in row["ms"].items()}
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: measured speed-up per engine (milliseconds in brackets) next to the FLOPs speed-up."""
    names = list(rows[0]["ms"])
    acc = "test_acc" in rows[0]
    lines = ["| model | " + ("test acc | " if acc else "") + "FLOPs speed-up | " + " | ".join(names) +
             " | channel selects + scatters (ORT b32 time share) |", "|---|---|" + "---|" * (len(names) + acc + 1)]
    for r in rows:
        cells = [f"{r['speedup'][k]:.2f}x ({r['ms'][k]:.2f} ms)" for k in names]
        copies = r["selects"] + r.get("scatters", 0)
        share = r.get("onnx_copy_share", r.get("onnx_select_share"))  # the older name, before scatters existed
        selects = f"{r['selects']} + {r.get('scatters', 0)} ({100 * share:.1f}%)" if copies else "0"
        lines.append(f"| {r['model']} | " + (f"{100 * r['test_acc']:.1f}% | " if acc else "") +
                     f"{r['flops_speedup']:.2f}x | " + " | ".join(cells) + f" | {selects} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg16-mnist")
    parser.add_argument("--speedups", default="2,4,5")
    parser.add_argument("--recipe", default="paper")
    parser.add_argument("--method", default=None, help="default: the recipe's")
    parser.add_argument("--round-to", default="1", help="comma-separated: one pruned model per value")
    parser.add_argument("--calib-images", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/latency.json"))
    args = parser.parse_args()
    warnings.simplefilter("ignore", SparseSamplesWarning)
    model = create_model(args.model)
    images = calibration_subset(mnist_split("train"), args.calib_images, 0)
    name = args.method or args.recipe
    pruned = {f"{name} {s}x" + (f" round-to {r}" if r != "1" else ""):
              prune(model, images, float(s), args.method, recipe=args.recipe, round_to=int(r), progress=False)[0]
              for s in args.speedups.split(",") for r in args.round_to.split(",")}
    rows = compare(model, pruned, tuple(images.shape[1:]), args.repeats)
    text = f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} runs\n\n" + table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
