"""Single-layer analysis (the paper's Fig. 4): prune one layer alone, measure what it costs.

For every prunable conv group, at every speed-up S the group keeps round(c / S) channels, chosen
by each strategy and followed by least squares; the rest of the model is untouched. Recorded:
increase of test error (points) and the relative reconstruction error of the reader.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import Unit
from .data import LabelledData
from .evaluate import accuracy, model_device
from .extras import require
from .files import write_text_atomic
from .graph import build_graph
from .config import PruneConfig
from .engine.calibration import Sampling, unpruned_moments
from .engine.store import BatchStore, default_budget
from .engine.run import PruneRun

FIELDS = ("layer", "method", "speedup", "kept", "channels", "error_increase", "rel_error", "rel_error_heldout")


def analyze_layers(model: nn.Module, images: torch.Tensor, split: LabelledData, speedups: tuple[float, ...],
                   methods: tuple[str, ...], samples_per_image: int | str | None = None, seed: int = 0,
                   progress: bool = True, ridge: float | str = 1e-6) -> list[dict[str, Any]]:
    """One row per (conv group, method, speed-up); ``ridge`` as in :class:`PruneConfig`. Statistics
    are gathered on the model's device."""
    device = model_device(model)
    graph = build_graph(model, images[:1].to(device))
    base_error = 1.0 - accuracy(model, split)
    groups = [g for g in graph.prunable() if all(r.kind == "conv" and r.groups == 1 for r in g.readers)]
    jobs = [(g, m, s) for g in groups for s in speedups for m in methods]
    rows = []
    base = PruneConfig(samples_per_image=samples_per_image, seed=seed)
    sampling = Sampling(base.positions_per_image, seed, base.heldout_every)
    with BatchStore(default_budget(device), device) as store:
        # inputs come from the unpruned model: shared by every job of a group
        found = unpruned_moments(graph, images, base.batch_size, sampling, [g.readers for g in groups],
                                 store, images.shape[1])
    moments = {g.name: m for g, m in zip(groups, found)}
    for group, method, speedup in tqdm(jobs, desc="analyze", disable=not progress):
        n_keep = max(1, round(group.channels / speedup))
        cfg = PruneConfig(speedup=speedup, method=method, samples_per_image=samples_per_image, seed=seed,
                          ridge=ridge)
        run = PruneRun(graph, cfg)
        run.prune_unit(Unit(group), n_keep, moments[group.name])
        pruned = run.result(model)
        reader = run.errors[group.readers[0].name]
        rows.append({"layer": group.readers[0].name, "method": method, "speedup": speedup, "kept": n_keep,
                     "channels": group.channels,
                     "error_increase": 100.0 * ((1.0 - accuracy(pruned, split)) - base_error),
                     "rel_error": reader["rel_error"], "rel_error_heldout": reader["rel_error_heldout"]})
    return rows


def write_analysis(rows: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write rows as CSV and JSON and one PNG per layer; returns the written paths."""
    require("matplotlib", "plots").use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out_dir / "single_layer.csv", buffer.getvalue())
    write_text_atomic(out_dir / "single_layer.json", json.dumps(rows, indent=2))
    paths = [out_dir / "single_layer.csv", out_dir / "single_layer.json"]
    for layer in dict.fromkeys(r["layer"] for r in rows):
        fig, (ax_err, ax_rec) = plt.subplots(1, 2, figsize=(9, 3.4))
        for method in dict.fromkeys(r["method"] for r in rows):
            sel = [r for r in rows if r["layer"] == layer and r["method"] == method]
            xs = [r["speedup"] for r in sel]
            ax_err.plot(xs, [r["error_increase"] for r in sel], marker="o", label=method)
            ax_rec.plot(xs, [r["rel_error_heldout"] for r in sel], marker="o", label=method)
        ax_err.set(xlabel="speed-up ratio", ylabel="increase of test error (points)", title=layer)
        ax_rec.set(xlabel="speed-up ratio", ylabel="rel. reconstruction error (held-out)")
        ax_err.legend()
        fig.tight_layout()
        path = out_dir / f"single_layer_{layer.replace('.', '_')}.png"
        tmp = path.with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=110)
        tmp.replace(path)
        plt.close(fig)
        paths.append(path)
    return paths
