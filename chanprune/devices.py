"""The device a command runs its model on: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``."""

from __future__ import annotations

import torch

from .errors import ChanpruneError

DEVICE_HELP = "cpu, cuda, cuda:N, or auto (a GPU where there is one)"


def resolve_device(text: str | None) -> torch.device | None:
    """``text`` as a torch device (None stays None: the caller's default); ``auto`` is the first GPU
    where CUDA is available, else the CPU. A GPU that is not there is refused here, not deep inside."""
    if text is None:
        return None
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ChanpruneError(f"unknown device {text!r}; use {DEVICE_HELP}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ChanpruneError(f"device {text!r} asked for but CUDA is not available here; use --device cpu "
                                 "(or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ChanpruneError(f"device {text!r} does not exist: this machine has {torch.cuda.device_count()} "
                                 "GPU(s)")
    elif device.type != "cpu":
        raise ChanpruneError(f"device {text!r} is not supported; use {DEVICE_HELP}")
    return device
