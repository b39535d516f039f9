"""Trained weights for a library or user architecture: a state dict in ``.safetensors`` or ``.pth``.

A ``.pth`` file is read with ``torch.load(weights_only=True)``, which unpickles tensors and plain
containers only, never code. What was loaded is recorded (path and SHA-256) in the model's
provenance, so that a pruned model can later be compared with, or distilled from, the exact
original it came from.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ChanpruneError

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")  # where training scripts nest the state dict
_LISTED = 8  # key names shown per kind of mismatch


@dataclass(frozen=True)
class WeightsRef:
    """A trained weights file: where it was and what it held (SHA-256 of its bytes)."""

    path: str
    sha256: str

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "sha256": self.sha256}

    @classmethod
    def from_json(cls, data: Any, where: str) -> "WeightsRef":
        if not (isinstance(data, dict) and set(data) == {"path", "sha256"}
                and all(isinstance(v, str) for v in data.values())):
            raise ChanpruneError(f"{where} records its original weights malformed ({data!r:.120}); "
                                 "re-create the file with `chanprune prune`")
        return cls(data["path"], data["sha256"])


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: its top level, or the state dict a training checkpoint nests
    under one of :data:`CHECKPOINT_KEYS`; a ``module.`` prefix (DistributedDataParallel) is removed."""
    path = Path(path)
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ChanpruneError(f"--weights {str(path)!r}: expected a state dict in a {' or '.join(WEIGHT_SUFFIXES)} "
                             "file (torch.save(model.state_dict(), path) or safetensors.torch.save_file)")
    if not path.is_file():
        raise ChanpruneError(f"weights file {str(path)!r} does not exist; check the path")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors and torch raise many types for bad files
        raise ChanpruneError(f"cannot read weights file {str(path)!r} ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}); save the model's state_dict "
                             "with torch.save or safetensors (a pickled whole module needs --trust-checkpoint "
                             "and --model FILE instead)") from err
    if isinstance(data, dict):
        nested = [k for k in CHECKPOINT_KEYS if isinstance(data.get(k), dict)]
        if nested and not any(isinstance(v, torch.Tensor) for v in data.values()):
            data = data[nested[0]]
    if not (isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values())):
        raise ChanpruneError(f"weights file {str(path)!r} holds no state dict (a mapping of parameter names to "
                             "tensors); save one with torch.save(model.state_dict(), path)")
    if all(k.startswith("module.") for k in data):
        data = {k.removeprefix("module."): v for k, v in data.items()}
    return data


def load_weights(model: nn.Module, path: str | Path) -> WeightsRef:
    """Load the state dict in ``path`` into ``model`` (strictly: every key, every shape), in place;
    a mismatch is refused with the keys that are missing, unexpected or of another shape."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{what} ({len(keys)}): {', '.join(keys[:_LISTED])}{', ...' if len(keys) > _LISTED else ''}"
                 for what, keys in (("missing", missing), ("unexpected", unexpected),
                                    ("different shape (file vs model)", shapes)) if keys]
        raise ChanpruneError(f"weights in {str(path)!r} do not match the model: {'; '.join(parts)}; pass the "
                             "architecture they were trained with (e.g. its num_classes in --arch-kwargs)")
    model.load_state_dict(state)
    return WeightsRef(str(Path(path).resolve()), file_sha256(Path(path)))
