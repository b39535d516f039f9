"""Train a torchvision/timm classifier on a labelled ImageFolder tree and save its state dict with
torch.save: it stands in, in the README's walk-through, for the weights a user trained themselves.

    python scripts/train_folder_model.py digits resnet18-digits.pth --model torchvision:resnet18 --size 32
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from chanprune.evaluate import accuracy
from chanprune.experiment import constructor_model
from chanprune.folders import folder_splits, make_preprocess
from chanprune.train import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default="torchvision:resnet18")
    parser.add_argument("--size", type=int, default=32, help="input height and width")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    probe = folder_splits(args.data, make_preprocess("none", torch.nn.Identity(), None, 3), 3)
    model = constructor_model(args.model, (args.size, args.size), num_classes=len(probe.classes))
    splits = folder_splits(args.data, make_preprocess("imagenet", model, (args.size, args.size), 3), 3)
    result = train(model, splits.train, splits.val, TrainConfig(epochs=args.epochs, lr=args.lr, warmup_epochs=1,
                                                                seed=args.seed))
    torch.save(model.state_dict(), args.out)
    print(f"val accuracy {100 * result['val_accuracy']:.2f}%  test accuracy {100 * accuracy(model, splits.test):.2f}%"
          f"  -> {args.out}")


if __name__ == "__main__":
    main()
