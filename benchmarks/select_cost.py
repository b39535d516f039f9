"""What channel copies cost at run time: the channel selects of feature-map sampling and the
scatters of fine-grained (FCP) trunk writers, in a pruned residual net.

Prunes a bundled residual model (by default the paper's enhanced variant: selects in front of
the convs that read a kept trunk; ``--trunk fine --allocation uniform`` also makes every branch
end write a subset of the trunk), then profiles torch eager CPU forward passes and reports the
share of time spent copying channels (aten::index_select, and aten::constant_pad_nd for the
scatters' zero channel) next to the model's latency with and without the copies. "Without"
replaces every select by a plain conv on the first channels of its input and every scatter by
a zero-padding of the layer's output to the trunk's width: not the same function, only the
same arithmetic, so it bounds what the copies cost.

    python -m benchmarks.select_cost --model resnet56-mnist --speedup 2
    python -m benchmarks.select_cost --model resnet56-mnist --speedup 2 --trunk fine --allocation uniform
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
from chanprune.config import TRUNK_MODES
from chanprune.layers import ScatteredBatchNorm2d, ScatteredConv2d, SelectedConv2d
from chanprune.models import BUNDLED, create_model
from chanprune.pruner import prune
from chanprune.surgery import replace_module


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet56-mnist")
    parser.add_argument("--speedup", type=float, default=2.0)
    parser.add_argument("--calib-images", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--trunk", choices=TRUNK_MODES, default=None,
                        help="prune with the default recipe and this trunk mode (default: the paper's recipe)")
    parser.add_argument("--allocation", default=None, help="with --trunk: the allocation (default: the recipe's)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/select-cost-MODEL.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore", SparseSamplesWarning)
    entry = BUNDLED[args.model]
    shape = (entry.in_chans, *entry.input_size)
    model = create_model(args.model)
    images = calibration_subset(mnist_split("train"), args.calib_images, 0)
    options = {"recipe": "paper"} if args.trunk is None else {"trunk": args.trunk, "allocation": args.allocation}
    pruned, _ = prune(model, images, args.speedup, progress=False, **options)
    n_selects = sum(isinstance(m, SelectedConv2d) for m in pruned.modules())
    n_scatters = sum(isinstance(m, (ScatteredConv2d, ScatteredBatchNorm2d)) for m in pruned.modules())
    row = {"model": args.model, "speedup": args.speedup, "trunk": args.trunk or "paper", "allocation": args.allocation,
           "selects": n_selects, "scatters": n_scatters, "threads": torch.get_num_threads()}
    for batch in (1, 32):
        row[f"select_share_b{batch}"] = select_share(pruned, shape, batch, args.repeats)
        row[f"ms_b{batch}"] = 1e3 * measure_latency(pruned, shape, batch, args.repeats)
        row[f"ms_b{batch}_no_copies"] = 1e3 * measure_latency(without_copies(pruned), shape, batch, args.repeats)
    print(json.dumps(row), flush=True)
    suffix = "" if args.trunk is None else f"-{args.trunk}-{args.allocation or 'default'}"
    out = args.out or Path(f"benchmarks/results/select-cost-{args.model}{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
