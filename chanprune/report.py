"""What a pruning run did and measured, as plain data that round-trips to JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .files import write_text_atomic


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
    calibration_images: int | None = None
    peak_activation_bytes: int | None = None  # carried activations held in memory at once
    spilled_bytes: int | None = None  # carried activations written to temporary files
    resumed_units: int = 0  # units replayed from a checkpoint folder instead of solved again

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
