"""Tracing a model with torch.fx the way chanprune reads it: its own layers and norms as leaves,
and any submodule fx cannot trace kept whole."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any

from torch import fx, nn

from .errors import ChanpruneError, error_line
from .graph_ops import FOLLOWER_NORMS


class _Tracer(fx.Tracer):
    """torch.fx tracer that keeps chanprune's own layers as leaves, and subclasses of Conv2d,
    BatchNorm, GroupNorm and Linear from other libraries (timm's BatchNormAct2d and GroupNormAct:
    the norm then a channel-wise activation; its Conv2dSame, whose padding depends on the input's size, which fx cannot trace).

    A submodule whose forward fx cannot trace (data-dependent control flow) becomes a leaf too:
    what it recorded is taken back and it is called whole, so the rest of the model is still read
    (its channels in and out then stay unpruned). Only the model's own forward must trace."""

    def __init__(self) -> None:
        super().__init__()
        self.untraceable: dict[str, str] = {}  # qualified name -> why fx failed
        self.attr_proxies: dict[str, fx.Proxy] = {}  # fx's cache of parameter proxies (set on first use)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, (nn.Conv2d, nn.Linear, nn.GroupNorm, *FOLLOWER_NORMS)) or qualname in self.untraceable
                or super().is_leaf_module(m, qualname))

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, fx.Proxy]) -> Any:
        self.attr_proxies = parameter_proxy_cache
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        last = next(iter(reversed(self.graph.nodes)), None)  # the newest node before this call
        stack, calls = OrderedDict(self.module_stack), dict(self.num_calls)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as err:  # fx raises many types on dynamic control flow
            qualname = self.path_of_module(m)
            if not qualname or qualname in self.untraceable:
                raise
            erased = set()
            for node in reversed(list(self.graph.nodes)):  # what the failed forward recorded
                if node is last:
                    break
                self.graph.erase_node(node)
                erased.add(node)
            for attr in [a for a, proxy in self.attr_proxies.items() if proxy.node in erased]:
                del self.attr_proxies[attr]
            self.module_stack, self.num_calls = stack, calls
            for inner in [n for n in self.untraceable if n.startswith(f"{qualname}.")]:
                del self.untraceable[inner]  # inside a leaf now: not traced at all
            self.untraceable[qualname] = error_line(err)
            return super().call_module(m, forward, args, kwargs)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model``; a clear error if torch.fx cannot trace its own forward."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as err:  # fx raises many types on dynamic control flow
        raise ChanpruneError(
            f"cannot trace {type(model).__name__} with torch.fx ({error_line(err)}); "
            "remove data-dependent control flow from forward() or wrap it in a leaf module") from err
    for name, why in tracer.untraceable.items():
        warnings.warn(f"{name} ({type(model.get_submodule(name)).__name__}) cannot be traced with torch.fx "
                      f"({why}); it is kept whole", stacklevel=2)
    return fx.GraphModule(model, graph, type(model).__name__)
