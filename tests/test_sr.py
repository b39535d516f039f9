"""The super-resolution task: photographs split by photo, bicubic degradation, PSNR/SSIM scoring,
training that keeps its best validation step, and the bundled x2 model through the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from chanprune.cli import main
from chanprune.io.state_file import load_state_file
from chanprune.models import BUNDLED, create_model
from chanprune.models.srresnet import MSRResNet
from chanprune.photos import SKIMAGE_GREY_PHOTOS, downscale, photo_split, upscale_bicubic
from chanprune.sr import SRConfig, low_res_patches, score, train_sr

pytest.importorskip("skimage")


@pytest.fixture(scope="module")
def split():
    return photo_split()


def test_photos_are_split_by_photo_and_scored_on_colour_photos_only(split):
    names = [[p.name for p in part] for part in (split.train, split.val, split.test)]
    assert len(names[1]) == 2 and len(names[2]) == 3
    assert len(set().union(*map(set, names))) == sum(map(len, names))  # no photo in two parts
    assert not set(SKIMAGE_GREY_PHOTOS) & (set(names[1]) | set(names[2]))
    assert [p.name for p in photo_split().test] == names[2]  # fixed
    for photo in split.test:
        assert photo.pixels.shape[0] == 3 and 0.0 <= float(photo.pixels.min()) and float(photo.pixels.max()) <= 1.0


def test_patches_are_seeded_and_downscaled_by_the_scale(split):
    a, b = (low_res_patches(split.train, 5, 64, 2, seed=3) for _ in range(2))
    assert a.shape == (5, 3, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a, low_res_patches(split.train, 5, 64, 2, seed=4))
    hr = torch.rand(1, 3, 16, 16)
    assert downscale(hr, 2).shape == (1, 3, 8, 8) and upscale_bicubic(downscale(hr, 2), 2).shape == hr.shape


class Bicubic(nn.Module):
    def forward(self, x):
        return upscale_bicubic(x, 2)


def test_a_model_that_upsamples_bicubically_scores_as_bicubic(split):
    baseline, same = score(None, split.val, 2), score(Bicubic(), split.val, 2)
    assert same == baseline and 20.0 < baseline.psnr < 50.0 and 0.5 < baseline.ssim <= 1.0
    blurred = score(nn.Upsample(scale_factor=2, mode="nearest"), split.val, 2)
    assert blurred.psnr < baseline.psnr and blurred.ssim < baseline.ssim


def test_training_keeps_its_best_validation_step(split):
    model = MSRResNet(width=4, blocks=1)
    before = score(model, split.val, 2).psnr
    result = train_sr(model, split, SRConfig(steps=4, batch_size=2, patch=16, lr=0.5, warmup_steps=1, eval_every=2),
                      progress=False, keep_best=True)
    assert result["val_psnr"] >= before and result["best_step"] in (0, 2, 4)
    assert score(model, split.val, 2).psnr == pytest.approx(result["val_psnr"])


def test_the_cli_trains_the_bundled_sr_model(tmp_path, split):
    out = tmp_path / "sr.safetensors"
    result = CliRunner().invoke(main, ["train", "--model", "msrresnet-photos", "--steps", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "test PSNR" in result.output and "bicubic" in result.output
    state, meta = load_state_file(out)
    assert meta["command"].startswith("chanprune train --model msrresnet-photos --steps 2 ")
    assert meta["recipe"]["steps"] == 2 and set(state) == set(BUNDLED["msrresnet-photos"].build().state_dict())


def test_the_bundled_sr_model_beats_bicubic_by_a_decibel(split):
    model = create_model("msrresnet-photos")
    _, meta = load_state_file(BUNDLED["msrresnet-photos"].checkpoint)
    assert meta["command"].startswith("chanprune train --model msrresnet-photos ")
    assert BUNDLED["msrresnet-photos"].checkpoint.stat().st_size < 10 * 2**20
    assert score(model, split.test, 2).psnr >= score(None, split.test, 2).psnr + 1.0


def test_the_cli_prunes_the_sr_model_on_its_own_patches(tmp_path):
    out = tmp_path / "pruned.safetensors"
    result = CliRunner().invoke(main, ["prune", "--model", "msrresnet-photos", "--speedup", "2", "--calib-images",
                                       "64", "--trunk", "fine", "--out", str(out), "--report",
                                       str(tmp_path / "report.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert out.exists() and abs(report["speedup_achieved"] / 2 - 1) <= 0.02 and report["config"]["trunk"] == "fine"
