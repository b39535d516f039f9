"""Shared plumbing of the CLI and benchmarks: resolve a model spec, its data, evaluate a pruned model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_model, load_pickled_module
from .data import Split, calibration_subset, load_calibration_file, mnist_split
from .errors import ChanpruneError
from .evaluate import accuracy, logit_rel_error, predict
from .models import BUNDLED, BundledModel, create_model


@dataclass
class LoadedModel:
    """A model plus what is known about it: its bundled entry (data set, input size), if any."""

    model: nn.Module
    entry: BundledModel | None


def load_model_spec(spec: str, trust_checkpoint: bool = False) -> LoadedModel:
    """A bundled model name, a chanprune ``.safetensors`` file, or (opted in) a pickled module."""
    if spec in BUNDLED:
        return LoadedModel(create_model(spec), BUNDLED[spec])
    path = Path(spec)
    if not path.exists():
        raise ChanpruneError(f"{spec!r} is neither a bundled model ({', '.join(sorted(BUNDLED))}) nor an existing file")
    if path.suffix == ".safetensors":
        model = load_model(path)
        bundled = model._chanprune["arch"].get("bundled")
        return LoadedModel(model, BUNDLED.get(bundled))
    if path.suffix in {".pt", ".pth"}:
        if not trust_checkpoint:
            raise ChanpruneError(f"{spec!r} is a pickled module and unpickling runs code; pass --trust-checkpoint "
                                 "if you trust its source")
        return LoadedModel(load_pickled_module(path), None)
    raise ChanpruneError(f"{spec!r}: expected a .safetensors file from chanprune or a .pt/.pth pickled module")


def calibration_images(loaded: LoadedModel, calib_data: str | None, n_images: int | None, seed: int,
                       input_size: tuple[int, int] | None) -> torch.Tensor:
    """Calibration images: from ``calib_data`` if given, else the bundled model's train split."""
    if calib_data is not None:
        in_chans = loaded.entry.in_chans if loaded.entry else None
        images = load_calibration_file(calib_data, input_size, in_chans)
        if n_images is not None and n_images < len(images):
            g = torch.Generator().manual_seed(seed)
            images = images[torch.randperm(len(images), generator=g)[:n_images].sort().values]
        return images
    if loaded.entry is None:
        raise ChanpruneError("this model has no bundled data set; pass --calib-data (a folder of images or a "
                             ".npy/.pt tensor of shape N,C,H,W)")
    return calibration_subset(mnist_split("train"), n_images or 500, seed)


def test_split(loaded: LoadedModel) -> Split | None:
    """The held-back test split of a bundled model's data set (None for user models)."""
    return mnist_split("test") if loaded.entry is not None and loaded.entry.dataset == "mnist" else None


def compare(original: nn.Module, pruned: nn.Module, split: Split | None,
            images: torch.Tensor) -> dict[str, float | None]:
    """Accuracy before/after on ``split`` and relative logit error on its images (or on ``images``)."""
    probe = split.images if split is not None else images
    result: dict[str, float | None] = {
        "logit_rel_error": logit_rel_error(predict(pruned, probe), predict(original, probe)),
        "accuracy_before": None, "accuracy_after": None}
    if split is not None:
        result["accuracy_before"] = accuracy(original, split)
        result["accuracy_after"] = accuracy(pruned, split)
    return result
