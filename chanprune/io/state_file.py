"""Weights files: safetensors with one JSON header entry, read with clear errors for bad files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..errors import ChanpruneError
from ..files import write_atomically

META_KEY = "chanprune"


def save_state_file(path: str | Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``state`` and ``meta`` atomically: a failed save never leaves a half-written file."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    header = json.dumps(meta)
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata={META_KEY: header}))


def load_state_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_state_file`; returns (state, meta). Reading a safetensors
    file runs no code, and the header is plain JSON."""
    path = Path(path)
    if not path.is_file():
        raise ChanpruneError(f"checkpoint {str(path)!r} does not exist; check the path")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError, RecursionError) as err:
        raise ChanpruneError(f"checkpoint {str(path)!r} is corrupt or not a safetensors file ({err}); "
                             "re-create it with `chanprune prune` or `chanprune train`") from err
    if not isinstance(meta, dict):
        raise ChanpruneError(f"checkpoint {str(path)!r} has a header that is not a JSON object; "
                             "re-create it with `chanprune prune` or `chanprune train`")
    return state, meta
