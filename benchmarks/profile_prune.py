"""Where one prune spends its time and memory: chanprune's default recipe on a library model under cProfile.

The model is prepared as the generality sweep prepares it (random weights, BatchNorm statistics
re-estimated on crops of real photos); the prune time is given as a ratio to one forward pass of
the calibration images in the same run, with the process's peak resident memory (the model, its
preparation and the timed forward pass included), then the functions with the most cumulative time.

    OMP_NUM_THREADS=1 python -m benchmarks.profile_prune --model torchvision:densenet121 --size 96 --images 32
    OMP_NUM_THREADS=1 python -m benchmarks.profile_prune --model timm:inception_resnet_v2 --size 299 \
        --images 64 --speedup 4 --memory-budget 2048 --top 0
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import resource
import time
import warnings

import torch

from benchmarks.generality import SweepConfig, prepared_model
from chanprune.pruner import prune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="torchvision:densenet121", help="torchvision:NAME or timm:NAME")
    parser.add_argument("--size", type=int, default=96, help="input side in pixels")
    parser.add_argument("--images", type=int, default=32, help="calibration images")
    parser.add_argument("--speedup", type=float, default=2.0)
    parser.add_argument("--memory-budget", type=int, default=None,
                        help="MiB of carried activations kept in memory (default: half the free memory)")
    parser.add_argument("--top", type=int, default=25, help="functions listed")
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    model, images = prepared_model(args.model, SweepConfig(input_size=args.size, images=args.images))
    with torch.no_grad():
        start = time.perf_counter()
        model(images)
        forward = time.perf_counter() - start
    budget = None if args.memory_budget is None else args.memory_budget * 2**20
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    prune(model, images, args.speedup, progress=False, memory_budget=budget)
    profile.disable()
    seconds = time.perf_counter() - start
    print(f"{args.model} at {args.size}x{args.size}, {args.images} images, {args.speedup:g}x, "
          f"{torch.get_num_threads()} thread(s): prune {seconds / forward:.1f}x one forward pass, "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")
    if args.top:
        pstats.Stats(profile).sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
