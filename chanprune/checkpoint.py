"""Weights files: safetensors with a JSON header entry, read with clear errors for bad files."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from .errors import ChanpruneError

META_KEY = "chanprune"


def save_state_file(path: str | Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``state`` and ``meta`` atomically: a failed save never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={META_KEY: json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_state_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_state_file`; returns (state, meta)."""
    path = Path(path)
    if not path.is_file():
        raise ChanpruneError(f"checkpoint {str(path)!r} does not exist; check the path")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as err:
        raise ChanpruneError(f"checkpoint {str(path)!r} is corrupt or not a safetensors file ({err}); "
                             "re-create it with `chanprune prune` or `chanprune train`") from None
    return state, meta
