"""Option groups several commands share: which model (and its weights), which labelled data, which device."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click

from .devices import DEVICE_HELP
from .errors import ChanpruneError
from .folders import PREPROCESS


def _apply(options: list[Callable], fn: Callable) -> Callable:
    for option in reversed(options):
        fn = option(fn)
    return fn


def json_kwargs(text: str | None) -> dict[str, Any]:
    """--arch-kwargs: a JSON object of constructor arguments."""
    import json

    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ChanpruneError(f"--arch-kwargs is not valid JSON ({err}); write an object such as "
                             "'{\"num_classes\": 10}'") from err
    if not isinstance(value, dict):
        raise ChanpruneError(f"--arch-kwargs must be a JSON object of argument names, got {text!r}")
    return value


def model_options(fn: Callable) -> Callable:
    """--model / --arch / --arch-kwargs / --weights / --trust-checkpoint: which model, with which weights."""
    options = [
        click.option("--model", "model_spec", default=None,
                     help="Bundled name (e.g. vgg16-mnist), torchvision:NAME, timm:NAME, or a chanprune .safetensors "
                          "file."),
        click.option("--arch", default=None, help="Your own model class, module:Class (imports it: needs "
                                                  "--trust-checkpoint)."),
        click.option("--arch-kwargs", default=None, help="JSON arguments of the constructor or --arch class, e.g. "
                                                         "'{\"num_classes\": 10}'."),
        click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Trained weights for --model NAME / --arch: a state dict (.safetensors, or .pth read with "
                          "weights_only)."),
        click.option("--trust-checkpoint", is_flag=True,
                     help="Allow code to run on load: a pickled module, a checkpoint naming a Python class, --arch."),
    ]
    return _apply(options, fn)


def data_options(fn: Callable) -> Callable:
    """--data / --val-split / --test-split / --preprocess: labelled images in class subfolders."""
    options = [
        click.option("--data", "data_dir", default=None,
                     help="Labelled images: DIR/CLASS/IMAGE (split by --split-seed into train/val/test), or DIR with "
                          "train/ and val/ (and test/) trees [default: a bundled model's own data]."),
        click.option("--val-split", default=None, help="Validation tree (DIR/CLASS/IMAGE) instead of a split of --data."),
        click.option("--test-split", default=None, help="Test tree (DIR/CLASS/IMAGE) instead of a split of --data."),
        click.option("--preprocess", type=click.Choice(PREPROCESS), default="imagenet", show_default=True,
                     help="imagenet: resize to size/0.875, centre crop, ImageNet mean/std; timm: the model's "
                          "pretrained_cfg; none: pixels in [0, 1] (resized to --input-size if given)."),
        click.option("--split-seed", type=int, default=0, show_default=True, help="Seed of the split of --data."),
    ]
    return _apply(options, fn)


def device_option(fn: Callable) -> Callable:
    """--device, default auto."""
    return click.option("--device", default="auto", show_default=True, help=f"Where the model runs: {DEVICE_HELP}.")(fn)
