"""Shared plumbing of the CLI and benchmarks: resolve a model spec, its data, evaluate a pruned model."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from .io.checkpoint import load_model, load_pickled_module
from .io.provenance import Provenance, attach, input_shape, provenance
from .io.references import ArchRef, build_architecture, build_constructor, check_json_value, parse_constructor
from .io.weights import load_weights
from .data import (LabelledData, LabelledSplits, Split, calibration_indices, calibration_subset, image_folder_loader,
                   load_calibration_file, mnist_split, mnist_splits)
from .errors import ChanpruneError
from .evaluate import logit_rel_error, predict, predict_labelled, top_k
from .folders import folder_splits, make_preprocess
from .models import BUNDLED, BundledModel, create_model
from .units import first_in_channels


DEFAULT_CALIBRATION_IMAGES = 500
PROBE_IMAGES = 256  # calibration images whose logits are compared when there are no labelled data


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
    # timm's config says what its images have (TResNet's first conv reads 48 space-to-depth channels)
    timm_size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    in_chans = int(timm_size[0]) if timm_size else first_in_channels(model) or 3
    height, width = input_size or default_input_size(spec, model)
    return attach(model, Provenance(ArchRef("constructor", spec, kwargs), (), (in_chans, int(height), int(width))))


def load_model_spec(spec: str | None, trust_checkpoint: bool = False, input_size: tuple[int, int] | None = None,
                    weights: str | Path | None = None, arch: str | None = None,
                    arch_kwargs: dict[str, Any] | None = None) -> LoadedModel:
    """A bundled model name, a library constructor (``torchvision:resnet50``, ``timm:resnet50``),
    a user class ``arch`` (``module:Class``, imported only with ``trust_checkpoint``), a chanprune
    ``.safetensors`` file, or (opted in) a pickled module. ``weights`` (a state dict file) replaces
    the random or bundled weights of the first three and is recorded in the model's provenance;
    ``arch_kwargs`` go to a constructor or class; ``input_size`` is recorded as the input shape."""
    kwargs = dict(arch_kwargs or {})
    if arch is not None:
        if spec is not None:
            raise ChanpruneError("give --model or --arch, not both")
        loaded = LoadedModel(class_model(arch, kwargs, trust_checkpoint, input_size), None)
    elif spec is None:
        raise ChanpruneError("give --model (a bundled name, torchvision:NAME, timm:NAME or a .safetensors file) "
                             "or --arch module:Class")
    elif spec in BUNDLED:
        if kwargs:
            raise ChanpruneError(f"--arch-kwargs do not apply to the bundled model {spec}")
        loaded = LoadedModel(create_model(spec, pretrained=weights is None), BUNDLED[spec])
    elif parse_constructor(spec) is not None:
        loaded = LoadedModel(constructor_model(spec, input_size, **kwargs), None, spec)
    else:
        if weights is not None or kwargs:
            raise ChanpruneError("--weights and --arch-kwargs build a model from an architecture (a bundled name, "
                                 f"torchvision:NAME, timm:NAME or --arch); {spec!r} is a saved model already")
        return _load_file(spec, trust_checkpoint)
    if weights is not None:
        record = provenance(loaded.model)
        attach(loaded.model, replace(record, weights=load_weights(loaded.model, weights)))
    return loaded


def class_model(arch: str, kwargs: dict[str, Any], trust: bool, input_size: tuple[int, int] | None) -> nn.Module:
    """A user's model class ``module:Class`` built with ``kwargs`` (JSON values), in eval mode."""
    if ":" not in arch:
        raise ChanpruneError(f"--arch {arch!r}: expected module:Class, e.g. mypackage.nets:MyNet")
    if not trust:
        raise ChanpruneError(f"--arch {arch} imports and runs that module's code; pass --trust-checkpoint if you "
                             "trust it")
    check_json_value(kwargs, "--arch-kwargs")
    model = build_architecture(ArchRef("class", arch, kwargs), trust=True, where="--arch").eval()
    in_chans = first_in_channels(model) or 3
    shape = (in_chans, *input_size) if input_size else None
    return attach(model, Provenance(ArchRef("class", arch, kwargs), (), shape))


def _load_file(spec: str, trust_checkpoint: bool) -> LoadedModel:
    path = Path(spec)
    if not path.exists():
        raise ChanpruneError(f"{spec!r} is neither a bundled model ({', '.join(sorted(BUNDLED))}), a constructor "
                             "(torchvision:NAME or timm:NAME) nor an existing file")
    if path.suffix == ".safetensors":
        model = load_model(path, trust=trust_checkpoint)
        record = provenance(model)
        bundled = BUNDLED.get(record.arch.name) if record.arch.kind == "bundled" else None
        return LoadedModel(model, bundled, record.arch.name if record.arch.kind == "constructor" else None)
    if path.suffix in {".pt", ".pth"}:
        if not trust_checkpoint:
            raise ChanpruneError(f"{spec!r} is a pickled module and unpickling runs code; pass --trust-checkpoint "
                                 "if you trust its source (a state dict goes in --weights, with --model NAME)")
        return LoadedModel(load_pickled_module(path), None)
    raise ChanpruneError(f"{spec!r}: expected a .safetensors file from chanprune or a .pt/.pth pickled module")


def labelled_splits(loaded: LoadedModel, data: str | None, val_dir: str | None = None, test_dir: str | None = None,
                    preprocess: str = "imagenet", input_size: tuple[int, int] | None = None,
                    seed: int = 0, required: bool = True) -> LabelledSplits | None:
    """The labelled data a command evaluates and trains on: the ImageFolder tree ``data`` (see
    :mod:`chanprune.folders`), else a bundled model's own split, else None. Without the ``demo``
    extra a bundled model has no split: an error when ``required``, else None."""
    if data is None:
        if val_dir is not None or test_dir is not None:
            raise ChanpruneError("--val-split and --test-split go with --data DIR (the training images)")
        if loaded.entry is None or loaded.entry.dataset != "mnist":
            return None
        try:
            return mnist_splits()
        except ChanpruneError:  # the bundled digits are an extra: only commands that need labels fail
            if required:
                raise
            return None
    channels = (loaded.entry.in_chans if loaded.entry else _recorded_channels(loaded.model)) \
        or first_in_channels(loaded.model) or 3
    transform = make_preprocess(preprocess, loaded.model, input_size, channels)
    return folder_splits(data, transform, channels, val_dir, test_dir, seed)


def calibration_images(loaded: LoadedModel, calib_data: str | None, n_images: int | None, seed: int,
                       input_size: tuple[int, int] | None,
                       splits: LabelledSplits | None = None) -> torch.Tensor | DataLoader:
    """Calibration images: from ``calib_data`` if given (a folder is streamed, file by file, as a
    DataLoader), else a seeded sample of the training part of ``splits`` (its labels unused), else
    the bundled model's train split (for the super-resolution model: patches of its training photos)."""
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
    if splits is not None:  # the training part, already loaded (a folder's is read as needed)
        train = splits.train
        if isinstance(train, Split):
            return calibration_subset(train, n_images or DEFAULT_CALIBRATION_IMAGES, seed)
        count = min(n_images or DEFAULT_CALIBRATION_IMAGES, len(train))
        chosen = calibration_indices(len(train), count, seed).tolist()
        return DataLoader(Subset(train, chosen), batch_size=64)
    if loaded.entry is None and loaded.constructor is not None:
        shape = input_shape(loaded.model) or (3, 224, 224)
        raise ChanpruneError(f"{loaded.constructor} has no data set of its own; pass --data DIR (labelled images in "
                             "class subfolders) or --calib-data (a folder of images or a .npy/.pt tensor of shape "
                             f"N,C,H,W) and --input-size H W (this model's usual input is {shape[1]}x{shape[2]})")
    if loaded.entry is None:
        raise ChanpruneError("this model has no bundled data set; pass --data DIR (labelled images in class "
                             "subfolders) or --calib-data (a folder of images or a .npy/.pt tensor of shape N,C,H,W)")
    if loaded.entry.dataset == "photos":  # the super-resolution model: low-resolution patches of its photographs
        from .photos import photo_split
        from .sr import low_res_patches

        size = loaded.entry.input_size[0]
        return low_res_patches(photo_split().train, n_images or DEFAULT_CALIBRATION_IMAGES, 2 * size, 2, seed)
    return calibration_subset(mnist_split("train"), n_images or DEFAULT_CALIBRATION_IMAGES, seed)


def _recorded_channels(model: nn.Module) -> int | None:
    shape = input_shape(model)
    return int(shape[0]) if shape else None


def compare(original: nn.Module, pruned: nn.Module, split: LabelledData | None,
            images: torch.Tensor) -> dict[str, float | None]:
    """Accuracy before/after on ``split`` and relative logit error on its images (or on ``images``)."""
    result: dict[str, float | None] = {"accuracy_before": None, "accuracy_after": None}
    if split is None:
        result["logit_rel_error"] = logit_rel_error(predict(pruned, images), predict(original, images))
        return result
    (before, after), labels = predict_labelled([original, pruned], split)
    result.update(logit_rel_error=logit_rel_error(after, before), accuracy_before=top_k(before, labels),
                  accuracy_after=top_k(after, labels))
    return result
