"""Measured CPU latency speed-up versus FLOPs speed-up of the pruned bundled VGG-16.

torch eager on the CPU, median of repeated runs after warm-up, at batch 1 and 32, in the
default (NCHW) and channels_last memory formats.

    python -m benchmarks.latency --speedups 2,4,5 --method lasso
"""

from __future__ import annotations

import argparse
import copy
import json
import warnings
from pathlib import Path

import torch

from chanprune.data import calibration_subset, mnist_split
from chanprune.errors import SparseSamplesWarning
from chanprune.flops import count_flops
from chanprune.latency import measure_latency
from chanprune.models import create_model
from chanprune.pruner import prune

SHAPE = (1, 32, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speedups", default="2,4,5")
    parser.add_argument("--method", default="lasso")
    parser.add_argument("--calib-images", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/latency.json"))
    args = parser.parse_args()
    warnings.simplefilter("ignore", SparseSamplesWarning)
    model = create_model("vgg16-mnist")
    images = calibration_subset(mnist_split("train"), args.calib_images, 0)
    nets = {1.0: model}
    for s in (float(x) for x in args.speedups.split(",")):
        nets[s], _ = prune(model, images, s, args.method, progress=False)
    flops0 = count_flops(model, (1, *SHAPE))
    rows = []
    for target, net in nets.items():
        row = {"target": target, "flops_speedup": flops0 / count_flops(net, (1, *SHAPE))}
        for batch in (1, 32):
            for fmt in ("nchw", "channels_last"):
                row[f"ms_b{batch}_{fmt}"] = 1e3 * measure_latency(copy.deepcopy(net), SHAPE, batch, args.repeats,
                                                                   channels_last=fmt == "channels_last")
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} runs",
             "", "| target | FLOPs speed-up | b1 NCHW | b1 channels_last | b32 NCHW | b32 channels_last |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[k]:.2f} ms ({base[k] / r[k]:.2f}x)" for k in
                 ("ms_b1_nchw", "ms_b1_channels_last", "ms_b32_nchw", "ms_b32_channels_last")]
        lines.append(f"| {r['target']:g}x | {r['flops_speedup']:.2f}x | " + " | ".join(cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
