"""Shared plumbing of the CLI and benchmarks: resolve a model spec, its data, evaluate a pruned model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .io.checkpoint import load_model, load_pickled_module
from .io.provenance import Provenance, attach, input_shape, provenance
from .io.references import ArchRef, build_constructor, parse_constructor
from .data import Split, calibration_subset, image_folder_loader, iterate_batches, load_calibration_file, mnist_split
from .errors import ChanpruneError
from .evaluate import accuracy, logit_rel_error, predict
from .models import BUNDLED, BundledModel, create_model
from .units import first_in_channels


@dataclass
class LoadedModel:
    """A model plus what is known about it: its bundled entry (data set, input size), if any, and
    the library constructor (``torchvision:resnet50``) it was built from, if any."""

    model: nn.Module
    entry: BundledModel | None
    constructor: str | None = None


# Constructor arguments used unless the caller gives its own: the auxiliary classifiers of GoogLeNet
# and Inception v3 only run in training mode (dead weight for pruning an eval-mode model), and an
# explicit init_weights silences torchvision's warning about its future default.
CONSTRUCTOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "torchvision:googlenet": {"aux_logits": False, "init_weights": True},
    "torchvision:inception_v3": {"aux_logits": False, "init_weights": True},
}


def default_input_size(constructor: str, model: nn.Module) -> tuple[int, int]:
    """The input size a library model was designed for (its weights' crop size), else 224x224."""
    source, name = parse_constructor(constructor) or ("", "")
    try:
        if source == "timm":
            size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
            if size:
                return int(size[-2]), int(size[-1])
        elif source == "torchvision":
            import torchvision

            crop = torchvision.models.get_model_weights(name).DEFAULT.transforms.keywords["crop_size"]
            return int(crop), int(crop)
    except Exception:  # no weights entry or no crop size: fall back to ImageNet's usual size
        pass
    return 224, 224


def constructor_model(spec: str, input_size: tuple[int, int] | None = None, **kwargs: Any) -> nn.Module:
    """A torchvision/timm classification model with random weights, in eval mode, that chanprune
    can save and rebuild: ``spec`` is ``torchvision:NAME`` or ``timm:NAME``; ``kwargs`` go to the
    constructor (e.g. ``num_classes=10``) and must be JSON-serialisable."""
    kwargs = {**CONSTRUCTOR_DEFAULTS.get(spec, {}), **kwargs}
    model = build_constructor(spec, kwargs).eval()
    in_chans = first_in_channels(model) or 3
    height, width = input_size or default_input_size(spec, model)
    return attach(model, Provenance(ArchRef("constructor", spec, kwargs), (), (in_chans, int(height), int(width))))


def load_model_spec(spec: str, trust_checkpoint: bool = False,
                    input_size: tuple[int, int] | None = None) -> LoadedModel:
    """A bundled model name, a library constructor (``torchvision:resnet50``, ``timm:resnet50``; random
    weights, ``input_size`` recorded as its input shape), a chanprune ``.safetensors`` file, or
    (opted in) a pickled module."""
    if spec in BUNDLED:
        return LoadedModel(create_model(spec), BUNDLED[spec])
    if parse_constructor(spec) is not None:
        return LoadedModel(constructor_model(spec, input_size), None, spec)
    path = Path(spec)
    if not path.exists():
        raise ChanpruneError(f"{spec!r} is neither a bundled model ({', '.join(sorted(BUNDLED))}), a constructor "
                             "(torchvision:NAME or timm:NAME) nor an existing file")
    if path.suffix == ".safetensors":
        model = load_model(path, trust=trust_checkpoint)
        arch = provenance(model).arch
        return LoadedModel(model, BUNDLED.get(arch.name) if arch.kind == "bundled" else None,
                           arch.name if arch.kind == "constructor" else None)
    if path.suffix in {".pt", ".pth"}:
        if not trust_checkpoint:
            raise ChanpruneError(f"{spec!r} is a pickled module and unpickling runs code; pass --trust-checkpoint "
                                 "if you trust its source")
        return LoadedModel(load_pickled_module(path), None)
    raise ChanpruneError(f"{spec!r}: expected a .safetensors file from chanprune or a .pt/.pth pickled module")


def calibration_images(loaded: LoadedModel, calib_data: str | None, n_images: int | None, seed: int,
                       input_size: tuple[int, int] | None) -> torch.Tensor | DataLoader:
    """Calibration images: from ``calib_data`` if given (a folder is streamed, file by file, as a
    DataLoader), else the bundled model's train split."""
    if n_images is not None and n_images < 1:
        raise ChanpruneError(f"--calib-images must be at least 1, got {n_images}; give the number of images to "
                             "calibrate on (500 for bundled models)")
    if calib_data is not None:
        in_chans = loaded.entry.in_chans if loaded.entry else _recorded_channels(loaded.model)
        if Path(calib_data).is_dir():
            return image_folder_loader(calib_data, input_size, in_chans, n_images, seed)
        images = load_calibration_file(calib_data, input_size, in_chans)
        if n_images is not None and n_images < len(images):
            g = torch.Generator().manual_seed(seed)
            images = images[torch.randperm(len(images), generator=g)[:n_images].sort().values]
        return images
    if loaded.entry is None and loaded.constructor is not None:
        shape = input_shape(loaded.model) or (3, 224, 224)
        raise ChanpruneError(f"{loaded.constructor} has random weights and no data set; pass --calib-data (a folder "
                             "of images or a .npy/.pt tensor of shape N,C,H,W) and --input-size H W to resize "
                             f"the images of a folder (this model's usual input is {shape[1]}x{shape[2]})")
    if loaded.entry is None:
        raise ChanpruneError("this model has no bundled data set; pass --calib-data (a folder of images or a "
                             ".npy/.pt tensor of shape N,C,H,W)")
    return calibration_subset(mnist_split("train"), n_images or 500, seed)


def probe_images(data: torch.Tensor | DataLoader, limit: int = 256) -> torch.Tensor:
    """Up to ``limit`` calibration images as one tensor (to compare logits of user models)."""
    if isinstance(data, torch.Tensor):
        return data[:limit]
    batches, count = [], 0
    for batch in iterate_batches(data, limit):
        batches.append(batch[: limit - count])
        count += len(batches[-1])
        if count >= limit:
            break
    return torch.cat(batches)


def _recorded_channels(model: nn.Module) -> int | None:
    shape = input_shape(model)
    return int(shape[0]) if shape else None


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
