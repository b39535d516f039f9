"""Named sets of defaults for a pruning run: chanprune's best measured recipe and He et al.'s.

An option the caller sets always wins; a recipe only fills in the options left unset.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    """Values of the options a recipe decides, and what it is for."""

    summary: str
    method: str
    allocation: str
    global_weight: str
    ridge: float | str
    trunk: str
    residual_correction: bool
    feature_map_sampling: bool
    samples_per_image: int | str
    round_to: int | str


RECIPES: dict[str, Recipe] = {
    "default": Recipe(
        "chanprune's best measured: greedy selection, widths from data in blocks of 8 channels (in layers of 64 "
        "or more), ridge chosen "
        "on held-out samples, residual trunks pruned jointly, enough samples for every layer",
        method="greedy", allocation="global", global_weight="energy", ridge="auto", trunk="joint",
        residual_correction=True, feature_map_sampling=True, samples_per_image="auto", round_to="auto"),
    "paper": Recipe(
        "He et al. 2017 as published: LASSO selection, uniform widths, trunks kept whole with residual "
        "correction and feature-map sampling, 10 positions per image",
        method="lasso", allocation="uniform", global_weight="energy", ridge=1e-6, trunk="keep",
        residual_correction=True, feature_map_sampling=True, samples_per_image=10, round_to=1),
}

RECIPE_FIELDS = ("method", "allocation", "global_weight", "ridge", "trunk", "residual_correction",
                 "feature_map_sampling", "samples_per_image", "round_to")
