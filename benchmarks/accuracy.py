"""The suite's accuracy experiments: one job per (reference model, calibration seed).

Every arm is a pruned model at a FLOPs budget. Each is evaluated as is, after re-estimating its
BatchNorm statistics on the calibration images, and after the same fine-tuning budget, started
from whichever of the two has the higher validation accuracy. Arms:
  plain chains (VGG)   the paper's Table 1: lasso, max_response, first_k at each speed-up, and
                       the lasso widths trained from scratch (one number: after training)
  residual nets        the paper's residual variants (plain / enhanced) and joint trunk pruning
  every model          Torch-Pruning criteria at FLOPs matched to chanprune's speed-ups
The calibration seed also seeds fine-tuning, so seeds give independent repeats of everything.
"""

from __future__ import annotations

import copy
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.peers import CRITERIA, tp_prune
from benchmarks.residual import VARIANTS
from chanprune.io.checkpoint import save_model
from chanprune.data import calibration_indices, mnist_split
from chanprune.errors import SparseSamplesWarning
from chanprune.evaluate import accuracy, logit_rel_error, predict
from chanprune.finetune import FINETUNE_DEFAULTS, finetune, reestimate_batchnorm, train_from_scratch
from chanprune.flops import count_flops
from chanprune.graph import build_graph
from chanprune.models import create_model
from chanprune.pruner import prune
from chanprune.train import TrainConfig

DEFAULT_ARM = "default"  # chanprune's default recipe, next to the paper's rows
TABLE1_METHODS = (DEFAULT_ARM, "lasso", "max_response", "first_k")
RESIDUAL_ARMS = ("plain", "enhanced", "joint", DEFAULT_ARM)


@dataclass(frozen=True)
class Budget:
    """How much work one job does; ``ft_epochs`` is per model (a default for unlisted ones)."""

    calib_images: int = 500
    samples_per_image: int = 10
    table1_speedups: tuple[float, ...] = (2.0, 4.0, 5.0)
    residual_speedups: tuple[float, ...] = (2.0,)
    peer_speedups: tuple[float, ...] = (2.0, 4.0)
    criteria: tuple[str, ...] = CRITERIA
    ft_epochs: tuple[tuple[str, int], ...] = (("vgg16-mnist", 2),)
    ft_epochs_default: int = 1
    ft_lr: float = 0.01
    scratch_epochs: int = 10
    scratch_lr: float = 0.05
    ridge: float | str = "auto"

    def epochs_for(self, model: str) -> int:
        return dict(self.ft_epochs).get(model, self.ft_epochs_default)


def arm_options(arm: str, budget: Budget) -> dict[str, Any]:
    """The prune() options of a chanprune arm: the default recipe as it is, or the paper's recipe
    with the budget's ridge and positions per image and a Table 1 method or a residual variant (lasso)."""
    if arm == DEFAULT_ARM:
        return {"recipe": "default"}
    paper = {"recipe": "paper", "ridge": budget.ridge, "samples_per_image": budget.samples_per_image}
    return {**paper, "method": "lasso", **VARIANTS[arm]} if arm in VARIANTS else {**paper, "method": arm}


def chanprune_arm(residual: bool) -> str:
    """The chanprune row that meets the peers: the default recipe."""
    return DEFAULT_ARM


class Job:
    """The arms of one (model, seed): shared data and the recording of each arm."""

    def __init__(self, model_name: str, seed: int, budget: Budget, models_dir: Path | None):
        self.name, self.seed, self.budget, self.models_dir = model_name, seed, budget, models_dir
        self.model = create_model(model_name)
        self.train, self.val, self.test = mnist_split("train"), mnist_split("val"), mnist_split("test")
        idx = calibration_indices(len(self.train.images), budget.calib_images, seed)
        self.images, self.labels = self.train.images[idx], self.train.labels[idx]
        self.reference = predict(self.model, self.test.images)
        graph = build_graph(self.model, self.images[:1])
        self.residual = any(g.residual for g in graph.groups)
        self.shape = (1, *self.images.shape[1:])
        self.flops0 = count_flops(self.model, self.shape)
        self.base = self.scores(self.model)
        self.rows: list[dict[str, Any]] = []

    def scores(self, net: nn.Module) -> dict[str, float]:
        logits = predict(net, self.test.images)
        return {"test_acc": float((logits.argmax(1) == self.test.labels).float().mean()),
                "val_acc": accuracy(net, self.val), "logit_err": logit_rel_error(logits, self.reference)}

    def record(self, arm: str, family: str, speedup: float, net: nn.Module, seconds: float) -> None:
        """Evaluate ``net`` as is, with BN re-estimated, and after fine-tuning; append the row."""
        row: dict[str, Any] = {"model": self.name, "seed": self.seed, "arm": arm, "family": family,
                               "speedup": speedup, "achieved": self.flops0 / count_flops(net, self.shape),
                               "seconds": seconds, "base": self.base, "as_is": self.scores(net)}
        reestimated = reestimate_batchnorm(copy.deepcopy(net), self.images)
        row["bn"] = self.scores(reestimated)
        row["ft_start"] = "bn" if row["bn"]["val_acc"] > row["as_is"]["val_acc"] else "as_is"
        tuned = reestimated if row["ft_start"] == "bn" else copy.deepcopy(net)
        epochs = self.budget.epochs_for(self.name)
        chosen = finetune(tuned, self.train, self.val, replace(FINETUNE_DEFAULTS, epochs=epochs, lr=self.budget.ft_lr,
                                                                seed=self.seed), progress=False)
        row["ft"] = {**self.scores(tuned), "epochs": epochs, "lr": chosen["lr"], "best_epoch": chosen["best_epoch"]}
        self.rows.append(row)
        self.log(row)
        if self.models_dir is not None and family != "torch-pruning":
            self.models_dir.mkdir(parents=True, exist_ok=True)
            save_model(net, self.models_dir / f"{self.name}-{arm}-{speedup:g}x.safetensors")

    def log(self, row: dict[str, Any]) -> None:
        stages = ", ".join(f"{stage} {100 * row[stage]['test_acc']:.2f}%" for stage in ("as_is", "bn", "ft")
                           if row[stage] is not None)
        print(f"{self.name} seed {self.seed} {row['arm']} {row['speedup']:g}x ({row['achieved']:.2f}x): {stages}",
              file=sys.stderr, flush=True)

    def chanprune(self, arm: str, speedup: float, **options: Any) -> nn.Module:
        start = time.perf_counter()
        net, _ = prune(self.model, self.images, speedup, seed=self.seed, progress=False, **options)
        self.record(arm, "chanprune", speedup, net, time.perf_counter() - start)
        return net

    def scratch(self, speedup: float, architecture: nn.Module) -> None:
        """The from-scratch baseline: the same widths, random weights, the original recipe shortened."""
        start = time.perf_counter()
        config = TrainConfig(epochs=self.budget.scratch_epochs, lr=self.budget.scratch_lr,
                             warmup_epochs=min(2, self.budget.scratch_epochs // 5), seed=self.seed)
        net, _ = train_from_scratch(architecture, self.train, self.val, config, progress=False)
        row = {"model": self.name, "seed": self.seed, "arm": "scratch", "family": "scratch", "speedup": speedup,
               "achieved": self.flops0 / count_flops(net, self.shape), "seconds": time.perf_counter() - start,
               "base": self.base, "as_is": None, "bn": None, "ft": {**self.scores(net), "epochs": config.epochs}}
        self.rows.append(row)
        self.log(row)

    def peer(self, criterion: str, speedup: float) -> None:
        start = time.perf_counter()
        n_grad = min(256, len(self.images))
        net, _ = tp_prune(self.model, criterion, speedup, self.images[:n_grad], self.labels[:n_grad])
        self.record(f"tp-{criterion}", "torch-pruning", speedup, net, time.perf_counter() - start)

    def run(self) -> list[dict[str, Any]]:
        b = self.budget
        if self.residual:
            for speedup in sorted({*b.residual_speedups, *b.peer_speedups}):
                arms = RESIDUAL_ARMS if speedup in b.residual_speedups else ("joint", DEFAULT_ARM)
                for arm in arms:
                    self.chanprune(arm, speedup, **arm_options(arm, b))
        else:
            for speedup in sorted({*b.table1_speedups, *b.peer_speedups}):
                methods = TABLE1_METHODS if speedup in b.table1_speedups else ("lasso", DEFAULT_ARM)
                for method in methods:
                    net = self.chanprune(method, speedup, **arm_options(method, b))
                    if method == "lasso" and speedup in b.table1_speedups:
                        self.scratch(speedup, net)
        for speedup in b.peer_speedups:
            for criterion in b.criteria:
                self.peer(criterion, speedup)
        return self.rows


def run_job(model_name: str, seed: int, budget: Budget, models_dir: str | None, threads: int) -> list[dict]:
    """Entry point of a worker process: all arms of one (model, seed)."""
    torch.set_num_threads(threads)
    warnings.simplefilter("ignore", SparseSamplesWarning)
    return Job(model_name, seed, budget, Path(models_dir) if models_dir else None).run()
