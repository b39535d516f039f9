"""chanprune: channel pruning by LASSO selection and least-squares reconstruction (He et al. 2017)."""

from .io.checkpoint import load_model, save_model
from .errors import ChanpruneError
from .models import create_model
from ._version import __version__
from .config import PruneConfig
from .pruner import prune
from .report import LayerReport, PruneReport

__all__ = ["__version__", "ChanpruneError", "LayerReport", "PruneConfig", "PruneReport", "create_model", "load_model", "prune",
           "save_model"]
