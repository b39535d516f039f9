"""Wall-clock latency of a model: warm-up, repeats, median (CPU, or a CUDA device)."""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn


@torch.no_grad()
def measure_latency(model: nn.Module, input_shape: tuple[int, ...], batch_size: int, repeats: int = 20,
                    warmup: int = 5, channels_last: bool = False, device: str = "cpu") -> float:
    """Median seconds of one forward pass at ``batch_size`` (torch eager, current thread count).

    The model is copied, so the caller's stays where it is. On CUDA each run is synchronised.
    """
    model = copy.deepcopy(model).eval().to(device)
    x = torch.randn(batch_size, *input_shape, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        model(x)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
