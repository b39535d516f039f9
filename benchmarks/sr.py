"""FCP's second experiment: pruning the bundled x2 super-resolution model (msrresnet-photos).

The default recipe with its residual trunks kept (readers still read chosen subsets), pruned
jointly and fine-grained (FCP), and Torch-Pruning's magnitude criteria at matched FLOPs, at 2×
(FCP's 48% of FLOPs removed) and 3×: PSNR and SSIM on the test photographs as pruned and after
the same short fine-tuning (L1 on training patches, the best validation step kept, step 0
included). Calibration: low-resolution patches of the training photographs. Each finished row
is appended to ``rows.jsonl`` at once and a rerun skips it; the table is written when every row
is there.

    python -m benchmarks.sr
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.peers import tp_prune
from chanprune.errors import SparseSamplesWarning
from chanprune.flops import count_flops
from chanprune.models import create_model
from chanprune.photos import photo_split
from chanprune.pruner import prune
from chanprune.sr import SRConfig, low_res_patches, score, train_sr

SPEEDUPS = (2.0, 3.0)
TRUNKS = ("keep", "joint", "fine")
CRITERIA = ("l1", "l2")  # Torch-Pruning's data-free criteria (no BN here, no classification loss)
# Torch-Pruning 1.6.1 indexes past the end of the conv before a pixel shuffle (its r² blocks); that conv
# keeps its outputs in a second set of Torch-Pruning rows, so that the rest of the network is compared
TP_IGNORED = ("upconv",)
TP_TOLERANCE = 0.05  # one uniform ratio for a 32-channel network is coarse: 3.10x is its nearest to 3x
CALIB_IMAGES, CALIB_PATCH, SEED = 500, 64, 0
FINETUNE = SRConfig(steps=300, lr=2e-4, warmup_steps=10, eval_every=50)
OUT = Path("benchmarks/results/sr")


def arms() -> list[tuple[str, float]]:
    """(arm, speed-up) of every row, in the order they run."""
    peers = (*(f"tp-{c}" for c in CRITERIA), *(f"tp-{c}-upconv-kept" for c in CRITERIA))
    return [(arm, s) for s in SPEEDUPS for arm in (*(f"trunk-{t}" for t in TRUNKS), *peers)]


def run_row(arm: str, speedup: float, model: nn.Module, images: torch.Tensor, split: Any) -> dict[str, Any]:
    """Prune one arm, score it as is and fine-tuned."""
    start = time.perf_counter()
    if arm.startswith("trunk-"):
        net, _ = prune(model, images, speedup, trunk=arm.removeprefix("trunk-"), seed=SEED, progress=False)
    else:
        try:
            criterion = arm.removeprefix("tp-").removesuffix("-upconv-kept")
            net, _ = tp_prune(model, criterion, speedup, images, None, tolerance=TP_TOLERANCE,
                              ignored=TP_IGNORED if arm.endswith("-upconv-kept") else ())
        except Exception as err:  # the peer's own failure on this network is a result, recorded as such
            return {"arm": arm, "speedup": speedup, "failed": f"{type(err).__name__}: {err}"}
    seconds = time.perf_counter() - start
    shape = (1, *images.shape[1:])
    row = {"arm": arm, "speedup": speedup, "achieved": count_flops(model, shape) / count_flops(net, shape),
           "seconds": seconds, "as_is": asdict(score(net, split.test, 2))}
    tuned = copy.deepcopy(net)
    chosen = train_sr(tuned, split, FINETUNE, progress=False, keep_best=True)
    row["ft"] = {**asdict(score(tuned, split.test, 2)), "val_psnr": chosen["val_psnr"], "best_step": chosen["best_step"]}
    return row


def table(base: dict[str, Any], bicubic: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """Markdown: PSNR / SSIM as pruned and fine-tuned, and the PSNR drop from the unpruned model."""
    lines = [f"Unpruned: {base['psnr']:.2f} dB / {base['ssim']:.4f}; bicubic upsampling: {bicubic['psnr']:.2f} dB / "
             f"{bicubic['ssim']:.4f} (test photographs, mean over photos).", "",
             "| speed-up | arm | achieved | PSNR as pruned (drop) | SSIM | PSNR fine-tuned (drop) | SSIM |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['speedup']:g}× | {r['arm']} | failed: {r['failed'][:80]} | | | | |")
            continue
        lines.append(f"| {r['speedup']:g}× | {r['arm']} | {r['achieved']:.2f}× | {r['as_is']['psnr']:.2f} "
                     f"({r['as_is']['psnr'] - base['psnr']:+.2f}) | {r['as_is']['ssim']:.4f} | "
                     f"{r['ft']['psnr']:.2f} ({r['ft']['psnr'] - base['psnr']:+.2f}) | {r['ft']['ssim']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=OUT)
    args = parser.parse_args()
    warnings.simplefilter("ignore", SparseSamplesWarning)
    torch.manual_seed(SEED)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows_file = args.out_dir / "rows.jsonl"
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
    split = photo_split()
    model = create_model("msrresnet-photos")
    images = low_res_patches(split.train, CALIB_IMAGES, CALIB_PATCH, 2, SEED)
    for arm, speedup in arms():
        if any(r["arm"] == arm and r["speedup"] == speedup for r in rows):
            continue
        row = run_row(arm, speedup, model, images, split)
        rows.append(row)
        with rows_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{arm} {speedup:g}x: " + (row["failed"] if "failed" in row else
                                          f"({row['achieved']:.2f}x) {row['as_is']['psnr']:.2f} dB, fine-tuned "
                                          f"{row['ft']['psnr']:.2f} dB"), file=sys.stderr, flush=True)
    base, bicubic = asdict(score(model, split.test, 2)), asdict(score(None, split.test, 2))
    order = {key: i for i, key in enumerate(arms())}
    rows.sort(key=lambda r: order[(r["arm"], r["speedup"])])
    (args.out_dir / "results.json").write_text(json.dumps({"unpruned": base, "bicubic": bicubic, "rows": rows},
                                                          indent=2) + "\n")
    (args.out_dir / "report.md").write_text(f"Produced by `python -m benchmarks.sr`. Fine-tuning: {FINETUNE.steps} "
                                            f"steps at lr {FINETUNE.lr}.\n\n" + table(base, bicubic, rows) + "\n")


if __name__ == "__main__":
    main()
