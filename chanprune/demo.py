"""The bundled demo: VGG-16 on MNIST pruned at 2x, 4x, 5x by LASSO and by filter pruning.

Every run carries the calibration images through the original and the pruned model once.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from .data import calibration_subset, mnist_split
from .evaluate import accuracy, logit_rel_error, predict
from .flops import count_flops, count_params
from .latency import measure_latency
from .models import BUNDLED, create_model
from .pruner import prune

COLUMNS = ("method", "target", "speedup", "params", "test_acc", "logit_err", "ms_b1", "ms_b32")


def run_demo(model_name: str = "vgg16-mnist", methods: tuple[str, ...] = ("lasso", "max_response"),
             speedups: tuple[float, ...] = (2.0, 4.0, 5.0), calib_images: int = 1000,
             samples_per_image: int = 10, seed: int = 0, progress: bool = True,
             **options: Any) -> list[dict[str, Any]]:
    """Rows of the demo table: the original model, then one row per (method, speed-up)."""
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

    rows = [row("original", None, model)]
    runs = [(m, s) for m in methods for s in speedups]
    for method, speedup in tqdm(runs, desc="demo", disable=not progress):
        pruned, _ = prune(model, images, speedup, method=method, progress=progress,
                          samples_per_image=samples_per_image, seed=seed, **options)
        rows.append(row(method, speedup, pruned))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of demo rows."""
    header = "| method | target | achieved | params | test acc | logit err | ms @ b1 | ms @ b32 |"
    lines = [header, "|" + "---|" * 8]
    for r in rows:
        target = "-" if r["target"] is None else f"{r['target']:g}x"
        lines.append(f"| {r['method']} | {target} | {r['speedup']:.2f}x | {r['params'] / 1e6:.2f} M | "
                     f"{100 * r['test_acc']:.1f}% | {r['logit_err']:.3f} | {r['ms_b1']:.2f} | {r['ms_b32']:.1f} |")
    return "\n".join(lines)
