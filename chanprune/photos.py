"""Photographs that ship inside packages, as a super-resolution data set.

scikit-image's sample photographs (natural scenes, microscopy, a telescope field; the greyscale
ones repeated over three channels) and scikit-learn's two photos, split *by photo* with a fixed
seed into train, validation and test, so no test photo is ever seen in training. Validation and
test photos are drawn from the colour photographs only (the greyscale ones, mostly textures,
always train). Low-resolution inputs are made the usual way: bicubic downsampling with
antialiasing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from .extras import require

# scikit-image sample images that are photographs and ship with the package (no download)
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "retina", "stereo_motorcycle")
SKIMAGE_GREY_PHOTOS = ("camera", "coins", "moon", "grass", "gravel", "brick")
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
SPLIT_SEED = 0
VAL_PHOTOS, TEST_PHOTOS = 2, 3
EVAL_CROP = 256  # validation and test photos are scored on their central crop of at most this size


@dataclass(frozen=True)
class Photo:
    """One photograph: its name and its pixels (3, H, W) in [0, 1]."""

    name: str
    pixels: torch.Tensor


def _as_rgb(image: np.ndarray) -> torch.Tensor:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return torch.from_numpy(np.array(image[:, :, :3])).permute(2, 0, 1).float() / 255.0


def all_photos() -> tuple[list[Photo], list[Photo]]:
    """Every photograph in a fixed order: (colour photos, greyscale photos)."""
    data = require("skimage.data", "sr")
    photos = []
    grey = [Photo(name, _as_rgb(getattr(data, name)())) for name in SKIMAGE_GREY_PHOTOS]
    for name in SKIMAGE_PHOTOS:
        image = getattr(data, name)()
        photos.append(Photo(name, _as_rgb(image[0] if isinstance(image, tuple) else image)))  # stereo: left view
    sklearn_images = require("sklearn.datasets", "sr").load_sample_images()
    for name, image in zip(sklearn_images.filenames, sklearn_images.images):
        short = name.replace("\\", "/").rsplit("/", 1)[-1]
        if short in SKLEARN_PHOTOS:
            photos.append(Photo(short.removesuffix(".jpg"), _as_rgb(image)))
    return photos, grey


@dataclass(frozen=True)
class PhotoSplit:
    """Photographs split by photo: train (patches are cut from these), val and test."""

    train: list[Photo]
    val: list[Photo]
    test: list[Photo]


def photo_split() -> PhotoSplit:
    """The fixed split: a seeded permutation of the colour photos gives test first, then
    validation; the rest and every greyscale photo train."""
    colour, grey = all_photos()
    order = torch.randperm(len(colour), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    ordered = [colour[i] for i in order]
    test, val = ordered[:TEST_PHOTOS], ordered[TEST_PHOTOS:TEST_PHOTOS + VAL_PHOTOS]
    return PhotoSplit(ordered[TEST_PHOTOS + VAL_PHOTOS:] + grey, val, test)


def downscale(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """Bicubic downsampling by ``scale`` with antialiasing, clamped to [0, 1] ((N, 3, H, W))."""
    return F.interpolate(hr, scale_factor=1 / scale, mode="bicubic", antialias=True,
                         align_corners=False).clamp(0, 1)


def upscale_bicubic(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """The baseline every super-resolution model must beat: bicubic upsampling."""
    return F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)


def centre_crop(photo: Photo, size: int, scale: int) -> torch.Tensor:
    """The central crop (1, 3, h, w) of at most ``size`` pixels a side, a multiple of ``scale``."""
    _, h, w = photo.pixels.shape
    ch, cw = (min(size, d) // scale * scale for d in (h, w))
    top, left = (h - ch) // 2, (w - cw) // 2
    return photo.pixels[None, :, top:top + ch, left:left + cw]


def random_patches(photos: list[Photo], count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` high-resolution patches (count, 3, size, size) cut at random places of random
    photos (each photo as likely as its share of the pixels), flipped and rotated at random."""
    areas = torch.tensor([float(p.pixels.shape[1] * p.pixels.shape[2]) for p in photos])
    which = torch.multinomial(areas, count, replacement=True, generator=generator)
    patches = []
    for i in which.tolist():
        pixels = photos[i].pixels
        top = int(torch.randint(0, pixels.shape[1] - size + 1, (1,), generator=generator))
        left = int(torch.randint(0, pixels.shape[2] - size + 1, (1,), generator=generator))
        patch = pixels[:, top:top + size, left:left + size]
        if bool(torch.randint(0, 2, (1,), generator=generator)):
            patch = patch.flip(2)
        patches.append(patch.rot90(int(torch.randint(0, 4, (1,), generator=generator)), (1, 2)))
    return torch.stack(patches)
