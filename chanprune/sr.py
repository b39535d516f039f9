"""Super-resolution: training on patches of the bundled photographs, and scoring by PSNR and SSIM
against bicubic upsampling (:mod:`chanprune.photos`)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .evaluate import model_device
from .extras import require
from .photos import EVAL_CROP, Photo, PhotoSplit, centre_crop, downscale, random_patches, upscale_bicubic


@dataclass
class SRConfig:
    """Recipe of a super-resolution training run (L1 loss, Adam, warm-up then cosine decay)."""

    steps: int = 3000
    batch_size: int = 16
    patch: int = 48  # high-resolution patch side; the model sees patch / scale
    lr: float = 1e-3
    warmup_steps: int = 100
    scale: int = 2
    seed: int = 0
    eval_every: int = 500  # steps between validation scores (for keep_best)


@dataclass(frozen=True)
class SRScore:
    """Mean PSNR (dB) and SSIM over photos, borders of ``scale`` pixels excluded."""

    psnr: float
    ssim: float


def low_res_patches(photos: list[Photo], count: int, patch: int, scale: int, seed: int) -> torch.Tensor:
    """``count`` low-resolution patches (count, 3, patch/scale, patch/scale): calibration images."""
    hr = random_patches(photos, count, patch, torch.Generator().manual_seed(seed))
    return downscale(hr, scale)


@torch.no_grad()
def score(model: nn.Module | None, photos: list[Photo], scale: int) -> SRScore:
    """PSNR and SSIM of ``model`` (None: bicubic upsampling) on the central crops of ``photos``."""
    metrics = require("skimage.metrics", "sr")
    psnrs, ssims = [], []
    device = model_device(model) if model is not None else torch.device("cpu")
    if model is not None:
        model.eval()
    for photo in photos:
        hr = centre_crop(photo, EVAL_CROP, scale)
        lr = downscale(hr, scale)
        sr = upscale_bicubic(lr, scale) if model is None else model(lr.to(device)).cpu().clamp(0, 1)
        a, b = (t[0, :, scale:-scale, scale:-scale].permute(1, 2, 0).double().numpy() for t in (sr, hr))
        psnrs.append(metrics.peak_signal_noise_ratio(b, a, data_range=1.0))
        ssims.append(metrics.structural_similarity(b, a, data_range=1.0, channel_axis=2))
    return SRScore(float(sum(psnrs) / len(psnrs)), float(sum(ssims) / len(ssims)))


def train_sr(model: nn.Module, split: PhotoSplit, config: SRConfig, progress: bool = True,
             keep_best: bool = False) -> dict[str, float]:
    """Train ``model`` in place on random patches of the training photos; returns the final
    loss and validation PSNR. With ``keep_best`` the model ends with the weights of its best
    validation score (step 0 included), checked every ``eval_every`` steps."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    device = model_device(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return config.lr * (step + 1) / config.warmup_steps
        return 0.5 * config.lr * (1 + math.cos(math.pi * (step - config.warmup_steps) /
                                               max(1, config.steps - config.warmup_steps)))

    best = (score(model, split.val, config.scale).psnr, 0, copy.deepcopy(model.state_dict())) if keep_best else None
    loss_value = float("nan")
    for step in tqdm(range(config.steps), desc="train", disable=not progress):
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        hr = random_patches(split.train, config.batch_size, config.patch, generator)
        lr_images = downscale(hr, config.scale)
        loss = nn.functional.l1_loss(model(lr_images.to(device)), hr.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = float(loss.detach())
        if best is not None and ((step + 1) % config.eval_every == 0 or step + 1 == config.steps):
            psnr = score(model, split.val, config.scale).psnr
            if psnr > best[0]:
                best = (psnr, step + 1, copy.deepcopy(model.state_dict()))
    model.eval()
    if best is None:
        return {"train_loss": loss_value, "val_psnr": score(model, split.val, config.scale).psnr}
    model.load_state_dict(best[2])
    return {"train_loss": loss_value, "val_psnr": best[0], "best_step": best[1]}
