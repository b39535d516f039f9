"""Tiny calibration sets: the fixed ridge against ridge='auto' (chosen on held-out images).

    python -m benchmarks.small_calibration --models resnet20-mnist,resnet56-mnist,vgg16-mnist
"""

from __future__ import annotations

import argparse
import warnings

from chanprune.data import calibration_subset, mnist_split
from chanprune.errors import SparseSamplesWarning
from chanprune.evaluate import accuracy, logit_rel_error, predict
from chanprune.models import create_model
from chanprune.pruner import prune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20-mnist,resnet56-mnist,vgg16-mnist")
    parser.add_argument("--speedup", type=float, default=2.0)
    parser.add_argument("--calib-images", type=int, default=100)
    parser.add_argument("--samples-per-image", type=int, default=4)
    args = parser.parse_args()
    warnings.simplefilter("ignore", SparseSamplesWarning)
    test = mnist_split("test")
    images = calibration_subset(mnist_split("train"), args.calib_images, 0)
    print("| model | ridge | test acc (%) | logit error |\n|---|---|---|---|")
    for name in args.models.split(","):
        model = create_model(name)
        reference = predict(model, test.images)
        for ridge in (1e-6, "auto"):
            pruned, _ = prune(model, images, args.speedup, progress=False, recipe="paper",
                              samples_per_image=args.samples_per_image, ridge=ridge)
            print(f"| {name} | {ridge} | {100 * accuracy(pruned, test):.1f} | "
                  f"{logit_rel_error(predict(pruned, test.images), reference):.4g} |", flush=True)


if __name__ == "__main__":
    main()
