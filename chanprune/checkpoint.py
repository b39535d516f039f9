"""Weights files: safetensors with a JSON header entry, read with clear errors for bad files."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import ChanpruneError
from .files import write_atomically

META_KEY = "chanprune"
FORMAT = "chanprune-model/1"


def save_state_file(path: str | Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``state`` and ``meta`` atomically: a failed save never leaves a half-written file."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata={META_KEY: json.dumps(meta)}))


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


CONSTRUCTOR_SOURCES = {
    "torchvision": ("torchvision.models.list_models(module=torchvision.models)",
                    "pip install torchvision --no-deps (next to a CPU torch; the extra 'chanprune[vision]')"),
    "timm": ("timm.list_models()", "pip install timm huggingface_hub --no-deps (the extra 'chanprune[vision]')"),
}


def parse_constructor(spec: str) -> tuple[str, str] | None:
    """``("torchvision", "resnet50")`` for ``"torchvision:resnet50"``; None if ``spec`` names no library."""
    source, sep, name = spec.partition(":")
    if not sep or source not in CONSTRUCTOR_SOURCES:
        return None
    if not name.strip():
        raise ChanpruneError(f"{spec!r}: expected {source}:NAME with a model name such as {source}:resnet50; "
                             f"list the names with {CONSTRUCTOR_SOURCES[source][0]}")
    return source, name


def import_library(source: str) -> Any:
    """``torchvision`` or ``timm``, or a ChanpruneError saying what to install."""
    try:
        return importlib.import_module(source)
    except ModuleNotFoundError as err:
        if err.name not in (None, source):  # the library is there but one of its own imports is not
            raise ChanpruneError(f"{source} is installed but cannot be imported: it needs {err.name!r} "
                                 f"(pip install {err.name})") from None
        raise ChanpruneError(f"{source}:NAME models need {source}, which is not installed; "
                             f"{CONSTRUCTOR_SOURCES[source][1]}") from None
    except Exception as err:  # e.g. torchvision's compiled operators not loading next to this torch
        first = str(err).splitlines()[0] if str(err) else ""
        fix = f"reinstall {source} for torch {torch.__version__}"
        if "torchvision" in first:  # timm imports torchvision too
            fix = (f"install the torchvision build that matches torch {torch.__version__}: a CUDA torchvision "
                   "wheel next to a CPU torch fails like this, use the CPU wheel from "
                   "https://download.pytorch.org/whl/cpu, or define the missing operator schemas before the "
                   "import as benchmarks/vision_setup.py does (docs/generality.md)")
        raise ChanpruneError(f"{source} is installed but cannot be imported ({type(err).__name__}: {first}); "
                             f"{fix}") from None


def constructor_names(source: str) -> list[str]:
    """Every classification model name ``source`` can build."""
    library = import_library(source)
    if source == "torchvision":
        return list(library.models.list_models(module=library.models))
    return list(library.list_models())


def build_constructor(constructor: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A torchvision or timm classification model with random weights (nothing is downloaded)."""
    import difflib

    parsed = parse_constructor(constructor)
    if parsed is None:
        raise ChanpruneError(f"{constructor!r} is not a constructor reference; use torchvision:NAME or timm:NAME")
    source, name = parsed
    library = import_library(source)
    known = library.is_model(name) if source == "timm" else name in constructor_names(source)
    if not known:
        names = constructor_names(source)
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ChanpruneError(f"unknown {source} classification model {name!r}{hint}; list the valid names "
                             f"with {CONSTRUCTOR_SOURCES[source][0]}")
    kwargs = dict(kwargs or {})
    try:
        if source == "torchvision":
            return library.models.get_model(name, weights=None, **kwargs)
        return library.create_model(name, pretrained=False, **kwargs)
    except Exception as err:
        raise ChanpruneError(f"cannot build {constructor} with arguments {kwargs} "
                             f"({type(err).__name__}: {err})") from None


def build_architecture(arch: dict[str, Any]) -> nn.Module:
    """A fresh, unpruned model from an architecture reference (bundled name, library constructor
    such as ``torchvision:resnet50`` / ``timm:resnet50``, or importable class)."""
    if "bundled" in arch:
        from .models import create_model

        return create_model(arch["bundled"], pretrained=False)
    if "constructor" in arch:
        return build_constructor(arch["constructor"], arch.get("kwargs", {})).eval()
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
