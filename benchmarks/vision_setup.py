"""Import torchvision and timm next to the CPU-only torch of this project (tests and benchmarks only).

The torchvision 0.28.0 wheel on PyPI is the CUDA build: its compiled operators (``torchvision/_C.so``)
link against ``libc10_cuda.so`` and ``libtorch_cuda.so``, which the CPU torch does not ship, so the
library silently fails to load. ``import torchvision`` then dies in ``torchvision/_meta_registrations.py``,
which registers fake (meta) kernels for ``torchvision::nms`` and ``torchvision::qnms`` without checking
that the operators exist (``RuntimeError: operator torchvision::nms does not exist``). Every other
registration there is guarded by ``torchvision.extension._has_ops()``.

:func:`import_vision` defines the schemas of those two operators (schema only, no kernel) before the
import. The classification models never call them; calling ``torchvision.ops.nms`` still fails
(no kernel), which is what should happen without the compiled library. ``chanprune`` itself never
does this: it only tries ``import torchvision`` and reports what to install when that fails.

It also sets ``HF_HUB_OFFLINE=1`` so that timm never reaches for the network (models are built
with random weights).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import torch

# torchvision operators whose fake kernels are registered unconditionally at import (0.28.0).
MISSING_SCHEMAS = {
    "torchvision::nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "torchvision::qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

_LIBRARIES: list[torch.library.Library] = []  # keep the definitions alive


def _operator_exists(qualname: str) -> bool:
    namespace, name = qualname.split("::")
    try:
        getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _try_load_compiled_library() -> bool:
    """Load ``torchvision/_C.so`` if it can be loaded, so that real operators are never shadowed.

    (Importing ``torchvision.extension`` would run ``torchvision/__init__.py``, the failing import.)
    """
    import importlib.util

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    for folder in spec.submodule_search_locations:
        for lib in Path(folder).glob("_C.*"):
            if lib.suffix in {".so", ".pyd", ".dylib"}:
                try:
                    torch.ops.load_library(str(lib))
                    return True
                except (OSError, RuntimeError):
                    return False
    return False


def define_missing_schemas() -> list[str]:
    """Define the schemas of torchvision operators that its compiled library did not provide.

    Returns the operators it defined (empty when torchvision's ``_C.so`` loaded, e.g. with a
    CUDA torch or a matching CPU torchvision build).
    """
    _try_load_compiled_library()
    defined = []
    for qualname, schema in MISSING_SCHEMAS.items():
        if _operator_exists(qualname):
            continue
        namespace, name = qualname.split("::")
        lib = torch.library.Library(namespace, "FRAGMENT")
        lib.define(name + schema)
        _LIBRARIES.append(lib)
        defined.append(qualname)
    return defined


def import_vision(need_timm: bool = True) -> tuple[ModuleType, ModuleType | None]:
    """(torchvision, timm) ready to build models offline; timm is None when not installed/needed.

    Raises ImportError when torchvision itself is not installed (pytest.importorskip-friendly).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        raise ImportError("torchvision is not installed (pip install torchvision==0.28.0 --no-deps)")
    define_missing_schemas()
    import torchvision

    timm = None
    if need_timm and importlib.util.find_spec("timm") is not None:
        import timm
    return torchvision, timm
