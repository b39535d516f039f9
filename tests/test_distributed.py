"""Two gloo processes on CPU prune like one: each reads half the batches, moments are summed."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from chanprune import prune
from chanprune.io.provenance import provenance

from conftest import make_tiny, random_images


def _join(rank: int, world: int, out: str, name: str) -> None:
    """Join a gloo group through a file in the test's folder (no TCP port to collide on)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/{name}.store", rank=rank, world_size=world)


def _case(case: str) -> tuple[torch.nn.Module, torch.Tensor, dict]:
    """The model, images and options of a case: the tiny net with the default recipe, or a
    residual net with fine-grained trunks (channel selects, trunk writers' curves and scatters)."""
    if case == "fine":
        from test_multibranch import MiniResNet, images, make

        return make(MiniResNet), images(), {"trunk": "fine", "round_to": 1}
    return make_tiny(0), random_images(96), {}


def _prune(case: str) -> tuple[torch.nn.Module, object]:
    model, x, options = _case(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return prune(model, x, 1.6, samples_per_image=4, batch_size=16, progress=False, **options)


def _rank(rank: int, world: int, out: str, case: str) -> None:
    _join(rank, world, out, "prune")
    try:
        pruned, report = _prune(case)
        torch.save({"state": pruned.state_dict(), "plan": [op.to_json() for op in provenance(pruned).plan],
                    "images": report.calibration_images}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", ["tiny", "fine"])
def test_two_gloo_processes_give_the_model_of_one(tmp_path, case):
    single, report = _prune(case)
    mp.spawn(_rank, args=(2, str(tmp_path), case), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    expected_plan = [op.to_json() for op in provenance(single).plan]
    for result in results:
        assert result["plan"] == expected_plan  # the same kept channels everywhere
        assert result["images"] == report.calibration_images
        for name, value in single.state_dict().items():
            torch.testing.assert_close(result["state"][name], value, rtol=0, atol=1e-6, msg=name)
    for name in single.state_dict():  # and the ranks agree with each other exactly
        assert torch.equal(results[0]["state"][name], results[1]["state"][name]), name


def _finetune_rank(rank: int, world: int, out: str) -> None:
    from chanprune.data import Split
    from chanprune.finetune import finetune
    from chanprune.train import TrainConfig

    _join(rank, world, out, "finetune")
    try:
        model = make_tiny(0)
        g = torch.Generator().manual_seed(0)
        split = Split(random_images(64), torch.randint(0, 5, (64,), generator=g))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        finetune(model, split, split, TrainConfig(epochs=2, lr=0.05, batch_size=16, shift=0), progress=False)
        torch.save({"before": before, "after": model.state_dict()}, f"{out}/ft{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_finetuning_under_ddp_keeps_the_ranks_in_step(tmp_path):
    mp.spawn(_finetune_rank, args=(2, str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"ft{r}.pt", weights_only=True) for r in range(2))
    changed = [k for k in a["after"] if a["after"][k].is_floating_point()
               and not torch.equal(a["after"][k], a["before"][k])]
    assert "conv1.weight" in changed and "fc2.weight" in changed  # it trained
    for name, value in a["after"].items():
        if value.is_floating_point() and "running" not in name:  # DDP keeps replicas identical
            torch.testing.assert_close(value, b["after"][name], rtol=0, atol=1e-6, msg=name)
