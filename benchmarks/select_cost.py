"""What feature-map sampling costs at run time: the channel selects in a pruned residual net.

Prunes a bundled residual model with the enhanced variant (selects in front of the convs that
read a kept trunk), then profiles torch eager CPU forward passes and reports the share of time
spent in the selects (aten::index_select) next to the model's latency with and without them.
"Without" replaces every select by a plain conv on a pre-sliced copy of the weights, which is
not the same function, only the same arithmetic: it bounds what the selects cost.

    python -m benchmarks.select_cost --model resnet56-mnist --speedup 2
"""

from __future__ import annotations

import argparse
import copy
import json
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from chanprune.data import calibration_subset, mnist_split
from chanprune.errors import SparseSamplesWarning
from chanprune.latency import measure_latency
from chanprune.layers import SelectedConv2d
from chanprune.models import BUNDLED, create_model
from chanprune.pruner import prune
from chanprune.surgery import replace_module


def without_selects(model: nn.Module) -> nn.Module:
    """The same arithmetic minus the selects: each SelectedConv2d becomes a conv over the first
    len(index) channels of its input (a contiguous slice costs nothing in eager mode)."""
    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, SelectedConv2d):
            conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                             m.groups, m.bias is not None)
            replace_module(model, name, _Sliced(conv, m.in_channels))
    return model


class _Sliced(nn.Module):
    def __init__(self, conv: nn.Conv2d, channels: int):
        super().__init__()
        self.conv, self.channels = conv, channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x[:, : self.channels])


@torch.no_grad()
def select_share(model: nn.Module, shape: tuple[int, ...], batch: int, repeats: int) -> float:
    """Fraction of profiled CPU time spent in aten::index_select."""
    x = torch.randn(batch, *shape)
    model.eval()
    for _ in range(3):
        model(x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            model(x)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    selects = sum(e.self_cpu_time_total for e in events if e.key == "aten::index_select")
    return selects / total if total else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet56-mnist")
    parser.add_argument("--speedup", type=float, default=2.0)
    parser.add_argument("--calib-images", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/select-cost-MODEL.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore", SparseSamplesWarning)
    entry = BUNDLED[args.model]
    shape = (entry.in_chans, *entry.input_size)
    model = create_model(args.model)
    images = calibration_subset(mnist_split("train"), args.calib_images, 0)
    pruned, _ = prune(model, images, args.speedup, recipe="paper", progress=False)
    n_selects = sum(isinstance(m, SelectedConv2d) for m in pruned.modules())
    row = {"model": args.model, "speedup": args.speedup, "selects": n_selects, "threads": torch.get_num_threads()}
    for batch in (1, 32):
        row[f"select_share_b{batch}"] = select_share(pruned, shape, batch, args.repeats)
        row[f"ms_b{batch}"] = 1e3 * measure_latency(pruned, shape, batch, args.repeats)
        row[f"ms_b{batch}_no_selects"] = 1e3 * measure_latency(without_selects(pruned), shape, batch, args.repeats)
    print(json.dumps(row), flush=True)
    out = args.out or Path(f"benchmarks/results/select-cost-{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
