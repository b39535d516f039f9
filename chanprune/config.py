"""PruneConfig: every option of a pruning run, validated early, stored in the report."""

from __future__ import annotations

import difflib
import fnmatch
import math
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from .allocators import ALLOCATIONS
from .errors import ChanpruneError
from .factorize import FACTORIZATIONS
from .recipes import RECIPE_FIELDS, RECIPES
from .selection import STRATEGIES

TRUNK_MODES = ("keep", "joint", "fine")
GLOBAL_WEIGHTS = ("energy", "sensitivity")
AUTO_RIDGES = (1e-6, 1e-4, 1e-2, 1e-1, 1.0)  # relative to trace(G)/dim


@dataclass
class PruneConfig:
    """Every option of a pruning run; stored in the report so the run can be repeated.

    ``trunk`` says what happens to channels tied by residual adds: "keep" leaves them whole (the
    paper), "joint" prunes them with one selection over all their readers, "fine" (FCP) keeps
    the trunk's width but lets every layer reading it read its own subset (a channel select)
    and every branch's last layer write its own subset (a scatter before the add). With
    ``feature_map_sampling`` a conv reading channels that stay whole reads a chosen subset of
    them through a channel select. ``residual_correction`` makes the last layer of a residual
    branch also make up for the error on its shortcut. ``factorize`` adds spatial and/or channel
    factorization of every reconstructed conv (3C, see :mod:`chanprune.factorize`); each technique
    then takes an equal share of the speed-up (``channel_pruning=False``: factorization alone).
    """

    speedup: float | None = 4.0
    recipe: str = "default"  # fills every option below that is left as None (see chanprune.recipes)
    method: str | None = None
    allocation: str | None = None
    global_weight: str | None = None  # allocation="global": "energy" or "sensitivity" (see engine.curves)
    widths: dict[str, int] | None = None
    exclude: tuple[str, ...] = ()
    samples_per_image: int | str | None = None  # "auto": per layer, enough for 10 fitted samples per input
    seed: int = 0
    reconstruct: bool = True
    ridge: float | str | None = None  # a number, or "auto": chosen per layer on the held-out samples
    lasso_rounds: int = 1
    heldout_every: int = 10
    batch_size: int = 64
    trunk: str | None = None
    residual_correction: bool | None = None
    feature_map_sampling: bool | None = None
    round_to: int | str | None = None  # widths in blocks of this many channels (8 or 16 suit CPU kernels), or "auto"
    factorize: tuple[str, ...] = ()  # 3C: "spatial" and/or "channel" factorization of reconstructed convs
    channel_pruning: bool = True  # False (with factorize): the factorization alone makes the whole speed-up

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ChanpruneError(f"unknown recipe {self.recipe!r}; use one of {', '.join(RECIPES)}")
        for name in RECIPE_FIELDS:
            if getattr(self, name) is None:
                setattr(self, name, getattr(RECIPES[self.recipe], name))

    @property
    def positions_per_image(self) -> int | None:
        """Sampled positions per image, or None when each layer takes what it needs ("auto")."""
        return None if self.samples_per_image == "auto" else self.samples_per_image

    def validate(self) -> None:
        """Raise on any option that cannot work, before the model or the data are touched."""
        if self.method not in STRATEGIES:
            raise ChanpruneError(f"unknown method {self.method!r}; use one of {', '.join(STRATEGIES)}")
        if self.allocation not in ALLOCATIONS:
            raise ChanpruneError(f"unknown allocation {self.allocation!r}; use one of {', '.join(ALLOCATIONS)}")
        if self.global_weight not in GLOBAL_WEIGHTS:
            raise ChanpruneError(f"unknown global weight {self.global_weight!r}; use one of {', '.join(GLOBAL_WEIGHTS)}")
        if self.trunk not in TRUNK_MODES:
            raise ChanpruneError(f"unknown trunk mode {self.trunk!r}; use one of {', '.join(TRUNK_MODES)}")
        unknown = set(self.factorize) - set(FACTORIZATIONS)
        if unknown or len(set(self.factorize)) != len(self.factorize):
            raise ChanpruneError(f"factorize takes each of {', '.join(FACTORIZATIONS)} at most once, got "
                                 f"{', '.join(self.factorize) or 'nothing'}; e.g. factorize=('spatial', 'channel')")
        if not self.channel_pruning and not self.factorize:
            raise ChanpruneError("channel_pruning=False leaves nothing to do without factorize; add factorize=... "
                                 "or prune channels")
        if self.factorize and (not self.reconstruct or self.speedup is None):
            raise ChanpruneError("factorization fits the factorized layers by least squares to meet a speed-up: it "
                                 "needs reconstruct=True and a speed-up target")
        if self.speedup is None and self.widths is None:
            raise ChanpruneError("give a speed-up target or explicit widths")
        if self.speedup is not None:
            check_speedup(self.speedup)
        if self.widths is not None and not isinstance(self.widths, dict):
            raise ChanpruneError(f"widths holds a {type(self.widths).__name__}, not a mapping; map layer names to "
                                 "kept input channels, e.g. {'conv2': 4}")
        if not (self.ridge == "auto" or (isinstance(self.ridge, (int, float)) and self.ridge >= 0)):
            raise ChanpruneError(f"ridge must be a number >= 0 or 'auto', got {self.ridge!r}; "
                                 "use e.g. 1e-6 or 'auto'")
        if self.round_to != "auto" and (not isinstance(self.round_to, int) or isinstance(self.round_to, bool)
                                        or self.round_to < 1):
            raise ChanpruneError(f"round_to must be a positive integer or 'auto', got {self.round_to!r}; use 1 "
                                 "(no rounding), 8, 16 or auto")
        if self.samples_per_image != "auto" and (not isinstance(self.samples_per_image, int)
                                                 or isinstance(self.samples_per_image, bool)
                                                 or self.samples_per_image < 1):
            raise ChanpruneError(f"samples per image must be at least 1, got {self.samples_per_image}; "
                                 "raise --samples-per-image, or use auto (each layer then takes what it needs)")

    def check_model(self, model: Any) -> None:
        """Raise unless ``model`` is an nn.Module and every exclude glob matches one of its layers:
        a glob that matches nothing is a typo that would silently prune the layer it meant."""
        if not isinstance(model, nn.Module):
            raise ChanpruneError(f"the model must be a torch.nn.Module, got {type(model).__name__}; load it first "
                                 "(chanprune.load_model, chanprune.create_model or torch.load)")
        names = [name for name, _ in model.named_modules() if name]
        for pattern in self.exclude:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                raise ChanpruneError(f"exclude glob {pattern!r} matches no layer of {type(model).__name__}; fix "
                                     f"the glob ({_layer_hint(pattern, model)})")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["exclude"] = list(self.exclude)
        out["factorize"] = list(self.factorize)
        return out


def check_speedup(speedup: Any) -> None:
    """Raise unless ``speedup`` is a finite number of at least 1 (1 keeps every channel: a no-op)."""
    if not (isinstance(speedup, (int, float)) and not isinstance(speedup, bool) and math.isfinite(speedup)
            and speedup >= 1):
        raise ChanpruneError(f"speed-up must be a finite number of at least 1 (FLOPs before / FLOPs after), got "
                             f"{speedup!r}; ask for e.g. 2 (1 keeps every channel)")


def _layer_hint(pattern: str, model: nn.Module) -> str:
    """Names close to ``pattern``, else the first conv/linear layers of ``model``."""
    names = [name for name, _ in model.named_modules() if name]
    close = difflib.get_close_matches(pattern, names, n=4, cutoff=0.5)
    if close:
        return f"did you mean {', '.join(close)}?"
    layers = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return f"its layers include {', '.join(layers[:10])}{', ...' if len(layers) > 10 else ''}"
