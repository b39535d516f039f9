"""Saving and loading whole models: architecture reference + surgery plan + safetensors weights."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ..errors import ChanpruneError
from ..surgery import replay
from .provenance import Provenance, attach, provenance_or_class
from .references import build_architecture
from .state_file import load_state_file, save_state_file
from .weights import file_sha256, load_weights

FORMAT = "chanprune-model/1"


def save_model(model: nn.Module, path: str | Path) -> None:
    """Save a (pruned) model as architecture reference + pruning plan + safetensors weights."""
    record = provenance_or_class(model)
    save_state_file(path, model.state_dict(), {"format": FORMAT, **record.to_json()})


def load_model(path: str | Path, model: nn.Module | None = None, trust: bool = False) -> nn.Module:
    """Rebuild a model saved by :func:`save_model`: fresh architecture, replayed plan, weights.

    The architecture comes from ``model`` when given (an unpruned instance of the saved class),
    else from the file's reference: a bundled name or a torchvision/timm constructor. A reference
    to any other class is imported only with ``trust=True``; loading never runs code a file names.
    """
    where = repr(str(path))
    state, meta = load_state_file(path)
    if meta.get("format") != FORMAT:
        raise ChanpruneError(f"{where} is a weights file without a chanprune model header; "
                             "save models with chanprune.save_model or `chanprune prune --out`")
    record = Provenance.from_json(meta, where)
    if model is not None and not isinstance(model, nn.Module):
        raise ChanpruneError(f"model= must be an nn.Module (an unpruned instance of the saved class), "
                             f"got {type(model).__name__}")
    base = copy.deepcopy(model) if model is not None else build_architecture(record.arch, trust=trust, where=where)
    rebuilt = replay(base, record.plan)
    try:
        rebuilt.load_state_dict(state)
    except RuntimeError as err:
        raise ChanpruneError(f"weights in {where} do not match the rebuilt architecture "
                             f"({str(err).splitlines()[0]}); the checkpoint is corrupt or from another model") from err
    return attach(rebuilt, record).eval()


def has_trained_original(record: Provenance) -> bool:
    """Whether :func:`load_original` can rebuild the model ``record`` came from: it was loaded with
    trained weights, or it is a bundled model with its shipped checkpoint (not random weights)."""
    return record.weights is not None or record.arch.kind == "bundled"


def load_original(record: Provenance, trust: bool = False) -> nn.Module:
    """The unpruned model a pruned one came from: its architecture with the trained weights file it
    was loaded from (checked to be the same bytes), or a bundled model's shipped checkpoint."""
    if not has_trained_original(record):
        raise ChanpruneError(f"the model was pruned from {record.arch.name} with random weights (no --weights), so "
                             "there is no trained original to compare with or distill from; pass --original "
                             "with the unpruned model, prune a model loaded with --weights, or fine-tune on labels "
                             "only (--distill 0)")
    if record.weights is None:
        from ..models import create_model

        return create_model(record.arch.name)
    path = Path(record.weights.path)
    if not path.is_file() or file_sha256(path) != record.weights.sha256:
        state = "no longer exists" if not path.is_file() else "has changed since"
        raise ChanpruneError(f"the original weights {str(path)!r} the model was pruned from {state}; restore "
                             "the file, or pass --original with the unpruned model")
    model = build_architecture(record.arch, trust=trust, where="the pruned model").eval()
    load_weights(model, path)
    return attach(model, Provenance(record.arch, (), record.input_shape, record.weights))


def load_pickled_module(path: str | Path) -> nn.Module:
    """A whole module saved with torch.save; unpickling runs code, so callers must opt in."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ChanpruneError(f"cannot load {str(path)!r} as a pickled module ({type(err).__name__}: {err})") from err
    if not isinstance(obj, nn.Module):
        raise ChanpruneError(f"{str(path)!r} holds a {type(obj).__name__}, not an nn.Module; "
                             "save the whole module with torch.save(model, path)")
    return obj.eval()
