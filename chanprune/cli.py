"""The command-line face of chanprune: train, prune, eval, analyze, demo."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .errors import ChanpruneError


class _Group(click.Group):
    """Turns ChanpruneError into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ChanpruneError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
def main() -> None:
    """Make trained CNNs faster by removing channels (He, Zhang, Sun 2017, and beyond)."""


@main.command()
@click.option("--model", "model_name", default="vgg16-mnist", show_default=True, help="Bundled model name.")
@click.option("--epochs", default=20, show_default=True)
@click.option("--lr", default=0.05, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the checkpoint (default: the package's bundled checkpoint).")
def train(model_name: str, epochs: int, lr: float, seed: int, out: Path | None) -> None:
    """Train a bundled reference model on the bundled MNIST split and save its checkpoint."""
    from dataclasses import asdict

    from .checkpoint import save_state_file
    from .data import mnist_split
    from .evaluate import accuracy
    from .models import bundled_model
    from .train import TrainConfig, train as run_training

    entry = bundled_model(model_name)
    config = TrainConfig(epochs=epochs, lr=lr, seed=seed)
    torch_seed(seed)
    model = entry.build()
    result = run_training(model, mnist_split("train"), mnist_split("val"), config)
    result["test_accuracy"] = accuracy(model, mnist_split("test"))
    command = f"chanprune train --model {model_name} --epochs {epochs} --lr {lr} --seed {seed}"
    out = out or entry.checkpoint
    save_state_file(out, model.state_dict(), {"model": model_name, "recipe": asdict(config),
                                              "command": command, "result": result})
    click.echo(f"val accuracy {result['val_accuracy']:.4f}  test accuracy {result['test_accuracy']:.4f}"
               f"  -> {out}")


def torch_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)
