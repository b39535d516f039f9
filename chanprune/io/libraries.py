"""Importing the model libraries (torchvision, timm) that ``torchvision:NAME`` / ``timm:NAME`` build from.

The torchvision 0.28.0 wheel on PyPI is the CUDA build: its compiled operators (``torchvision/_C.so``)
link against CUDA libraries that a CPU torch does not ship, so they silently fail to load, and
``import torchvision`` then dies in ``torchvision/_meta_registrations.py``, which registers fake
kernels for ``torchvision::nms`` and ``torchvision::qnms`` without checking that the operators exist.
Before importing, :func:`define_missing_schemas` loads ``_C.so`` if it can and otherwise defines the
schemas of those two operators (schema only, no kernel), so the classification models import and
run; ``torchvision.ops.nms`` still fails, as it should without the compiled library. Details in
docs/generality.md.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

from ..errors import ChanpruneError

CONSTRUCTOR_SOURCES = {
    "torchvision": ("torchvision.models.list_models(module=torchvision.models)",
                    "pip install torchvision --no-deps (next to a CPU torch; the extra 'chanprune[vision]')"),
    "timm": ("timm.list_models()", "pip install timm huggingface_hub --no-deps (the extra 'chanprune[vision]')"),
}
# torchvision operators whose fake kernels are registered unconditionally at import (0.28.0).
MISSING_SCHEMAS = {
    "torchvision::nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "torchvision::qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_DEFINITIONS: list[torch.library.Library] = []  # keeps the schema definitions alive


def _operator_exists(qualname: str) -> bool:
    namespace, name = qualname.split("::")
    try:
        getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _load_compiled_operators() -> None:
    """Load ``torchvision/_C.so`` where it loads, so that real operators are never shadowed
    (importing ``torchvision.extension`` would run ``torchvision/__init__.py``, the failing import)."""
    spec = importlib.util.find_spec("torchvision")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for lib in Path(folder).glob("_C.*"):
            if lib.suffix in {".so", ".pyd", ".dylib"}:
                try:
                    torch.ops.load_library(str(lib))
                except (OSError, RuntimeError):
                    pass
                return


def define_missing_schemas() -> list[str]:
    """Define the schemas of the torchvision operators its compiled library did not provide;
    returns those defined (none where ``_C.so`` loaded, e.g. with a matching torchvision build)."""
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return []
    _load_compiled_operators()
    defined = []
    for qualname, schema in MISSING_SCHEMAS.items():
        if not _operator_exists(qualname):
            namespace, name = qualname.split("::")
            library = torch.library.Library(namespace, "FRAGMENT")
            library.define(name + schema)
            _DEFINITIONS.append(library)
            defined.append(qualname)
    return defined


def import_library(source: str) -> ModuleType:
    """``torchvision`` or ``timm`` (one of :data:`CONSTRUCTOR_SOURCES`), or a ChanpruneError saying what to install."""
    if source not in CONSTRUCTOR_SOURCES:
        raise ChanpruneError(f"{source!r} is not a model library chanprune builds from; use one of "
                             f"{', '.join(CONSTRUCTOR_SOURCES)}")
    try:
        define_missing_schemas()  # timm imports torchvision too
        return importlib.import_module(source)
    except ModuleNotFoundError as err:
        if err.name not in (None, source):  # the library is there but one of its own imports is not
            raise ChanpruneError(f"{source} is installed but cannot be imported: it needs {err.name!r} "
                                 f"(pip install {err.name})") from err
        raise ChanpruneError(f"{source}:NAME models need {source}, which is not installed; "
                             f"{CONSTRUCTOR_SOURCES[source][1]}") from err
    except Exception as err:  # e.g. a torchvision built for another torch version
        first = str(err).splitlines()[0] if str(err) else ""
        raise ChanpruneError(f"{source} is installed but cannot be imported ({type(err).__name__}: {first}); "
                             f"install the {source} build that matches torch {torch.__version__} (for a CPU torch, "
                             "the CPU wheels at https://download.pytorch.org/whl/cpu)") from err
