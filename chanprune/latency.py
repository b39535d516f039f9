"""Wall-clock latency of a model on the CPU: warm-up, repeats, median."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


@torch.no_grad()
def measure_latency(model: nn.Module, input_shape: tuple[int, ...], batch_size: int, repeats: int = 20,
                    warmup: int = 5, channels_last: bool = False) -> float:
    """Median seconds of one forward pass at ``batch_size`` (torch eager, current thread count)."""
    model = model.eval()
    x = torch.randn(batch_size, *input_shape)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
