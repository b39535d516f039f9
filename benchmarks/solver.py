"""One conv layer, three ways: the bare XᵀX product, chanprune's moment route, the authors' procedure.

All three see the same N fit samples of a 3x3 conv with c input and c output channels, read off
features of the two photos that ship with scikit-learn (a seeded random two-layer stem with
BatchNorm-like standardisation and ReLU), and both solvers are scored on the same held-out samples,
taken from a part of the photos that no fit sample touches.

1. ``bare``: float32 XᵀX accumulated batch by batch. Any method that looks at every sample pays it.
2. ``moments``: chanprune streams the samples into :class:`Moments` and solves on them
   (``lasso_problem`` + ``lasso_select`` for exactly c' channels, then ``least_squares``).
3. ``authors``: the released code's procedure, reimplemented from its description: scikit-learn
   ``Lasso`` on the explicit (N_s·n) x c matrix of Z_i = X_i W_iᵀ from N_s random samples, alpha
   doubled then bisected until c'..1.1c' channels survive, trimmed to the c' largest |β|, then
   least squares with an intercept on all N samples held in memory.

Times exclude generating the samples (reported as 'generate') and scoring on held-out samples
('heldout'); 'x bare' divides a method's counted time by the bare product's at the same N. Each
method runs in a fresh spawned process, so its peak resident memory is its own. Other processes
on the machine distort timings badly (with OpenMP, a busy core stalls every barrier), so each run
records the load average; ``--threads 1`` is steadier on a shared machine.
Run: ``python -m benchmarks.solver --sizes 5000,20000,50000``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import resource
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from sklearn.datasets import load_sample_images
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import Lasso
from torch import nn

from chanprune.solvers import lasso_problem, lasso_select, least_squares, relative_error
from chanprune.stats import Moments, Positions, block_indices, conv_patches

K = 9  # 3x3 consumer kernel
CROP = 40  # crop side in pixels; the stride-2 stem turns it into a 20x20 feature map
PER_CROP = 10  # sampled positions per crop, as in the paper
MID_CHANNELS = 64  # width of the stem's first layer
CALIB_CROPS = 64  # crops that set the stem's BatchNorm-like statistics and the scale of Y
SCALES = (1.0, 0.71, 0.5)
HELDOUT_FROM = 0.75  # held-out crops lie right of this fraction of the photo width, fit crops left of it
SPLITS = {"weights": 0, "calib": 1, "fit": 2, "heldout": 3}
DEFAULT_OUT = Path(__file__).parent / "results" / "solver.json"
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Setup:
    """Everything that fixes the samples and the target width; identical for every method."""

    channels: int = 512
    keep_ratio: float = 0.5
    heldout: int = 5000
    batch_crops: int = 64
    threads: int = 0  # torch threads in each method's process; 0 keeps torch's default
    seed: int = 0

    @property
    def n_keep(self) -> int:
        return max(1, round(self.keep_ratio * self.channels))

    @property
    def dim(self) -> int:
        return self.channels * K


def _generator(seed: int, split: str, index: int) -> torch.Generator:
    """A generator that depends only on (seed, split, batch index): every process draws the same."""
    state = np.random.SeedSequence([seed, SPLITS[split], index]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def _photo_pyramid() -> list[torch.Tensor]:
    """The sklearn photos, normalised per colour channel, each at every scale in SCALES."""
    photos = torch.from_numpy(np.stack(load_sample_images().images)).permute(0, 3, 1, 2).float() / 255
    photos = (photos - photos.mean((0, 2, 3), keepdim=True)) / photos.std((0, 2, 3), keepdim=True)
    return [nn.functional.interpolate(p[None], scale_factor=s, mode="bilinear", antialias=True)[0]
            if s != 1.0 else p for p in photos for s in SCALES]


def _standardise(conv: nn.Conv2d, inputs: torch.Tensor, g: torch.Generator) -> None:
    """Fold a BatchNorm with statistics of ``inputs`` and a random affine (γ, β) into ``conv``."""
    out = conv(inputs)
    mean, std = out.mean((0, 2, 3)), out.std((0, 2, 3)) + 1e-5
    n = conv.out_channels
    gamma = torch.exp(0.3 * torch.randn(n, generator=g))
    beta = 0.5 * torch.randn(n, generator=g) - 0.3
    conv.weight.mul_((gamma / std)[:, None, None, None])
    conv.bias.copy_(beta + gamma * (conv.bias - mean) / std)


def _consumer_weight(c: int, g: torch.Generator) -> torch.Tensor:
    """(c, c*K) weight with low-rank shared structure plus noise and uneven per-input-channel gains,
    so that channels are partly redundant and differ in importance: selection has something to do."""
    rank = max(c // 8, 1)
    low = torch.randn(c, rank, generator=g) @ torch.randn(rank, c * K, generator=g) / math.sqrt(rank)
    gains = torch.exp(0.7 * torch.randn(c, generator=g)).repeat_interleave(K)
    return (low + 0.5 * torch.randn(c, c * K, generator=g)) * gains


class PhotoFeatures:
    """Deterministic (X, Y) batches of one 3x3 conv (c -> c, padding 1) reading photo features.

    X rows are input patches in chanprune's channel-major layout, Y rows the conv output there
    (pre-activation, with a small bias). Crop i of a split, and its PER_CROP positions, come from
    a generator seeded by (seed, split, i) alone, so separate processes and different batch sizes
    see bit-identical samples.
    """

    @torch.no_grad()
    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        g = _generator(setup.seed, "weights", 0)
        self.pyramid = _photo_pyramid()
        first = nn.Conv2d(3, MID_CHANNELS, 3, stride=2, padding=1)
        second = nn.Conv2d(MID_CHANNELS, setup.channels, 3, padding=1)
        for conv in (first, second):
            nn.init.normal_(conv.weight, generator=g)
            nn.init.zeros_(conv.bias)
        calib, calib_gens = self._crops("calib", 0, CALIB_CROPS)
        _standardise(first, calib, g)
        _standardise(second, torch.relu(first(calib)), g)
        self.stem = nn.Sequential(first, nn.ReLU(), second, nn.ReLU()).eval().requires_grad_(False)
        self.consumer = nn.Conv2d(setup.channels, setup.channels, 3, padding=1).requires_grad_(False)
        weight = _consumer_weight(setup.channels, g)
        y_std = float((self._patches(self.stem(calib), calib_gens) @ weight.T).std())
        self.consumer.weight.copy_((weight / y_std).reshape(self.consumer.weight.shape))
        self.consumer.bias.copy_(0.1 * torch.randn(setup.channels, generator=g))

    @property
    def weight(self) -> torch.Tensor:
        """Consumer weight flattened to (n, c*K), channel-major."""
        return self.consumer.weight.reshape(self.setup.channels, -1)

    @property
    def bias(self) -> torch.Tensor:
        return self.consumer.bias

    def _crop(self, split: str, g: torch.Generator) -> torch.Tensor:
        """A random crop, randomly flipped, from the split's side of a random photo and scale."""
        image = self.pyramid[int(torch.randint(len(self.pyramid), (1,), generator=g))]
        height, width = image.shape[1:]
        border = int(HELDOUT_FROM * width)
        lo, hi = (border, width - CROP) if split == "heldout" else (0, border - CROP)
        top = int(torch.randint(height - CROP + 1, (1,), generator=g))
        left = int(torch.randint(lo, hi + 1, (1,), generator=g))
        crop = image[:, top:top + CROP, left:left + CROP]
        return crop.flip(2) if bool(torch.rand(1, generator=g) < 0.5) else crop

    def _crops(self, split: str, first: int, count: int) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Crops first..first+count-1 of ``split``, and their generators (they go on to draw positions)."""
        gens = [_generator(self.setup.seed, split, i) for i in range(first, first + count)]
        return torch.stack([self._crop(split, g) for g in gens]), gens

    def _patches(self, features: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
        """Consumer input patches at PER_CROP distinct random positions of each crop's feature map."""
        height, width = features.shape[2:]
        flat = torch.cat([torch.randperm(height * width, generator=g)[:PER_CROP] for g in gens])
        image = torch.arange(len(gens)).repeat_interleave(PER_CROP)
        return conv_patches(self.consumer, features, Positions(image, flat // width, flat % width))

    @torch.no_grad()
    def batches(self, split: str, n_samples: int) -> Iterator[Batch]:
        """``n_samples`` samples of ``split`` ('fit' or 'heldout') in batches of batch_crops*PER_CROP."""
        per_batch = self.setup.batch_crops * PER_CROP
        for start in range(0, n_samples, per_batch):
            take = min(per_batch, n_samples - start)
            crops, gens = self._crops(split, start // PER_CROP, math.ceil(take / PER_CROP))
            x = self._patches(self.stem(crops), gens)[:take]
            yield x, x @ self.weight.T + self.bias


class Clock:
    """Wall-clock totals per named part."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, part: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.parts[part] += time.perf_counter() - start


def timed(batches: Iterator[Batch], clock: Clock, checksum: list[float]) -> Iterator[Batch]:
    """Pass batches through, charging their generation to 'generate' and adding their sums to
    ``checksum`` so that the parent can check every method saw the same samples."""
    while True:
        with clock("generate"):
            batch = next(batches, None)
            if batch is None:
                return
            checksum[0] += float(batch[0].double().sum()) + float(batch[1].double().sum())
        yield batch


def peak_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def heldout_moments(source: PhotoFeatures, clock: Clock) -> Moments:
    """Moments of the held-out samples, streamed; charged to 'heldout', which is not counted."""
    setup = source.setup
    held = Moments(setup.dim, setup.channels)
    for x, y in timed(source.batches("heldout", setup.heldout), clock, [0.0]):
        with clock("heldout"):
            held.update(x, y)
    return held


def run_bare(source: PhotoFeatures, n: int, clock: Clock, checksum: list[float]) -> dict[str, Any]:
    """Float32 XᵀX over every fit sample; only the products are timed."""
    acc = torch.zeros(source.setup.dim, source.setup.dim)
    for x, _ in timed(source.batches("fit", n), clock, checksum):
        with clock("products"):
            torch.addmm(acc, x.T, x, out=acc)
    return {"counted": ["products"]}


def run_moments(source: PhotoFeatures, n: int, clock: Clock, checksum: list[float]) -> dict[str, Any]:
    """chanprune: stream into Moments, select exactly c' channels on them, refit by least squares."""
    setup = source.setup
    fit = Moments(setup.dim, setup.channels)
    for x, y in timed(source.batches("fit", n), clock, checksum):
        with clock("accumulate"):
            fit.update(x, y)
    weight = source.weight.double()
    with clock("lasso"):
        keep = lasso_select(*lasso_problem(fit, weight, K), setup.n_keep)
    with clock("lstsq"):
        w, b = least_squares(fit, keep, K)
    held = heldout_moments(source, clock)
    return {"counted": ["accumulate", "lasso", "lstsq"], "keep": keep,
            "rel_error_heldout": relative_error(held, keep, K, w, b),
            "rel_error_fit": relative_error(fit, keep, K, w, b)}


def channel_design(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Z ((P*n) x c, Fortran order as sklearn's coordinate descent wants it) with column i =
    vec(X_i W_iᵀ) for unit-norm W_i, and vec(y) in the same row order."""
    n, c = weight.shape[0], weight.shape[1] // K
    w = weight.reshape(n, c, K)
    w = w / w.square().sum((0, 2), keepdim=True).sqrt().clamp_min(1e-12)
    z_t = torch.einsum("sik,oik->iso", x.reshape(len(x), c, K), w).reshape(c, -1)
    return z_t.numpy().T, y.reshape(-1).numpy()


def lasso_bisect(z: np.ndarray, target: np.ndarray, n_keep: int, alpha: float = 1e-4,
                 tolerance: float = 0.1, max_fits: int = 60) -> tuple[np.ndarray, dict[str, int]]:
    """β from sklearn's Lasso at an alpha leaving n_keep..(1+tolerance)*n_keep non-zeros: double alpha
    from a small start until fewer than n_keep survive, then bisect. Falls back to the last alpha
    with too many survivors if ``max_fits`` fits do not land in the range."""
    model = Lasso(alpha=alpha, fit_intercept=False, warm_start=True)
    upper = math.floor(n_keep * (1 + tolerance))
    stats = {"fits": 0, "convergence_warnings": 0}

    def count(a: float) -> int:
        model.alpha = a
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(z, target)
        stats["fits"] += 1
        stats["convergence_warnings"] += sum(issubclass(w.category, ConvergenceWarning) for w in caught)
        return int(np.count_nonzero(model.coef_))

    low, high, found = 0.0, alpha, count(alpha)
    while found >= n_keep and stats["fits"] < max_fits:
        if found <= upper:
            return model.coef_.copy(), stats
        low, high = high, 2 * high
        found = count(high)
    while stats["fits"] < max_fits:
        middle = (low + high) / 2
        found = count(middle)
        if n_keep <= found <= upper:
            return model.coef_.copy(), stats
        low, high = (middle, high) if found > upper else (low, middle)
    count(low)
    return model.coef_.copy(), stats


def lstsq_with_intercept(x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor,
                         rows: int = 8192) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Weights (n, |keep|*K), bias (n,) and the residual sum of squares (nan when LAPACK reports
    none), by float64 least squares (gelsd, as numpy's lstsq) on the explicit N x (|keep|*K + 1)
    design matrix, copied in row blocks."""
    cols = block_indices(keep, K)
    design = torch.ones(len(x), len(cols) + 1, dtype=torch.float64)
    for start in range(0, len(x), rows):
        design[start:start + rows, :-1] = x[start:start + rows, cols]
    result = torch.linalg.lstsq(design, y.double(), driver="gelsd")
    residual = float(result.residuals.sum()) if result.residuals.numel() else float("nan")
    return result.solution[:-1].T.contiguous(), result.solution[-1].clone(), residual


def run_authors(source: PhotoFeatures, n: int, clock: Clock, checksum: list[float]) -> dict[str, Any]:
    """The authors' procedure: hold all N samples, Lasso on N_s of them, lstsq on all of them.

    The Lasso target is Y minus the layer's bias, as in the paper's objective (no bias term there).
    """
    setup = source.setup
    x = torch.empty(n, setup.dim)
    y = torch.empty(n, setup.channels)
    start = 0
    for xb, yb in timed(source.batches("fit", n), clock, checksum):
        with clock("generate"):
            x[start:start + len(xb)], y[start:start + len(xb)] = xb, yb
        start += len(xb)
    n_lasso = min(400, n // 20)
    with clock("lasso"):
        rows = torch.from_numpy(np.sort(np.random.default_rng(setup.seed).choice(n, n_lasso, replace=False)))
        z, target = channel_design(x[rows], y[rows] - source.bias, source.weight)
        beta, stats = lasso_bisect(z, target, setup.n_keep)
        del z, target
        keep = torch.from_numpy(np.sort(np.argsort(-np.abs(beta), kind="stable")[:setup.n_keep]))
    with clock("lstsq"):
        w, b, residual = lstsq_with_intercept(x, y, keep)
    held = heldout_moments(source, clock)
    return {"counted": ["lasso", "lstsq"], "keep": keep, "n_lasso": n_lasso,
            "lasso_nonzero_before_trim": int(np.count_nonzero(beta)), **stats,
            "rel_error_heldout": relative_error(held, keep, K, w, b),
            "rel_error_fit": (residual / float(y.double().square().sum())) ** 0.5}


METHODS: dict[str, Callable[[PhotoFeatures, int, Clock, list[float]], dict[str, Any]]] = {
    "bare": run_bare, "moments": run_moments, "authors": run_authors}


def warm_up() -> None:
    """Start the BLAS/LAPACK thread pools so that no method pays their start-up in its timings."""
    a = torch.randn(256, 64, dtype=torch.float64)
    torch.linalg.cholesky(a.T @ a + torch.eye(64, dtype=torch.float64))
    torch.linalg.lstsq(a, a[:, :8], driver="gelsd")
    torch.randn(256, 64).T @ torch.randn(256, 64)


def measure(method: str, setup: Setup, n: int) -> dict[str, Any]:
    """Run one method in this (fresh) process and return its timings, memory and errors."""
    if setup.threads:
        torch.set_num_threads(setup.threads)
    torch.manual_seed(setup.seed)
    source = PhotoFeatures(setup)
    warm_up()
    base = peak_mib()
    load_before = os.getloadavg()[0]
    clock, checksum = Clock(), [0.0]
    result = METHODS[method](source, n, clock, checksum)
    counted = result.pop("counted")
    keep = result.pop("keep", None)
    return {"n": n, "method": method, "seconds": sum(clock.parts[p] for p in counted),
            "parts": dict(clock.parts), "counted_parts": counted, "peak_mib": peak_mib(),
            "setup_mib": base, "kept": None if keep is None else len(keep),
            "kept_channels": None if keep is None else keep.tolist(), "checksum": checksum[0],
            "threads": torch.get_num_threads(), "load_avg_1min": [load_before, os.getloadavg()[0]], **result}


def measure_in_child(method: str, setup: Setup, n: int) -> dict[str, Any]:
    """:func:`measure` in a freshly spawned process, so peak memory is the method's own."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, (method, setup, n))


def table(runs: list[dict[str, Any]]) -> str:
    """Markdown table of the runs; 'x bare' compares with the bare product at the same N."""
    bare = {r["n"]: r["seconds"] for r in runs if r["method"] == "bare"}
    lines = ["| N | method | seconds | x bare | parts (s) | peak MiB | held-out rel. error | fit rel. error | kept |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in r["parts"].items())
        ratio = r["seconds"] / bare[r["n"]] if r["n"] in bare else float("nan")
        errors = [f"{e:.4f}" if e is not None else "-" for e in (r.get("rel_error_heldout"), r.get("rel_error_fit"))]
        lines.append(f"| {r['n']} | {r['method']} | {r['seconds']:.2f} | {ratio:.2f} | {parts} | "
                     f"{r['peak_mib']:.0f} | {' | '.join(errors)} | {'-' if r['kept'] is None else r['kept']} |")
    return "\n".join(lines)


def check_same_samples(runs: list[dict[str, Any]]) -> None:
    """Fail loudly if the methods at one N did not see the same fit samples."""
    for n in {r["n"] for r in runs}:
        sums = {r["method"]: r["checksum"] for r in runs if r["n"] == n}
        if len(set(sums.values())) > 1:
            raise RuntimeError(f"methods saw different samples at N={n}: {sums}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-samples", type=int, default=50000, help="fit samples N")
    parser.add_argument("--sizes", type=str, default=None, help="comma-separated N values; overrides --n-samples")
    parser.add_argument("--channels", type=int, default=512, help="c = n, input and output channels")
    parser.add_argument("--keep-ratio", type=float, default=0.5, help="c'/c")
    parser.add_argument("--heldout", type=int, default=5000, help="held-out samples")
    parser.add_argument("--batch-crops", type=int, default=64,
                        help=f"crops per streamed batch ({PER_CROP} samples each); 64 is chanprune's default")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per method; 0: torch's default")
    parser.add_argument("--methods", type=str, default=",".join(METHODS), help="comma-separated subset of methods")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup = Setup(args.channels, args.keep_ratio, args.heldout, args.batch_crops, args.threads, args.seed)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [args.n_samples]
    methods = args.methods.split(",")
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; use some of {list(METHODS)}")
    runs = []
    for n in sizes:
        for method in methods:
            runs.append(measure_in_child(method, setup, n))
            print(f"done N={n} {method}: {runs[-1]['seconds']:.2f} s", flush=True)
    check_same_samples(runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "setup": asdict(setup), "n_keep": setup.n_keep, "dim": setup.dim, "runs": runs,
              "machine": {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
                          "cpu_count": os.cpu_count()}}
    args.out.write_text(json.dumps(report, indent=1))
    print(table(runs))
    loads = [v for r in runs for v in r["load_avg_1min"]]
    print(f"\n1-minute load average during the runs: {min(loads):.1f} to {max(loads):.1f} "
          f"on {os.cpu_count()} CPUs; written to {args.out}")


if __name__ == "__main__":
    main()
