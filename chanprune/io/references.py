"""Architecture references: what a saved model says it was built from, resolved through an allow-list.

A reference is data from a file, so it may only resolve to (1) a bundled model name, (2) a
``torchvision:NAME`` / ``timm:NAME`` constructor called with JSON arguments that its signature
accepts (never the ones that load weights from a path or the network), or (3) a class the caller
vouches for: the caller passes the model itself, or opts in with ``trust=True``. Nothing else is
imported or called.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import ChanpruneError
from .libraries import CONSTRUCTOR_SOURCES, import_library

KINDS = ("bundled", "constructor", "class")
# Constructor arguments that read weights from a path or the network: never taken from a file.
LOADING_ARGUMENTS = frozenset({"weights", "weights_backbone", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
                               "checkpoint_path", "cache_dir", "progress"})
_MAX_DEPTH = 16
SAFE_WAYS = ("pass the model yourself, load_model(path, model=MyNet(...)); or, if you trust the file's source, "
             "load_model(path, trust=True) / --trust-checkpoint, which imports the class it names")


def check_json_value(value: Any, where: str, depth: int = 0) -> None:
    """Raise unless ``value`` is a JSON scalar, or a list / string-keyed dict of them."""
    if depth > _MAX_DEPTH:
        raise ChanpruneError(f"{where} is nested more than {_MAX_DEPTH} levels deep")
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, list):
        for item in value:
            check_json_value(item, where, depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ChanpruneError(f"{where} has a non-string key {key!r}")
            check_json_value(item, where, depth + 1)
        return
    raise ChanpruneError(f"{where} holds a {type(value).__name__}; only JSON numbers, strings, booleans, "
                         "null, lists and objects are allowed")


@dataclass(frozen=True)
class ArchRef:
    """Where a model's architecture comes from: ``kind`` is one of :data:`KINDS`; ``name`` is a
    bundled name, ``torchvision:NAME`` / ``timm:NAME``, or ``module:QualName``."""

    kind: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        if self.kind == "bundled":
            return {"bundled": self.name}
        return {self.kind: self.name, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_json(cls, data: Any, where: str = "the header") -> "ArchRef":
        """Parse and check the structure of a reference read from a file (nothing is imported)."""
        kinds = [k for k in KINDS if isinstance(data, dict) and k in data]
        if len(kinds) != 1 or not isinstance(data[kinds[0]], str):
            raise ChanpruneError(f"{where} has no valid architecture reference ({data!r:.200}); expected one of "
                                 '{"bundled": NAME}, {"constructor": "torchvision:NAME", "kwargs": {...}} or '
                                 '{"class": "module:Class", "kwargs": {...}}')
        unknown = set(data) - {kinds[0], "kwargs"}
        kwargs = data.get("kwargs", {})
        if unknown or not isinstance(kwargs, dict):
            raise ChanpruneError(f"{where} has a malformed architecture reference ({data!r:.200}); "
                                 "re-create the file with chanprune.save_model")
        check_json_value(kwargs, f"the constructor arguments in {where}")
        return cls(kinds[0], data[kinds[0]], kwargs)

    @classmethod
    def of_class(cls, model: nn.Module) -> "ArchRef":
        """A reference to the class of a user's model, rebuilt without arguments when trusted."""
        return cls("class", f"{type(model).__module__}:{type(model).__qualname__}")


def parse_constructor(spec: str) -> tuple[str, str] | None:
    """``("torchvision", "resnet50")`` for ``"torchvision:resnet50"``; None if ``spec`` names no library."""
    source, sep, name = spec.partition(":")
    if not sep or source not in CONSTRUCTOR_SOURCES:
        return None
    if not name.strip():
        raise ChanpruneError(f"{spec!r}: expected {source}:NAME with a model name such as {source}:resnet50; "
                             f"list the names with {CONSTRUCTOR_SOURCES[source][0]}")
    return source, name


def constructor_names(source: str) -> list[str]:
    """Every classification model name ``source`` can build."""
    library = import_library(source)
    if source == "torchvision":
        return list(library.models.list_models(module=library.models))
    return list(library.list_models())


def _builder(source: str, library: Any, name: str) -> Any:
    if source == "torchvision":
        return library.models.get_model_builder(name)
    return library.models.model_entrypoint(name)


def _accepted_arguments(source: str, library: Any, builder: Any) -> set[str] | None:
    """Keyword names the constructor takes (its own, and its model class's when it forwards
    ``**kwargs``); None when the class itself takes any keyword."""
    names: set[str] = set()
    functions = [builder] + ([library.create_model] if source == "timm" else [])
    forwards = False
    for fn in functions:
        for p in inspect.signature(fn).parameters.values():
            if p.kind == p.VAR_KEYWORD:
                forwards = True
            elif p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
                names.add(p.name)
    if forwards:
        cls = getattr(builder, "__annotations__", {}).get("return")
        if not isinstance(cls, type):
            return None
        for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
            if p.kind == p.VAR_KEYWORD:
                return None
            names.add(p.name)
    return names - {"model_name"}


def check_constructor_arguments(spec: str, kwargs: dict[str, Any]) -> None:
    """Raise unless ``kwargs`` are JSON values that ``spec``'s constructor accepts and none of them
    loads weights from a path or the network."""
    check_json_value(kwargs, f"the arguments of {spec}")
    loading = sorted(set(kwargs) & LOADING_ARGUMENTS)
    if loading:
        raise ChanpruneError(f"{spec} may not be given {', '.join(loading)}: chanprune builds library models with "
                             "random weights and loads weights itself; pass trained weights as a state dict instead")
    source, name = parse_constructor(spec) or ("", "")
    library = import_library(source)
    accepted = _accepted_arguments(source, library, _builder(source, library, name))
    unknown = sorted(set(kwargs) - accepted) if accepted is not None else []
    if unknown:
        raise ChanpruneError(f"{spec} takes no argument {', '.join(map(repr, unknown))}; it accepts "
                             f"{', '.join(sorted(accepted - LOADING_ARGUMENTS))}")


def build_constructor(spec: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A torchvision or timm classification model with random weights (nothing is downloaded)."""
    parsed = parse_constructor(spec)
    if parsed is None:
        raise ChanpruneError(f"{spec!r} is not a constructor reference; use torchvision:NAME or timm:NAME")
    source, name = parsed
    library = import_library(source)
    known = library.is_model(name) if source == "timm" else name in constructor_names(source)
    if not known:
        close = difflib.get_close_matches(name, constructor_names(source), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ChanpruneError(f"unknown {source} classification model {name!r}{hint}; list the valid names "
                             f"with {CONSTRUCTOR_SOURCES[source][0]}")
    kwargs = dict(kwargs or {})
    check_constructor_arguments(spec, kwargs)
    try:
        if source == "torchvision":
            return library.models.get_model(name, weights=None, **kwargs)
        return library.create_model(name, pretrained=False, **kwargs)
    except Exception as err:
        raise ChanpruneError(f"cannot build {spec} with arguments {kwargs} "
                             f"({type(err).__name__}: {err})") from err


def import_class(reference: str) -> type:
    """The class ``module:QualName`` names; only called for references the caller trusts."""
    module_name, _, qualname = reference.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            target = getattr(target, part)
    except Exception as err:
        raise ChanpruneError(f"cannot import {reference!r} ({type(err).__name__}: {err}); make the class "
                             "importable, or pass the model yourself: load_model(path, model=MyNet(...))") from err
    if not (isinstance(target, type) and issubclass(target, nn.Module)):
        raise ChanpruneError(f"{reference!r} is not an nn.Module class; a trusted reference must name one")
    return target


def build_architecture(ref: ArchRef, *, trust: bool = False, where: str = "the checkpoint") -> nn.Module:
    """A fresh, unpruned model for ``ref``; a class reference is only imported when ``trust``."""
    if ref.kind == "bundled":
        from ..models import create_model

        return create_model(ref.name, pretrained=False)
    if ref.kind == "constructor":
        return build_constructor(ref.name, ref.kwargs).eval()
    if not trust:
        raise ChanpruneError(f"{where} names the Python class {ref.name!r}; chanprune never imports code a file "
                             f"names. To load it, {SAFE_WAYS}")
    cls = import_class(ref.name)
    try:
        return cls(**ref.kwargs)
    except Exception as err:
        raise ChanpruneError(f"cannot build {ref.name} with arguments {ref.kwargs} "
                             f"({type(err).__name__}: {err})") from err
