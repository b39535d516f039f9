"""The typed record of where a model came from: its architecture, the surgery that thinned it and
the input shape it was pruned at. One attribute on the module, one way in and one way out."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from ..errors import ChanpruneError
from ..surgery import OPS, PlanOp
from .references import ArchRef
from .weights import WeightsRef

_ATTRIBUTE = "_chanprune_provenance"


@dataclass(frozen=True)
class Provenance:
    """Architecture reference, surgery plan (in order), input shape (C, H, W) of a model, and the
    trained weights file the unpruned model was loaded from (None: bundled or random weights)."""

    arch: ArchRef
    plan: tuple[PlanOp, ...] = ()
    input_shape: tuple[int, ...] | None = None
    weights: WeightsRef | None = None

    def with_plan(self, plan: tuple[PlanOp, ...] | list[PlanOp], input_shape: tuple[int, ...] | None = None
                  ) -> "Provenance":
        return replace(self, plan=tuple(plan), input_shape=tuple(input_shape) if input_shape else self.input_shape)

    def to_json(self) -> dict[str, Any]:
        return {"arch": self.arch.to_json(), "plan": [op.to_json() for op in self.plan],
                "input_shape": list(self.input_shape) if self.input_shape else None,
                **({"weights": self.weights.to_json()} if self.weights else {})}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> "Provenance":
        """Parse and check a header read from a file; nothing named in it is imported or called."""
        plan = data.get("plan")
        if not isinstance(plan, list):
            raise ChanpruneError(f"{where} has a damaged chanprune header (no pruning plan); "
                                 "re-create it with `chanprune prune`")
        weights = data.get("weights")
        return cls(ArchRef.from_json(data.get("arch"), where), tuple(parse_op(op, where) for op in plan),
                   parse_input_shape(data.get("input_shape"), where),
                   WeightsRef.from_json(weights, where) if weights is not None else None)


def parse_op(data: Any, where: str) -> PlanOp:
    """One surgery operation from a header, checked field by field."""
    if not isinstance(data, dict) or data.get("op") not in OPS:
        name = data.get("op") if isinstance(data, dict) else data
        raise ChanpruneError(f"{where} has a pruning operation {name!r:.80} that is not one of chanprune's "
                             f"({', '.join(OPS)}); the file is damaged or from a newer chanprune")
    layer, keep, size = data.get("layer"), data.get("keep", []), data.get("channel_size", 1)
    ok = (isinstance(layer, str) and isinstance(keep, list) and set(data) <= {"op", "layer", "keep", "channel_size"}
          and all(type(i) is int and i >= 0 for i in keep) and type(size) is int and size >= 1)
    if not ok:
        raise ChanpruneError(f"{where} has a malformed {data['op']} operation ({data!r:.120}); "
                             "re-create the file with `chanprune prune`")
    return PlanOp(data["op"], layer, tuple(keep), size)


def parse_input_shape(data: Any, where: str) -> tuple[int, ...] | None:
    if data is None:
        return None
    if not (isinstance(data, list) and len(data) == 3 and all(type(d) is int and d > 0 for d in data)):
        raise ChanpruneError(f"{where} records an input shape {data!r:.80} that is not [C, H, W]")
    return tuple(data)


def provenance(model: nn.Module) -> Provenance | None:
    """What chanprune knows about where ``model`` came from (None for a model it never saw)."""
    return getattr(model, _ATTRIBUTE, None)


def attach(model: nn.Module, record: Provenance) -> nn.Module:
    """Record where ``model`` came from (returns ``model``)."""
    object.__setattr__(model, _ATTRIBUTE, record)
    return model


def provenance_or_class(model: nn.Module) -> Provenance:
    """The recorded provenance, or a reference to the model's own class with an empty plan."""
    return provenance(model) or Provenance(ArchRef.of_class(model))


def input_shape(model: nn.Module) -> tuple[int, ...] | None:
    """The (C, H, W) input a model was built or pruned for, if chanprune recorded it."""
    record = provenance(model)
    return record.input_shape if record else None


__all__ = ["Provenance", "attach", "input_shape", "parse_op", "provenance", "provenance_or_class"]
