"""PruneConfig: every option of a pruning run, validated early, stored in the report."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .allocation import PRESETS
from .errors import ChanpruneError
from .selection import STRATEGIES

TRUNK_MODES = ("keep", "joint")
AUTO_RIDGES = (1e-6, 1e-4, 1e-2, 1e-1, 1.0)  # relative to trace(G)/dim


@dataclass
class PruneConfig:
    """Every option of a pruning run; stored in the report so the run can be repeated.

    ``trunk`` says what happens to channels tied by residual adds: "keep" leaves them whole (the
    paper), "joint" prunes them with one selection over all their readers. With
    ``feature_map_sampling`` a conv reading channels that stay whole reads a chosen subset of
    them through a channel select. ``residual_correction`` makes the last layer of a residual
    branch also make up for the error on its shortcut.
    """

    speedup: float | None = 4.0
    method: str = "lasso"
    allocation: str = "uniform"
    widths: dict[str, int] | None = None
    exclude: tuple[str, ...] = ()
    samples_per_image: int = 10
    seed: int = 0
    reconstruct: bool = True
    ridge: float | str = 1e-6  # or "auto": chosen per layer on the held-out samples
    lasso_rounds: int = 1
    heldout_every: int = 10
    batch_size: int = 64
    trunk: str = "keep"
    residual_correction: bool = True
    feature_map_sampling: bool = True
    round_to: int = 1  # kept widths are multiples of this (8 or 16 suit vectorised CPU kernels)

    def validate(self) -> None:
        if self.method not in STRATEGIES:
            raise ChanpruneError(f"unknown method {self.method!r}; use one of {', '.join(STRATEGIES)}")
        if self.allocation not in PRESETS:
            raise ChanpruneError(f"unknown allocation {self.allocation!r}; use one of {', '.join(PRESETS)}")
        if self.trunk not in TRUNK_MODES:
            raise ChanpruneError(f"unknown trunk mode {self.trunk!r}; use one of {', '.join(TRUNK_MODES)}")
        if self.speedup is None and self.widths is None:
            raise ChanpruneError("give a speed-up target or explicit widths")
        if self.speedup is not None and not (isinstance(self.speedup, (int, float)) and self.speedup >= 1):
            raise ChanpruneError(f"speed-up must be a number >= 1, got {self.speedup!r}")
        if not (self.ridge == "auto" or (isinstance(self.ridge, (int, float)) and self.ridge >= 0)):
            raise ChanpruneError(f"ridge must be a number >= 0 or 'auto', got {self.ridge!r}")
        if not isinstance(self.round_to, int) or isinstance(self.round_to, bool) or self.round_to < 1:
            raise ChanpruneError(f"round_to must be a positive integer, got {self.round_to!r}")
        if self.samples_per_image < 1:
            raise ChanpruneError(f"samples per image must be >= 1, got {self.samples_per_image}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["exclude"] = list(self.exclude)
        return out
