"""The bundled demo: VGG-16 on MNIST pruned at 2x, 4x, 5x three ways, in one table.

The rows: He et al.'s recipe (``recipe="paper"``), chanprune's default recipe, and filter pruning
(Li et al.'s max response, the paper's recipe otherwise), each with test accuracy, logit error
against the original and measured CPU latency.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from tqdm.auto import tqdm

from .data import calibration_subset, mnist_split
from .errors import SparseSamplesWarning
from .evaluate import accuracy, logit_rel_error, predict
from .flops import count_flops, count_params
from .latency import measure_latency
from .models import BUNDLED, create_model
from .pruner import SPARSE_SAMPLES_PER_INPUT, prune
from .report import PruneReport


ARMS: dict[str, dict[str, Any]] = {
    "paper (He et al.)": {"recipe": "paper"},
    "chanprune default": {"recipe": "default"},
    "filter pruning": {"recipe": "paper", "method": "max_response"},
}


def run_demo(model_name: str = "vgg16-mnist", speedups: tuple[float, ...] = (2.0, 4.0, 5.0),
             calib_images: int = 1000, seed: int = 0, progress: bool = True) -> list[dict[str, Any]]:
    """Rows of the demo table: the original model, then one row per (arm, speed-up)."""
    entry = BUNDLED[model_name]
    model = create_model(model_name)
    test = mnist_split("test")
    images = calibration_subset(mnist_split("train"), calib_images, seed)
    shape = (1, entry.in_chans, *entry.input_size)
    reference = predict(model, test.images)
    flops0 = count_flops(model, shape)

    def row(method: str, target: float | None, net: torch.nn.Module) -> dict[str, Any]:
        return {"method": method, "target": target, "speedup": flops0 / count_flops(net, shape),
                "params": count_params(net), "test_acc": accuracy(net, test),
                "logit_err": logit_rel_error(predict(net, test.images), reference),
                "ms_b1": 1e3 * measure_latency(net, shape[1:], 1),
                "ms_b32": 1e3 * measure_latency(net, shape[1:], 32)}

    rows = [{**row("original", None, model), "sparse": 0}]
    runs = [(arm, s) for s in speedups for arm in ARMS]
    for arm, speedup in tqdm(runs, desc="demo", disable=not progress):
        with warnings.catch_warnings():  # counted in the table instead
            warnings.simplefilter("ignore", SparseSamplesWarning)
            pruned, report = prune(model, images, speedup, progress=False, seed=seed, **ARMS[arm])
        rows.append({**row(arm, speedup, pruned), "sparse": sparse_layers(pruned, report)})
    return rows


def sparse_layers(pruned: torch.nn.Module, report: PruneReport) -> int:
    """Layers fitted on fewer than 3 samples per kept input (what SparseSamplesWarning names)."""
    return sum(1 for layer in report.layers if layer.samples is not None
               and layer.samples < SPARSE_SAMPLES_PER_INPUT * pruned.get_submodule(layer.name).weight[0].numel())


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of demo rows."""
    header = "| recipe | target | achieved | params | test acc | logit err | ms @ b1 | ms @ b32 | sparse fits |"
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        target = "-" if r["target"] is None else f"{r['target']:g}x"
        lines.append(f"| {r['method']} | {target} | {r['speedup']:.2f}x | {r['params'] / 1e6:.2f} M | "
                     f"{100 * r['test_acc']:.1f}% | {r['logit_err']:.3f} | {r['ms_b1']:.2f} | {r['ms_b32']:.1f} | "
                     f"{r['sparse']} |")
    return "\n".join(lines)
