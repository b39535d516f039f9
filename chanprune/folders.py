"""Labelled images in the usual layout: an ImageFolder tree (one subfolder per class), its
preprocessing, and its train / validation / test parts.

``DIR`` either holds ``train/`` and ``val/`` (and ``test/``) trees, or is one tree that is split by
file with a fixed seed; ``val_dir`` / ``test_dir`` name parts explicitly. Class indices follow the
sorted class folder names of the training part (torchvision's ImageFolder convention), and every
other part must use the same classes. Images are read from disk as they are needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .data import IMAGE_SUFFIXES, LabelledSplits, image_paths, image_tensor, open_image
from .errors import ChanpruneError

PREPROCESS = ("imagenet", "timm", "none")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET_CROP_FRACTION = 0.875  # resize to size / 0.875 (256 for 224), then centre crop: torchvision's eval transform
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # train, val, test of a single tree


@dataclass(frozen=True)
class Preprocess:
    """An eval transform: resize the shorter side to ``resize`` (None: keep the size) and centre
    crop to ``crop`` (H, W; None: no crop), or with ``stretch`` resize to ``crop`` exactly; then
    scale to [0, 1] and normalise per channel."""

    crop: tuple[int, int] | None
    resize: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    stretch: bool = False

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        method = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[self.interpolation]
        if self.stretch and self.crop is not None:
            image = image.resize((self.crop[1], self.crop[0]), method)
        else:
            image = self._resize_and_crop(image, method)
        x = image_tensor(image)
        mean = torch.tensor(self.mean[: x.shape[0]]).view(-1, 1, 1)
        std = torch.tensor(self.std[: x.shape[0]]).view(-1, 1, 1)
        return (x - mean) / std

    def _resize_and_crop(self, image, method):
        """torchvision's Resize(int) then CenterCrop arithmetic, so the pixels match its eval transform."""
        if self.resize:
            w, h = image.size
            short, long = (w, h) if w <= h else (h, w)
            size = (self.resize, int(self.resize * long / short))
            image = image.resize(size if w <= h else size[::-1], method)
        if self.crop is not None:
            w, h = image.size
            if h < self.crop[0] or w < self.crop[1]:
                raise ChanpruneError(f"an image of {w}x{h} is smaller than the {self.crop[1]}x{self.crop[0]} crop; "
                                     "use --preprocess imagenet or timm (which resize first)")
            top, left = int(round((h - self.crop[0]) / 2)), int(round((w - self.crop[1]) / 2))
            image = image.crop((left, top, left + self.crop[1], top + self.crop[0]))
        return image


def make_preprocess(kind: str, model: nn.Module, input_size: tuple[int, int] | None,
                    in_channels: int) -> Preprocess:
    """The eval transform ``kind`` (one of :data:`PREPROCESS`) for ``model``: ``imagenet`` resizes to
    size/0.875 and centre-crops ``input_size`` (default: the model's recorded input, else 224) with
    ImageNet's mean and std; ``timm`` takes all of it from the model's ``pretrained_cfg``; ``none``
    only scales to [0, 1] (resizing to ``input_size`` exactly, if given)."""
    from .io.provenance import input_shape

    if kind not in PREPROCESS:
        raise ChanpruneError(f"unknown --preprocess {kind!r}; use one of {', '.join(PREPROCESS)}")
    grey = in_channels == 1
    if kind == "none":
        return Preprocess(tuple(input_size) if input_size else None, None, (0.0,) * 3, (1.0,) * 3,
                          stretch=input_size is not None)
    if kind == "timm":
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
        if not cfg:
            raise ChanpruneError("--preprocess timm needs a timm model (its pretrained_cfg); use --preprocess "
                                 "imagenet or none for other models")
        size = tuple(input_size) if input_size else tuple(int(d) for d in cfg.get("input_size", (3, 224, 224))[-2:])
        crop_pct = float(cfg.get("crop_pct") or IMAGENET_CROP_FRACTION)
        interpolation = cfg.get("interpolation") if cfg.get("interpolation") in ("bilinear", "bicubic") else "bilinear"
        return Preprocess(size, int(size[0] / crop_pct), tuple(cfg.get("mean", IMAGENET_MEAN)),
                          tuple(cfg.get("std", IMAGENET_STD)), interpolation)
    recorded = input_shape(model)
    size = tuple(input_size) if input_size else (tuple(recorded[1:]) if recorded else (224, 224))
    mean, std = ((sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)) if grey else (IMAGENET_MEAN, IMAGENET_STD)
    return Preprocess(size, int(size[0] / IMAGENET_CROP_FRACTION), mean, std)


class LabelledFolder(Dataset):
    """(image, label) pairs read from files one at a time."""

    def __init__(self, files: list[Path], labels: list[int], classes: tuple[str, ...], preprocess: Preprocess,
                 in_channels: int):
        self.files, self.labels, self.classes, self.preprocess = files, labels, classes, preprocess
        self.mode = "L" if in_channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.preprocess(open_image(self.files[index], self.mode)), self.labels[index]


def class_files(root: Path) -> dict[str, list[Path]]:
    """Class name -> its image files (sorted), for a tree with one subfolder per class."""
    if not root.is_dir():
        raise ChanpruneError(f"labelled data {str(root)!r} is not a folder; give an ImageFolder tree: one "
                             "subfolder per class holding its images")
    classes = {d.name: image_paths(d) for d in sorted(root.iterdir()) if d.is_dir()}
    classes = {name: files for name, files in classes.items() if files}
    if not classes:
        raise ChanpruneError(f"{str(root)!r} has no class subfolders with images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                             "lay it out as DIR/CLASS/IMAGE, one subfolder per class")
    return classes


def _part(files: dict[str, list[Path]], classes: tuple[str, ...], where: str) -> tuple[list[Path], list[int]]:
    unknown = sorted(set(files) - set(classes))
    if unknown:
        raise ChanpruneError(f"{where} has classes the training part lacks ({', '.join(unknown[:5])}); every part "
                             "must use the training part's class folders")
    pairs = [(f, classes.index(c)) for c in classes for f in files.get(c, [])]
    return [f for f, _ in pairs], [label for _, label in pairs]


def folder_splits(data_dir: str | Path, preprocess: Preprocess, in_channels: int, val_dir: str | Path | None = None,
                  test_dir: str | Path | None = None, seed: int = 0) -> LabelledSplits:
    """Train, validation and test parts of ``data_dir`` (see the module docstring)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise ChanpruneError(f"--data {str(root)!r} is not a folder; give an ImageFolder tree (DIR/CLASS/IMAGE) "
                             "or a folder holding train/ and val/ trees")
    named = {name: root / name for name in ("train", "val", "test") if (root / name).is_dir()}
    if "train" in named:
        train_files = class_files(named["train"])
        parts = {"val": val_dir or named.get("val"), "test": test_dir or named.get("test")}
    else:
        train_files = class_files(root)
        parts = {"val": val_dir, "test": test_dir}
    classes = tuple(train_files)
    train, train_labels = _part(train_files, classes, str(root))
    split: dict[str, tuple[list[Path], list[int]]] = {}
    for name, folder in parts.items():
        if folder is not None:
            split[name] = _part(class_files(Path(folder)), classes, str(folder))
    missing = [name for name in ("val", "test") if name not in split]
    if missing:  # a seeded split by file
        order = np.random.default_rng(seed).permutation(len(train))
        fractions = {"val": SPLIT_FRACTIONS[1], "test": SPLIT_FRACTIONS[2]}
        start, taken = 0, set()
        for name in missing:
            count = max(1, int(round(fractions[name] * len(train))))
            chosen = sorted(order[start : start + count].tolist())
            split[name] = ([train[i] for i in chosen], [train_labels[i] for i in chosen])
            taken.update(chosen)
            start += count
        if len(taken) >= len(train):
            raise ChanpruneError(f"{str(root)!r} has {len(train)} images, too few to split into train, validation "
                                 "and test; add images or give --val-split / --test-split folders")
        keep = [i for i in range(len(train)) if i not in taken]
        train, train_labels = [train[i] for i in keep], [train_labels[i] for i in keep]

    def part(files: list[Path], labels: list[int]) -> LabelledFolder:
        return LabelledFolder(files, labels, classes, preprocess, in_channels)

    return LabelledSplits(part(train, train_labels), part(*split["val"]), part(*split["test"]), classes)
