"""Tracing a model with torch.fx the way chanprune reads it: its own layers and norms as leaves."""

from __future__ import annotations

from torch import fx, nn

from .errors import ChanpruneError, error_line
from .graph_ops import FOLLOWER_NORMS


class _Tracer(fx.Tracer):
    """torch.fx tracer that keeps chanprune's own layers as leaves, and subclasses of Conv2d,
    BatchNorm and Linear from other libraries (timm's BatchNormAct2d: BN then a channel-wise
    activation; its Conv2dSame, whose padding depends on the input's size, which fx cannot trace)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.Linear, *FOLLOWER_NORMS)) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model``; a clear error if torch.fx cannot."""
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # fx raises many types on dynamic control flow
        raise ChanpruneError(
            f"cannot trace {type(model).__name__} with torch.fx ({error_line(err)}); "
            "remove data-dependent control flow from forward() or wrap it in a leaf module") from err
    return fx.GraphModule(model, graph, type(model).__name__)
