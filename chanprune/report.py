"""What a pruning run did and measured, as plain data that round-trips to JSON."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class LayerReport:
    """One layer whose shape changed; errors are ||Y - Ŷ|| / ||Y|| of its reconstruction."""

    name: str
    kind: str
    in_channels_before: int
    in_channels_after: int
    out_channels_before: int
    out_channels_after: int
    kept_indices: list[int] | None
    rel_error: float | None = None
    rel_error_heldout: float | None = None
    rel_error_before: float | None = None  # kept channels, original weights (no reconstruction)


@dataclass
class PruneReport:
    """Whole-model figures of a pruning run; ``config`` holds every option used."""

    flops_before: int
    flops_after: int
    params_before: int
    params_after: int
    seconds: float
    config: dict[str, Any]
    layers: list[LayerReport] = field(default_factory=list)
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    logit_rel_error: float | None = None

    @property
    def speedup_achieved(self) -> float:
        return self.flops_before / self.flops_after

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["speedup_achieved"] = self.speedup_achieved
        return out

    def save_json(self, path: str | Path) -> None:
        """Write the report atomically (no partial file on failure)."""
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2))


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
