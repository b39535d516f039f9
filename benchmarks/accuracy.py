"""The suite's accuracy experiments: one job per (reference model, calibration seed).

Every arm is a pruned model at a FLOPs budget. Each is evaluated as is, after re-estimating its
BatchNorm statistics on the calibration images, and after the same fine-tuning budget, started
from whichever of the two has the higher validation accuracy. Arms:
  plain chains (VGG)   the paper's Table 1: lasso, max_response, first_k at each speed-up, and
                       the lasso widths trained from scratch (one number: after training)
  residual nets        the paper's residual variants (plain / enhanced) and joint trunk pruning
  every model          chanprune's default recipe with its data-driven (global) widths, next to
                       the same recipe with uniform widths and with the paper's preset widths;
                       Torch-Pruning criteria at FLOPs matched to chanprune's speed-ups
  FCP's models         the default recipe with its trunks kept (feature-map sampling only),
                       pruned jointly (the default) and fine-grained (FCP), up to FCP's 4.6×
The calibration seed also seeds fine-tuning, so seeds give independent repeats of everything.
Each finished row is appended to the job's rows file at once, and a rerun skips the rows the file
already holds, so a run that stops continues where it stopped.
"""

from __future__ import annotations

import copy
import json
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.allocation import preset_for
from benchmarks.peers import CRITERIA, tp_prune
from benchmarks.residual import VARIANTS
from chanprune.io.checkpoint import save_model
from chanprune.data import calibration_indices, mnist_split
from chanprune.errors import ChanpruneError, SparseSamplesWarning
from chanprune.evaluate import accuracy, logit_rel_error, predict
from chanprune.finetune import FINETUNE_DEFAULTS, finetune, reestimate_batchnorm, train_from_scratch
from chanprune.flops import count_flops
from chanprune.graph import build_graph
from chanprune.models import create_model
from chanprune.pruner import prune
from chanprune.train import TrainConfig

DEFAULT_ARM = "default"  # chanprune's default recipe, next to the paper's rows; it meets the peers
TABLE1_METHODS = (DEFAULT_ARM, "lasso", "max_response", "first_k")
RESIDUAL_ARMS = ("plain", "enhanced", "joint", DEFAULT_ARM)
ALLOCATION_ARMS = {"uniform": "uniform", "preset": None, DEFAULT_ARM: "global"}  # arm -> allocation (None: the model's preset)
TRUNK_ARMS = {"trunk-keep": "keep", DEFAULT_ARM: "joint", "trunk-fine": "fine"}  # arm -> trunk mode
PARTS = ("paper", "allocation", "peers", "trunk")  # a job's comparisons, in the order it runs them


@dataclass(frozen=True)
class Budget:
    """How much work one job does; ``ft_epochs`` is per model (a default for unlisted ones)."""

    calib_images: int = 500
    samples_per_image: int = 10
    table1_speedups: tuple[float, ...] = (2.0, 4.0, 5.0)
    allocation_speedups: tuple[float, ...] = (2.0, 4.0, 5.0)
    residual_speedups: tuple[float, ...] = (2.0,)
    peer_speedups: tuple[float, ...] = (2.0, 4.0)
    trunk_models: tuple[str, ...] = ("resnet56-mnist", "resnet50-mnist", "xception50-mnist")
    trunk_speedups: tuple[float, ...] = (2.0, 4.0, 4.6)  # 4.6×: FCP's 78% of FLOPs removed
    criteria: tuple[str, ...] = CRITERIA
    ft_epochs: tuple[tuple[str, int], ...] = (("vgg16-mnist", 2),)
    ft_epochs_default: int = 1
    ft_lr: float = 0.01
    scratch_epochs: int = 10
    scratch_lr: float = 0.05
    ridge: float | str = "auto"

    def epochs_for(self, model: str) -> int:
        return dict(self.ft_epochs).get(model, self.ft_epochs_default)


def arm_options(arm: str, budget: Budget, model: str = "") -> dict[str, Any]:
    """The prune() options of a chanprune arm: the default recipe as it is or with other widths
    (``uniform``, ``preset``: ``model``'s preset) or another trunk mode (``trunk-keep``,
    ``trunk-fine``), or the paper's recipe with the budget's ridge and positions per image and a
    Table 1 method or a residual variant (lasso)."""
    if arm == DEFAULT_ARM:
        return {"recipe": "default"}
    if arm in TRUNK_ARMS:
        return {"recipe": "default", "trunk": TRUNK_ARMS[arm]}
    if arm in ALLOCATION_ARMS:
        return {"recipe": "default", "allocation": ALLOCATION_ARMS[arm] or preset_for(model)}
    paper = {"recipe": "paper", "ridge": budget.ridge, "samples_per_image": budget.samples_per_image}
    return {**paper, "method": "lasso", **VARIANTS[arm]} if arm in VARIANTS else {**paper, "method": arm}


class Job:
    """The arms of one (model, seed): shared data and the recording of each arm."""

    def __init__(self, model_name: str, seed: int, budget: Budget, models_dir: Path | None, rows_file: Path,
                 parts: tuple[str, ...] = PARTS):
        self.name, self.seed, self.budget, self.models_dir = model_name, seed, budget, models_dir
        self.parts = parts
        self.rows_file = rows_file
        self.rows: list[dict[str, Any]] = ([json.loads(line) for line in rows_file.read_text().splitlines()]
                                           if rows_file.exists() else [])
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

    def done(self, arm: str, speedup: float) -> bool:
        """Whether the rows file already holds this arm's row."""
        return any(r["arm"] == arm and r["speedup"] == speedup for r in self.rows)

    def append(self, row: dict[str, Any]) -> None:
        """Keep ``row`` and append it to the rows file (one JSON line), then log it."""
        self.rows.append(row)
        with self.rows_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.log(row)

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
        if self.models_dir is not None and family != "torch-pruning":
            self.models_dir.mkdir(parents=True, exist_ok=True)
            save_model(net, self.models_dir / f"{self.name}-{arm}-{speedup:g}x.safetensors")
        self.append(row)

    def log(self, row: dict[str, Any]) -> None:
        stages = row.get("refused") or ", ".join(f"{stage} {100 * row[stage]['test_acc']:.2f}%"
                                                 for stage in ("as_is", "bn", "ft") if row[stage] is not None)
        print(f"{self.name} seed {self.seed} {row['arm']} {row['speedup']:g}x ({row.get('achieved', 0):.2f}x): {stages}",
              file=sys.stderr, flush=True)

    def chanprune(self, arm: str, speedup: float, needed: bool = False) -> nn.Module | None:
        """Prune and record one arm, unless its row exists; returns the pruned model (None when
        the row exists and the model is not ``needed``, or the arm's widths are refused)."""
        if self.done(arm, speedup) and not needed:
            return None
        start = time.perf_counter()
        try:
            net, _ = prune(self.model, self.images, speedup, seed=self.seed, progress=False,
                           **arm_options(arm, self.budget, self.name))
        except ChanpruneError as err:  # a preset that cannot reach the speed-up at this rounding
            if not self.done(arm, speedup):
                self.append({"model": self.name, "seed": self.seed, "arm": arm, "family": "chanprune",
                             "speedup": speedup, "refused": str(err)})
            return None
        if not self.done(arm, speedup):
            self.record(arm, "chanprune", speedup, net, time.perf_counter() - start)
        return net

    def scratch(self, speedup: float, architecture: nn.Module) -> None:
        """The from-scratch baseline: the same widths, random weights, the original recipe shortened."""
        if self.done("scratch", speedup):
            return
        start = time.perf_counter()
        config = TrainConfig(epochs=self.budget.scratch_epochs, lr=self.budget.scratch_lr,
                             warmup_epochs=min(2, self.budget.scratch_epochs // 5), seed=self.seed)
        net, _ = train_from_scratch(architecture, self.train, self.val, config, progress=False)
        row = {"model": self.name, "seed": self.seed, "arm": "scratch", "family": "scratch", "speedup": speedup,
               "achieved": self.flops0 / count_flops(net, self.shape), "seconds": time.perf_counter() - start,
               "base": self.base, "as_is": None, "bn": None, "ft": {**self.scores(net), "epochs": config.epochs}}
        self.append(row)

    def peer(self, criterion: str, speedup: float) -> None:
        if self.done(f"tp-{criterion}", speedup):
            return
        start = time.perf_counter()
        n_grad = min(256, len(self.images))
        net, _ = tp_prune(self.model, criterion, speedup, self.images[:n_grad], self.labels[:n_grad])
        self.record(f"tp-{criterion}", "torch-pruning", speedup, net, time.perf_counter() - start)

    def run(self) -> None:
        """Every arm of the job's ``parts`` whose row is not saved yet (each appended to the rows file)."""
        b = self.budget
        if "paper" in self.parts and self.residual:
            for speedup in sorted({*b.residual_speedups, *b.peer_speedups}):
                for arm in RESIDUAL_ARMS if speedup in b.residual_speedups else ("joint",):
                    self.chanprune(arm, speedup)
        elif "paper" in self.parts:
            for speedup in b.table1_speedups:
                for method in TABLE1_METHODS:
                    scratch = method == "lasso" and not self.done("scratch", speedup)
                    net = self.chanprune(method, speedup, needed=scratch)
                    if scratch:
                        self.scratch(speedup, net)
        if "allocation" in self.parts:
            for speedup in sorted({*b.allocation_speedups, *b.peer_speedups}):
                for arm in ALLOCATION_ARMS:
                    self.chanprune(arm, speedup)
        if "peers" in self.parts:
            for speedup in b.peer_speedups:
                for criterion in b.criteria:
                    self.peer(criterion, speedup)
        if "trunk" in self.parts and self.name in b.trunk_models:
            for speedup in b.trunk_speedups:
                for arm in TRUNK_ARMS:
                    self.chanprune(arm, speedup)


def run_job(model_name: str, seed: int, budget: Budget, models_dir: str | None, rows_file: str,
            threads: int, parts: tuple[str, ...] = PARTS) -> None:
    """Entry point of a worker process: the arms of ``parts`` of one (model, seed), continuing
    ``rows_file`` (the rows stay in that file: the suite reads every rows file when it ends)."""
    torch.set_num_threads(threads)
    warnings.simplefilter("ignore", SparseSamplesWarning)
    Job(model_name, seed, budget, Path(models_dir) if models_dir else None, Path(rows_file), parts).run()
