"""Per-batch values within a memory budget: in memory while they fit, else in files of a private
temporary folder (safetensors, memory-mapped on read) that is removed when the store closes."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def available_memory(device: torch.device) -> int | None:
    """Free bytes on ``device`` (host RAM for the CPU), or None when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def default_budget(device: torch.device) -> int:
    """Half of the free memory on ``device`` (1 GiB when that is unknown)."""
    free = available_memory(device)
    return free // 2 if free else 2**30


def _nbytes(values: dict[str, Any]) -> int:
    return sum(v.numel() * v.element_size() for v in values.values() if isinstance(v, torch.Tensor))


class BatchStore:
    """``(batch, slot) -> {name: value}`` with at most ``budget`` bytes of tensors held in memory.

    Entries that do not fit are written to disk; non-tensor values (shapes, ints) always stay in
    memory. ``spilled_bytes`` and ``peak_bytes`` say how it went.
    """

    def __init__(self, budget: int, device: torch.device):
        self.budget, self.device = budget, device
        self.memory: dict[tuple[int, str], dict[str, Any]] = {}
        self.files: dict[tuple[int, str], tuple[Path, dict[str, Any]]] = {}
        self.held = self.peak_bytes = self.spilled_bytes = 0
        self._folder: Path | None = None

    def put(self, batch: int, slot: str, values: dict[str, Any]) -> None:
        self.drop(batch, slot)
        size = _nbytes(values)
        if self.held + size <= self.budget:
            self.memory[(batch, slot)] = values
            self.held += size
            self.peak_bytes = max(self.peak_bytes, self.held)
            return
        # cloned: safetensors refuses tensors that share memory (a value and a view of it may both be live)
        tensors = {k: v.detach().cpu().clone() for k, v in values.items() if isinstance(v, torch.Tensor)}
        others = {k: v for k, v in values.items() if not isinstance(v, torch.Tensor)}
        path = self.folder / f"{batch}-{slot}.safetensors"
        save_file(tensors, str(path))
        self.files[(batch, slot)] = (path, others)
        self.spilled_bytes += size

    def get(self, batch: int, slot: str) -> dict[str, Any]:
        """The values of ``(batch, slot)`` (a new dict; an empty one if nothing was put)."""
        if (batch, slot) in self.memory:
            return dict(self.memory[(batch, slot)])
        if (batch, slot) in self.files:
            path, others = self.files[(batch, slot)]
            return {**{k: v.to(self.device) for k, v in load_file(str(path)).items()}, **others}
        return {}

    def drop(self, batch: int, slot: str) -> None:
        if (batch, slot) in self.memory:
            self.held -= _nbytes(self.memory.pop((batch, slot)))
        if (batch, slot) in self.files:
            self.files.pop((batch, slot))[0].unlink(missing_ok=True)

    @property
    def folder(self) -> Path:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="chanprune-activations-"))
        return self._folder

    def close(self) -> None:
        """Forget everything and remove the spill folder."""
        self.memory.clear()
        self.files.clear()
        self.held = 0
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __enter__(self) -> "BatchStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
