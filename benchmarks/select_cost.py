"""What channel copies cost at run time: the channel selects of feature-map sampling and the
scatters of fine-grained (FCP) trunk writers, in a pruned residual net.

Prunes a bundled residual model (by default the paper's enhanced variant: selects in front of
the convs that read a kept trunk; ``--trunk fine --allocation uniform`` also makes every branch
end write a subset of the trunk), then profiles torch eager CPU forward passes and reports the
share of time spent copying channels (aten::index_select, and aten::constant_pad_nd for the
scatters' zero channel) next to the model's latency with and without the copies; then the same
in ONNX Runtime (Gather and Pad nodes' share of kernel time, from its profiler). "Without"
replaces every select by a plain conv on the first channels of its input and every scatter by
a zero-padding of the layer's output to the trunk's width: not the same function, only the
same arithmetic, so it bounds what the copies cost. ``--against joint`` also times the model
pruned with that trunk mode at the same speed-up and allocation (equal FLOPs within 2%).

    python -m benchmarks.select_cost --model resnet56-mnist --speedup 2
    python -m benchmarks.select_cost --model resnet56-mnist --speedup 2 --trunk fine --allocation uniform
    python -m benchmarks.select_cost --model resnet56-mnist --speedup 4 --trunk fine --allocation uniform --against joint
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from chanprune.data import calibration_subset, mnist_split
from chanprune.errors import SparseSamplesWarning
from chanprune.export import export_onnx, select_cost_onnx
from chanprune.files import write_text_atomic
from chanprune.flops import count_flops
from chanprune.latency import measure_latency
from chanprune.config import TRUNK_MODES
from chanprune.layers import ScatteredBatchNorm2d, ScatteredConv2d, SelectedConv2d
from chanprune.models import BUNDLED, create_model
from chanprune.pruner import prune
from chanprune.surgery import replace_module

BATCHES = (1, 32)


def without_copies(model: nn.Module) -> nn.Module:
    """The same arithmetic minus the copies: each SelectedConv2d becomes a conv over the first
    len(index) channels of its input (a contiguous slice costs nothing in eager mode), each
    scattered layer a plain one whose output is zero-padded to the trunk's width."""
    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, (ScatteredConv2d, ScatteredBatchNorm2d)):
            plain = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                              m.groups, m.bias is not None) if isinstance(m, nn.Conv2d) else \
                nn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
            replace_module(model, name, _Padded(plain.eval(), m.scattered_to))
        elif isinstance(m, SelectedConv2d):
            conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                             m.groups, m.bias is not None)
            replace_module(model, name, _Sliced(conv, m.in_channels))
    return model


class _Padded(nn.Module):
    def __init__(self, layer: nn.Module, channels: int):
        super().__init__()
        self.layer, self.channels = layer, channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        return nn.functional.pad(y, (0, 0, 0, 0, 0, self.channels - y.shape[1]))


class _Sliced(nn.Module):
    def __init__(self, conv: nn.Conv2d, channels: int):
        super().__init__()
        self.conv, self.channels = conv, channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x[:, : self.channels])


@torch.no_grad()
def select_share(model: nn.Module, shape: tuple[int, ...], batch: int, repeats: int) -> float:
    """Fraction of profiled CPU time spent copying channels (aten::index_select and aten::constant_pad_nd)."""
    x = torch.randn(batch, *shape)
    model.eval()
    for _ in range(3):
        model(x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            model(x)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    selects = sum(e.self_cpu_time_total for e in events if e.key in ("aten::index_select", "aten::constant_pad_nd"))
    return selects / total if total else 0.0


def onnx_timings(model: nn.Module, shape: tuple[int, ...], batches: tuple[int, ...],
                 repeats: int) -> dict[int, dict[str, float]]:
    """For each batch size, ONNX Runtime latency (ms) of ``model`` and the share of its kernel time
    in Gather and Pad nodes (the model is exported once)."""
    with tempfile.TemporaryDirectory(prefix="chanprune-select-cost-") as tmp:
        path = export_onnx(model, Path(tmp) / "model.onnx", shape)
        costs = {b: select_cost_onnx(path, shape, b, repeats, threads=torch.get_num_threads()) for b in batches}
    return {b: {"ms": c["ms_median"], "copy_share": c["gather_share"] + c["pad_share"]} for b, c in costs.items()}


def measure(pruned: nn.Module, shape: tuple[int, ...], repeats: int) -> dict[str, Any]:
    """Copies and latency of ``pruned`` in torch eager and ONNX Runtime at batch 1 and 32."""
    row: dict[str, Any] = {"selects": sum(isinstance(m, SelectedConv2d) for m in pruned.modules()),
                           "scatters": sum(isinstance(m, (ScatteredConv2d, ScatteredBatchNorm2d))
                                           for m in pruned.modules()),
                           "flops": count_flops(pruned, (1, *shape))}
    plain = without_copies(pruned)
    ort, ort_plain = onnx_timings(pruned, shape, BATCHES, repeats), onnx_timings(plain, shape, BATCHES, repeats)
    for batch in BATCHES:
        row[f"select_share_b{batch}"] = select_share(pruned, shape, batch, repeats)
        row[f"ms_b{batch}"] = 1e3 * measure_latency(pruned, shape, batch, repeats)
        row[f"ms_b{batch}_no_copies"] = 1e3 * measure_latency(plain, shape, batch, repeats)
        row[f"ort_copy_share_b{batch}"] = ort[batch]["copy_share"]
        row[f"ort_ms_b{batch}"], row[f"ort_ms_b{batch}_no_copies"] = ort[batch]["ms"], ort_plain[batch]["ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet56-mnist")
    parser.add_argument("--speedup", type=float, default=2.0)
    parser.add_argument("--calib-images", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--trunk", choices=TRUNK_MODES, default=None,
                        help="prune with the default recipe and this trunk mode (default: the paper's recipe)")
    parser.add_argument("--allocation", default=None, help="with --trunk: the allocation (default: the recipe's)")
    parser.add_argument("--against", choices=TRUNK_MODES, default=None,
                        help="with --trunk: also time this trunk mode at the same speed-up and allocation")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/results/select-cost-MODEL[-TRUNK-ALLOCATION[-Sx-vs-MODE]].json")
    args = parser.parse_args()
    if args.against and not args.trunk:
        parser.error("--against compares trunk modes: give --trunk too")
    warnings.simplefilter("ignore", SparseSamplesWarning)
    entry = BUNDLED[args.model]
    shape = (entry.in_chans, *entry.input_size)
    model = create_model(args.model)
    images = calibration_subset(mnist_split("train"), args.calib_images, 0)
    options = {"recipe": "paper"} if args.trunk is None else {"trunk": args.trunk, "allocation": args.allocation}
    pruned, _ = prune(model, images, args.speedup, progress=False, **options)
    row = {"model": args.model, "speedup": args.speedup, "trunk": args.trunk or "paper", "allocation": args.allocation,
           "threads": torch.get_num_threads(), "flops_original": count_flops(model, (1, *shape)),
           **measure(pruned, shape, args.repeats)}
    if args.against:
        other, _ = prune(model, images, args.speedup, progress=False, **{**options, "trunk": args.against})
        row[args.against] = measure(other, shape, args.repeats)
    print(json.dumps(row), flush=True)
    suffix = "" if args.trunk is None else f"-{args.trunk}-{args.allocation or 'default'}"
    suffix += f"-{args.speedup:g}x-vs-{args.against}" if args.against else ""
    out = args.out or Path(f"benchmarks/results/select-cost-{args.model}{suffix}.json")
    write_text_atomic(out, json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
