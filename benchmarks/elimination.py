"""Time of greedy backward elimination on one wide layer, from its moments.

A 3x3 conv reading ``--channels`` input channels (512: 4608 features, ResNet's last stage) is
fitted on ``--samples`` seeded random samples; :func:`chanprune.solvers.elimination_path` then
removes channels down to ``--keep`` (the whole error curve that global allocation reads, and the
work greedy selection does). Prints the seconds and the channels left, on one thread. To compare with an earlier version,
run this file from a checkout of it (``git worktree add``) in the same session.

    python -m benchmarks.elimination --channels 512 --keep 32
"""

from __future__ import annotations

import argparse
import time

import torch

from chanprune.solvers import elimination_path
from chanprune.stats import Moments

KERNEL = 9  # features per channel of a 3x3 conv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--keep", type=int, default=32)
    parser.add_argument("--samples", type=int, default=6000)
    parser.add_argument("--outputs", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    dim = args.channels * KERNEL
    x = torch.randn(args.samples, dim, generator=g)
    y = x[:, : args.outputs] + 0.1 * torch.randn(args.samples, args.outputs, generator=g)
    moments = Moments(dim, args.outputs)
    moments.update(x, y)
    start = time.perf_counter()
    counts, _ = elimination_path([(moments, 1.0)], KERNEL, args.keep)
    seconds = time.perf_counter() - start
    print(f"elimination of {dim} features ({args.channels} channels x {KERNEL}) down to {counts[-1]} channels "
          f"in {len(counts) - 1} steps: {seconds:.2f} s (1 thread)")


if __name__ == "__main__":
    main()
