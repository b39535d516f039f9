"""A traced model run node by node over every calibration batch, stopped at a chosen node.

Only values that nodes at or after the frontier still read are kept (per batch, in a
:class:`~chanprune.engine.store.BatchStore`), so moving the frontier through the whole network
costs one forward pass in total, however many pruning units stop along the way.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import fx

from .store import BatchStore

# In-place operations and their out-of-place twins: a look-ahead must never write into the
# values the frontier keeps.
_FUNCTIONS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
              operator.itruediv: operator.truediv, torch.relu_: torch.relu}
_METHODS = {"add_": "add", "sub_": "sub", "mul_": "mul", "div_": "div", "relu_": "relu", "clamp_": "clamp",
            "sigmoid_": "sigmoid", "hardtanh_": "hardtanh"}


def without_inplace(gm: fx.GraphModule) -> fx.GraphModule:
    """Make every in-place op of ``gm`` (modules with ``inplace``, ``+=``, ``x.add_()``, ``relu(inplace=True)``)
    out of place; the function computed is the same. Modifies and returns ``gm``."""
    for module in gm.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _FUNCTIONS:
            node.target = _FUNCTIONS[node.target]
        elif node.op == "call_method" and node.target in _METHODS:
            node.target = _METHODS[node.target]
        if node.op in ("call_function", "call_method") and node.kwargs.get("inplace") is True:
            node.kwargs = {**node.kwargs, "inplace": False}
    gm.recompile()
    return gm


class Frontier:
    """A traced module whose nodes before ``position`` have run on every batch of ``store``.

    Values live at the frontier are kept in the store under ``slot``. :meth:`look_ahead` runs
    further without moving the frontier; :meth:`advance` moves it.
    """

    def __init__(self, gm: fx.GraphModule, store: BatchStore, slot: str, batches: int):
        self.gm, self.store, self.slot, self.batches = gm, store, slot, batches
        self.nodes = [n for n in gm.graph.nodes if n.op != "output"]
        self.index = {n.name: i for i, n in enumerate(self.nodes)}
        self.last_use = {n.name: max((self.index.get(u.name, len(self.nodes)) for u in n.users), default=-1)
                         for n in self.nodes}
        self.shapes = _shape_nodes(self.nodes)
        for node in reversed(self.nodes):  # a kept shape keeps what it is computed from, to recompute it
            if node.name in self.shapes:
                for source in node.all_input_nodes:
                    self.last_use[source.name] = max(self.last_use[source.name], self.last_use[node.name])
        self.dying: dict[int, list[fx.Node]] = {}  # the nodes whose last use is node i
        for node in self.nodes:
            self.dying.setdefault(self.last_use[node.name], []).append(node)
        self.start_position = self.position = sum(1 for n in self.nodes if n.op == "placeholder")

    def start(self, batch: int, inputs: torch.Tensor) -> None:
        """Hand the frontier the input of ``batch`` (before anything has run)."""
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.store.put(batch, self.slot, {placeholders[0].name: inputs})

    def _run(self, env: dict[str, Any], start: int, stop: int,
             on_value: Callable[[str, Any], None] | None = None,
             change: dict[str, Callable[[Any], Any]] | None = None,
             keep: frozenset[str] = frozenset()) -> dict[str, Any]:
        """Run nodes ``start`` to ``stop`` on ``env``; returns the values still needed after
        ``stop`` and those named in ``keep``. A value is let go after its last use, so running far
        ahead holds what a forward pass holds, not every activation on the way."""
        interpreter = fx.Interpreter(self.gm)
        nodes_env = {n: env[n.name] for n in self.nodes[:start] if n.name in env}
        interpreter.env = nodes_env
        for i, node in enumerate(self.nodes[start:stop], start):
            value = interpreter.run_node(node)
            if change and node.name in change:
                value = change[node.name](value)
            nodes_env[node] = value
            if on_value is not None:
                on_value(node.name, value)
            for dead in self.dying.get(i, []) + ([node] if self.last_use[node.name] < i else []):
                if dead.name not in keep:
                    nodes_env.pop(dead, None)
        return {n.name: v for n, v in nodes_env.items()}

    @torch.no_grad()
    def output(self, batch: int, change: dict[str, Callable[[Any], Any]] | None = None) -> Any:
        """The model's output for ``batch``, run on from the frontier without moving it; the value
        of each node named in ``change`` is replaced by ``change[node](value)`` on the way."""
        env = self._run(self.store.get(batch, self.slot), self.position, len(self.nodes), change=change)
        interpreter = fx.Interpreter(self.gm)
        interpreter.env = {n: env[n.name] for n in self.nodes if n.name in env}
        return interpreter.run_node(next(n for n in self.gm.graph.nodes if n.op == "output"))

    def _live(self, env: dict[str, Any], position: int) -> dict[str, Any]:
        return {k: v for k, v in env.items() if self.index[k] < position <= self.last_use[k]}

    @torch.no_grad()
    def look_ahead(self, want: set[str]) -> Iterator[tuple[int, dict[str, Any]]]:
        """For each batch, the values of the nodes ``want`` in the current model, running past the
        frontier as far as needed without moving it."""
        stop = max((self.index[w] + 1 for w in want), default=self.position)
        for batch in range(self.batches):
            stored = self.store.get(batch, self.slot)
            versions = {k: v._version for k, v in stored.items() if isinstance(v, torch.Tensor)}
            env = self._run(stored, self.position, stop, keep=frozenset(want)) if stop > self.position else stored
            if any(stored[k]._version != v for k, v in versions.items()):
                raise RuntimeError("an in-place operation changed a value the frontier keeps; "
                                   "without_inplace() does not know it yet")
            yield batch, {w: env[w] for w in want}

    @torch.no_grad()
    def advance(self, position: int, on_value: Callable[[int, str, Any], None] | None = None) -> None:
        """Run every batch up to (not including) node ``position`` and keep only what is live there.
        ``on_value(batch, node, value)`` sees every value computed on the way."""
        if position <= self.position:
            return
        for batch in range(self.batches):
            env = self.store.get(batch, self.slot)
            callback = None if on_value is None else (lambda name, value, b=batch: on_value(b, name, value))
            env = self._run(env, self.position, position, callback)
            self.store.put(batch, self.slot, self._live(env, position))
        self.position = position

    def update(self, change: Callable[[str, Any], Any], names: set[str]) -> None:
        """Replace each kept value of a node in ``names`` by ``change(node, value)`` (e.g. drop pruned
        channels); kept shapes (``B, C, H, W = x.shape`` read before the frontier) are computed again
        from the changed values, so a later ``view(B, C, ...)`` sees the new width."""
        for batch in range(self.batches):
            env = self.store.get(batch, self.slot)
            hit = names & env.keys()
            if hit:
                env = {k: change(k, v) if k in hit else v for k, v in env.items()}
                interpreter = fx.Interpreter(self.gm)
                interpreter.env = {n: env[n.name] for n in self.nodes if n.name in env}
                for node in self.nodes[:self.position]:
                    if node.name in self.shapes and node.name in env:
                        env[node.name] = interpreter.env[node] = interpreter.run_node(node)
                self.store.put(batch, self.slot, env)


_SHAPE_QUERIES = {"size", "dim"}
_SHAPE_ARITHMETIC = {operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
                     operator.truediv, operator.mod}


def _shape_nodes(nodes: list[fx.Node]) -> set[str]:
    """Nodes that compute sizes from tensor shapes (``x.shape``, ``x.size(1)``, ``x.dim()``) and
    arithmetic on those alone: values that change when a tensor they read loses channels."""
    shapes: set[str] = set()
    for node in nodes:
        query = (node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",)) or \
            (node.op == "call_method" and node.target in _SHAPE_QUERIES)
        arithmetic = node.op == "call_function" and node.target in _SHAPE_ARITHMETIC and \
            node.all_input_nodes and all(a.name in shapes for a in node.all_input_nodes)
        if query or arithmetic:
            shapes.add(node.name)
    return shapes
