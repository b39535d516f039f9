"""Summaries shared by the benchmark tables."""

from __future__ import annotations

import statistics


def mean_sd(values: list[float], fmt: str = ".2f") -> str:
    """``mean ± sample standard deviation`` (spread 0 for one value, "–" for none)."""
    if not values:
        return "–"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{fmt}} ± {spread:{fmt}}"
