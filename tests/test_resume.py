"""Surviving a kill: a run killed with SIGKILL and started again with the same arguments ends with
the bytes of an uninterrupted run; a changed model, data or option refuses to resume."""

from __future__ import annotations

import multiprocessing
import os
import signal
import warnings

import pytest
import torch

from chanprune import ChanpruneError, prune
from chanprune.engine.resume import ResumeDir

from conftest import make_tiny, random_images
from test_multibranch import MiniResNet, images as multi_images, make

OPTIONS = dict(samples_per_image=4, trunk="joint", progress=False, batch_size=8)


def _quiet_prune(model, x, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return prune(model, x, 1.8, "greedy", **{**OPTIONS, **options})


def _killed_after(units: int, folder: str) -> None:
    """Prune with a checkpoint folder and SIGKILL this process once ``units`` units are saved."""
    torch.set_num_threads(1)
    real = ResumeDir.save

    def save_then_die(self, record):
        real(self, record)
        if record.index + 1 == units:
            os.kill(os.getpid(), signal.SIGKILL)

    ResumeDir.save = save_then_die
    _quiet_prune(make(MiniResNet), multi_images(40), checkpoint_dir=folder)


def _same_bytes(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].numpy().tobytes() == sb[name].numpy().tobytes(), name


def test_killed_run_resumes_to_the_bytes_of_an_uninterrupted_run(tmp_path):
    folder = tmp_path / "resume"
    child = multiprocessing.get_context("spawn").Process(target=_killed_after, args=(3, str(folder)))
    child.start()
    child.join(300)
    assert child.exitcode == -signal.SIGKILL
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("unit-")) == \
        ["unit-00000.safetensors", "unit-00001.safetensors", "unit-00002.safetensors"]
    uninterrupted, fresh_report = _quiet_prune(make(MiniResNet), multi_images(40))
    resumed, report = _quiet_prune(make(MiniResNet), multi_images(40), checkpoint_dir=folder)
    assert report.resumed_units == 3 and fresh_report.resumed_units == 0
    _same_bytes(resumed, uninterrupted)
    assert [(l.name, l.kept_indices, l.rel_error) for l in report.layers] == \
        [(l.name, l.kept_indices, l.rel_error) for l in fresh_report.layers]
    # all units are saved now: a third run replays every one of them
    again, again_report = _quiet_prune(make(MiniResNet), multi_images(40), checkpoint_dir=folder)
    assert again_report.resumed_units == len([p for p in folder.iterdir() if p.name.startswith("unit-")])
    _same_bytes(again, uninterrupted)


@pytest.mark.parametrize("change, message", [
    ({"seed": 1}, "option seed changed (0 -> 1)"),
    ({"method": "lasso"}, "option method changed ('greedy' -> 'lasso')"),
    ({"images": 7}, "the calibration data changed"),
    ({"model": 5}, "the model's weights changed"),
])
def test_a_changed_run_refuses_to_resume_naming_what_changed(tmp_path, change, message):
    folder = tmp_path / "resume"
    _quiet_prune(make_tiny(0), random_images(40), checkpoint_dir=folder)
    model = make_tiny(change.get("model", 0))
    x = random_images(40, seed=change.get("images", 0)) if "images" in change else random_images(40)
    method = change.get("method", "greedy")
    options = {k: v for k, v in change.items() if k == "seed"}
    with warnings.catch_warnings(), pytest.raises(ChanpruneError) as err:
        warnings.simplefilter("ignore", UserWarning)
        prune(model, x, 1.8, method, checkpoint_dir=folder, **{**OPTIONS, **options})
    assert message in str(err.value) and "--resume-dir" in str(err.value)


def test_same_seed_twice_gives_identical_bytes_and_kept_channels():
    a, rep_a = _quiet_prune(make_tiny(0), random_images(40))
    b, rep_b = _quiet_prune(make_tiny(0), random_images(40))
    _same_bytes(a, b)
    assert [l.kept_indices for l in rep_a.layers] == [l.kept_indices for l in rep_b.layers]
