"""Weights files: safetensors with a JSON header entry, read with clear errors for bad files."""

from __future__ import annotations

import importlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import ChanpruneError

META_KEY = "chanprune"
FORMAT = "chanprune-model/1"


def save_state_file(path: str | Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``state`` and ``meta`` atomically: a failed save never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={META_KEY: json.dumps(meta)})
        os.chmod(tmp, 0o644)
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


def build_architecture(arch: dict[str, Any]) -> nn.Module:
    """A fresh, unpruned model from an architecture reference (bundled name or importable class)."""
    if "bundled" in arch:
        from .models import create_model

        return create_model(arch["bundled"], pretrained=False)
    if "class" in arch:
        module_name, _, qualname = arch["class"].partition(":")
        try:
            target: Any = importlib.import_module(module_name)
            for part in qualname.split("."):
                target = getattr(target, part)
            return target(**arch.get("kwargs", {}))
        except Exception as err:
            raise ChanpruneError(f"cannot rebuild architecture {arch['class']} ({type(err).__name__}: {err}); "
                                 "make the class importable and pass its constructor arguments as arch kwargs") from None
    raise ChanpruneError(f"unknown architecture reference {arch!r}")


def save_model(model: nn.Module, path: str | Path, arch: dict[str, Any] | None = None) -> None:
    """Save a (pruned) model as architecture reference + pruning plan + safetensors weights."""
    info = getattr(model, "_chanprune", None) or {}
    arch = arch or info.get("arch")
    if arch is None:
        from .pruner import class_reference

        arch = class_reference(model)
    meta = {"format": FORMAT, "arch": arch, "plan": info.get("plan", []), "input_shape": info.get("input_shape")}
    save_state_file(path, model.state_dict(), meta)


def load_model(path: str | Path) -> nn.Module:
    """Rebuild a model saved by :func:`save_model`: fresh architecture, replayed plan, weights."""
    from .surgery import replay

    state, meta = load_state_file(path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ChanpruneError(f"{str(path)!r} is a weights file without a chanprune model header; "
                             "save models with chanprune.save_model or `chanprune prune --out`")
    if not isinstance(meta.get("arch"), dict) or not isinstance(meta.get("plan"), list):
        raise ChanpruneError(f"{str(path)!r} has a damaged chanprune header (no architecture or plan); "
                             "re-create it with `chanprune prune`")
    model = replay(build_architecture(meta["arch"]), meta["plan"])
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ChanpruneError(f"weights in {str(path)!r} do not match the rebuilt architecture "
                             f"({str(err).splitlines()[0]}); the checkpoint is corrupt or from another model") from None
    model._chanprune = {"arch": meta["arch"], "plan": meta["plan"], "input_shape": meta.get("input_shape")}
    return model.eval()


def load_pickled_module(path: str | Path) -> nn.Module:
    """A whole module saved with torch.save; unpickling runs code, so callers must opt in."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ChanpruneError(f"cannot load {str(path)!r} as a pickled module ({type(err).__name__}: {err})") from None
    if not isinstance(obj, nn.Module):
        raise ChanpruneError(f"{str(path)!r} holds a {type(obj).__name__}, not an nn.Module; "
                             "save the whole module with torch.save(model, path)")
    return obj.eval()
