"""Several processes, one prune: which shard of the calibration data this process reads, and who
writes files. Moments are sums, so ranks all-reduce them and then make identical decisions."""

from __future__ import annotations

import os

import torch.distributed as dist


def shard() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when none is running."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_environment() -> None:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment), with gloo on
    CPU-only machines and NCCL where CUDA is available; nothing when run as a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return
    import torch

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def writes_files() -> bool:
    """Whether this process writes outputs (rank 0, or the only process)."""
    return shard()[0] == 0
