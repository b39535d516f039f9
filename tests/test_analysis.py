"""Single-layer analysis (the paper's Fig. 4): one layer pruned alone, rows and plots."""

from __future__ import annotations

import pytest
import torch

from chanprune.analysis import analyze_layers, write_analysis
from chanprune.data import Split
from chanprune.graph import build_graph

from conftest import make_tiny, random_images


@pytest.mark.parametrize("ridge", [1e-6, "auto"])
def test_every_layer_is_pruned_alone_at_every_speedup(ridge, tmp_path):
    model = make_tiny(7)
    images = random_images(80, seed=8)
    split = Split(random_images(40, seed=9), torch.randint(0, 16, (40,), generator=torch.Generator().manual_seed(0)))
    rows = analyze_layers(model, images, split, (2.0, 4.0), ("lasso", "first_k"), samples_per_image=5,
                          progress=False, ridge=ridge)
    groups = [g for g in build_graph(model, images[:1]).prunable() if all(r.kind == "conv" for r in g.readers)]
    assert len(rows) == len(groups) * 2 * 2
    for row in rows:
        assert row["kept"] == max(1, round(row["channels"] / row["speedup"]))
        assert 0 <= row["rel_error"] <= 1 + 1e-6 and row["rel_error_heldout"] >= 0
    by = {(r["layer"], r["method"], r["speedup"]): r for r in rows}
    for layer in {r["layer"] for r in rows}:
        if ridge == "auto":  # the chosen ridge may differ between the two fits
            continue
        # first_k at 4x keeps a subset of what it keeps at 2x: least squares cannot fit better
        assert by[layer, "first_k", 4.0]["rel_error"] >= by[layer, "first_k", 2.0]["rel_error"] - 1e-6
    paths = write_analysis(rows, tmp_path)
    assert {p.name for p in paths} >= {"single_layer.csv", "single_layer.json"}
    assert sum(p.suffix == ".png" for p in paths) == len(groups)
