"""Generality sweep: every torchvision CNN classifier and a broad set of timm CNNs, pruned at 2x.

Each model is built with random weights (nothing is downloaded), pruned with ``lasso`` to the
target speed-up on a handful of random calibration images at a small input size, and checked:
the pruned forward pass works, the output shape is unchanged, and the achieved FLOPs ratio is
within 5% of the target, or chanprune said why it could not be done. Each model runs in a child
process with a time limit, so one hang or memory blow-up does not end the sweep.

    OMP_NUM_THREADS=1 python -m benchmarks.generality                       # the whole sweep
    python -m benchmarks.generality --models resnet18,timm:dla --timeout 120  # a subset
    python -m benchmarks.generality --list                                  # the model list

Writes ``benchmarks/results/generality.json`` and ``.md`` and, with ``--docs docs/generality.md``,
replaces the results table in that page. torchvision and timm are imported as chanprune imports
them (``chanprune.io.libraries``, with the operator-schema workaround for the CUDA torchvision wheel).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from chanprune.errors import ChanpruneError
from chanprune.io.libraries import import_library

# Transformer families: out of scope (the issue covers CNNs).
TORCHVISION_EXCLUDED = ("vit_", "swin_", "maxvit_")

# A broad set of timm CNN families, small members where a family has several (all build offline).
TIMM_MODELS = [
    # ResNet and relatives
    "resnet18", "resnet26", "resnet50", "resnet50d", "resnext50_32x4d", "seresnet18", "seresnet50",
    "skresnet18", "resnest14d", "res2net50_14w_8s", "resnetrs50", "nf_resnet26", "tresnet_m", "gernet_s",
    # RegNet
    "regnetx_002", "regnety_002", "regnetz_005",
    # EfficientNet / MobileNet / NAS families
    "efficientnet_b0", "efficientnet_lite0", "efficientnetv2_rw_t", "mobilenetv2_050", "mobilenetv3_small_050",
    "mobilenetv3_large_100", "mobilenetv4_conv_small", "mnasnet_050", "semnasnet_050", "spnasnet_100",
    "fbnetc_100", "lcnet_050", "hardcorenas_a", "tinynet_e", "mixnet_s", "rexnet_100",
    # Ghost
    "ghostnet_050", "ghostnetv2_100", "repghostnet_050",
    # dense / aggregation / dual path / multi-resolution
    "densenet121", "dla34", "dla46_c", "dpn68", "hrnet_w18_small", "selecsls42b", "ese_vovnet19b_slim_dw",
    "hgnet_tiny", "hgnetv2_b0",
    # CSP / Darknet
    "cspresnet50", "cspdarknet53", "cs3darknet_s", "darknet53",
    # ConvNeXt
    "convnext_atto", "convnextv2_atto",
    # Inception / Xception
    "inception_v3", "inception_v4", "xception41", "legacy_xception",
    # plain and re-parameterisable
    "vgg11", "repvgg_a0", "mobileone_s0",
]

# Input sizes tried, smallest first, when a model rejects the requested one (inception needs 75+).
FALLBACK_SIZES = (75, 96, 128, 160, 224, 299)

UNPRUNED = re.compile(r"channels of (?P<layer>\S+) stay unpruned: (?P<reason>.*)")


def torchvision_models() -> list[str]:
    """Every torchvision classification constructor except the transformer families."""
    torchvision = import_library("torchvision")
    names = torchvision.models.list_models(module=torchvision.models)
    return [f"torchvision:{n}" for n in names if not n.startswith(TORCHVISION_EXCLUDED)]


def timm_models() -> list[str]:
    try:
        timm = import_library("timm")
    except ChanpruneError:  # timm not installed: the sweep covers torchvision alone
        return []
    return [f"timm:{n}" for n in TIMM_MODELS if timm.is_model(n)]


def select(models: list[str], patterns: str | None) -> list[str]:
    """Models whose spec contains any of the comma-separated substrings (all when None)."""
    if not patterns:
        return models
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    return [m for m in models if any(p in m for p in wanted)]


def working_input(model: torch.nn.Module, size: int) -> int:
    """The requested input size, or the smallest fallback size the model's forward pass accepts."""
    last: Exception | None = None
    for s in (size, *[f for f in FALLBACK_SIZES if f > size]):
        try:
            with torch.no_grad():
                model(torch.randn(1, 3, s, s))
            return s
        except Exception as err:  # too small for a kernel or a pooling window
            last = err
    raise RuntimeError(f"no input size up to {FALLBACK_SIZES[-1]} works ({type(last).__name__}: {last})")


def reason_kind(reason: str) -> str:
    """One reason per kind of operator: without node numbers, layer names and group counts.

    ``"blocks.0.conv_dw is a grouped conv (16 groups); batch_norm_1 (batch_norm) is not supported"``
    becomes ``"<layer> is a grouped conv; batch_norm is not supported"``.
    """
    reason = re.sub(r"\b\w+ \((\w+)\)", r"\1", reason)  # "cat_3 (cat)" -> "cat"
    reason = re.sub(r"\b\w+(?:\.[\w-]+)+\b", "<layer>", reason)  # dotted module names
    reason = re.sub(r"\b([A-Za-z_]+?)_\d+\b", r"\1", reason)  # fx node names: add_3 -> add
    return re.sub(r" \(\d+ groups\)", "", reason)


def summarise_warnings(messages: list[str]) -> dict[str, Any]:
    """Counts of channels left unpruned per reason, and the other warnings (deduplicated)."""
    reasons: Counter[str] = Counter()
    layers = []
    other: list[str] = []
    for text in messages:
        match = UNPRUNED.match(text)
        if match:
            reasons[reason_kind(match["reason"])] += 1
            layers.append(match["layer"])
        elif text not in other:
            other.append(text)
    return {"unpruned": dict(reasons), "unpruned_layers": layers, "other": other}


def run_one(spec: str, size: int, n_images: int, samples_per_image: int, speedup: float, method: str,
            options: dict[str, Any], seed: int) -> dict[str, Any]:
    """Build, prune and check one model (in the calling process)."""
    torch.set_num_threads(1)
    import_library("torchvision")
    from chanprune import prune
    from chanprune.experiment import constructor_model

    row: dict[str, Any] = {"model": spec, "target": speedup, "supported": False, "status": "error"}
    start = time.perf_counter()
    caught: list[warnings.WarningMessage] = []
    try:
        torch.manual_seed(seed)
        model = constructor_model(spec)
        row["params"] = sum(p.numel() for p in model.parameters())
        size = working_input(model, size)
        row["input_size"] = size
        images = torch.randn(n_images, 3, size, size, generator=torch.Generator().manual_seed(seed))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prune_start = time.perf_counter()
            try:
                pruned, report = prune(model, images, speedup, method, recipe="paper", progress=False,
                                       samples_per_image=samples_per_image, seed=seed, **options)
            finally:  # a refusal keeps the warnings that explain it (what stayed unpruned)
                row["warnings"] = summarise_warnings([str(w.message) for w in caught])
            row["prune_seconds"] = time.perf_counter() - prune_start
        row.update(flops_before=report.flops_before, flops_after=report.flops_after,
                   params_after=report.params_after, speedup=report.flops_before / report.flops_after)
        with torch.no_grad():
            before, after = model(images), pruned(images)
        row["shape_ok"] = tuple(before.shape) == tuple(after.shape)
        row["finite"] = bool(torch.isfinite(after).all())
        row["logit_rel_error"] = float((after - before).norm() / before.norm().clamp_min(1e-12))
        row["within_5pct"] = abs(row["speedup"] / speedup - 1) <= 0.05
        row["supported"] = row["shape_ok"] and row["finite"] and row["within_5pct"]
        row["status"] = "ok" if row["supported"] else (
            "output shape changed" if not row["shape_ok"] else
            "non-finite output" if not row["finite"] else "missed target")
    except ChanpruneError as err:
        row["status"], row["error"] = "refused", str(err)
    except Exception as err:  # a bug (or a model that does not build): keep the traceback for the JSON
        row["status"], row["error"] = "crashed", f"{type(err).__name__}: {err}"
        row["traceback"] = traceback.format_exc(limit=-6)
    row["seconds"] = time.perf_counter() - start
    return row


def _child(conn, args) -> None:
    try:
        conn.send(run_one(*args))
    except BaseException as err:  # MemoryError and the like: report rather than die silently
        conn.send({"model": args[0], "supported": False, "status": "crashed", "error": f"{type(err).__name__}: {err}"})
    finally:
        conn.close()


def run_isolated(spec: str, timeout: float, *args: Any) -> dict[str, Any]:
    """:func:`run_one` in a child process, stopped after ``timeout`` seconds."""
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    start = time.perf_counter()
    proc = ctx.Process(target=_child, args=(send, (spec, *args)), daemon=True)
    proc.start()
    send.close()
    row = None
    if recv.poll(timeout):
        try:
            row = recv.recv()
        except EOFError:
            row = None
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if row is None:
        seconds = time.perf_counter() - start
        if seconds >= timeout:
            row = {"model": spec, "supported": False, "status": "timeout",
                   "error": f"stopped after the {timeout:.0f} s limit"}
        else:
            row = {"model": spec, "supported": False, "status": "crashed",
                   "error": f"the worker process died (exit code {proc.exitcode}; out of memory?)"}
        row["seconds"] = seconds
    row.setdefault("target", args[2])
    return row


def note(row: dict[str, Any], width: int = 160) -> str:
    """One line for the table: the refusal or crash, else what stayed unpruned."""
    parts = []
    if row.get("error"):
        parts.append(row["error"])
    if row["status"] == "missed target":
        parts.append(f"{row['speedup']:.2f}x instead of {row['target']:g}x")
    if row["status"] in ("output shape changed", "non-finite output"):
        parts.append(row["status"])
    unpruned = (row.get("warnings") or {}).get("unpruned") or {}
    if unpruned:
        parts.append("unpruned: " + "; ".join(f"{n} x {reason}" for reason, n in unpruned.items()))
    text = "; ".join(parts)
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | supported | achieved speed-up | time (s) | input | note |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        speed = f"{row['speedup']:.2f}x" if "speedup" in row else "–"
        size = f"{row['input_size']}²" if "input_size" in row else "–"
        status = "yes" if row["supported"] else f"no ({row['status']})"
        lines.append(f"| `{row['model']}` | {status} | {speed} | {row.get('seconds', 0):.1f} | {size} | {note(row)} |")
    ok = sum(r["supported"] for r in rows)
    lines.append("")
    lines.append(f"{ok} of {len(rows)} models supported (forward pass works, output shape unchanged, "
                 f"FLOPs ratio within 5% of the target).")
    return "\n".join(lines) + "\n"


START, END = "<!-- generality-table:start -->", "<!-- generality-table:end -->"


def update_docs(path: Path, table: str, header: str) -> None:
    """Replace the text between the table markers of ``path``."""
    text = path.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{path} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n{header}\n\n{table}{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None,
                        help="comma-separated substrings of the specs to run (e.g. resnet,timm:dla)")
    parser.add_argument("--source", choices=["all", "torchvision", "timm"], default="all")
    parser.add_argument("--input-size", type=int, default=64, help="square input side (raised where too small)")
    parser.add_argument("--images", type=int, default=8, help="random calibration images")
    parser.add_argument("--samples-per-image", type=int, default=10)
    parser.add_argument("--speedup", type=float, default=2.0)
    parser.add_argument("--method", default="lasso")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="extra PruneConfig field (JSON value), e.g. --option trunk='\"joint\"'")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per model (child process)")
    parser.add_argument("--in-process", action="store_true", help="no child processes (debugging; no time limit)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/generality"),
                        help="output path without suffix: writes .json and .md")
    parser.add_argument("--docs", type=Path, default=None, help="also replace the table in this markdown page")
    parser.add_argument("--update", action="store_true",
                        help="merge into the existing --out results: rows of models not run now are kept")
    parser.add_argument("--list", action="store_true", help="print the model specs and exit")
    args = parser.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    models = []
    if args.source in ("all", "torchvision"):
        models += torchvision_models()
    if args.source in ("all", "timm"):
        models += timm_models()
    models = select(models, args.models)
    if args.list:
        print("\n".join(models))
        return
    options = {}
    for item in args.option:
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value

    from tqdm import tqdm

    rows = []
    run_args = (args.input_size, args.images, args.samples_per_image, args.speedup, args.method, options, args.seed)
    bar = tqdm(models, desc="generality", unit="model")
    for spec in bar:
        bar.set_postfix_str(spec)
        row = run_one(spec, *run_args) if args.in_process else run_isolated(spec, args.timeout, *run_args)
        rows.append(row)
        tqdm.write(f"{spec:40s} {'yes' if row['supported'] else 'no ':3s} {row['status']:14s} "
                   f"{row.get('speedup', float('nan')):6.2f}x {row.get('seconds', 0):7.1f}s  {note(row, 100)}")

    config = {"input_size": args.input_size, "images": args.images, "samples_per_image": args.samples_per_image,
              "speedup": args.speedup, "method": args.method, "options": options, "seed": args.seed,
              "timeout": args.timeout, "torch": torch.__version__, "torch_threads": 1}
    try:
        import timm
        import torchvision

        config.update(torchvision=torchvision.__version__, timm=timm.__version__)
    except ImportError:
        pass
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out.with_suffix(".json"), args.out.with_suffix(".md")
    if args.update and json_path.exists():  # keep earlier rows of models not rerun now
        rerun = {r["model"] for r in rows}
        earlier = [r for r in json.loads(json_path.read_text())["rows"] if r["model"] not in rerun]
        rows = sorted(earlier + rows, key=lambda r: r["model"])
    json_path.write_text(json.dumps({"config": config, "rows": rows}, indent=2))
    table = markdown_table(rows)
    header = (f"`{args.method}` at {args.speedup:g}x, {args.images} random calibration images of "
              f"{args.input_size}x{args.input_size} (larger where a model needs it), {args.samples_per_image} "
              f"samples per image, random weights; torch {config['torch']}, torchvision "
              f"{config.get('torchvision', '?')}, timm {config.get('timm', '?')}, one CPU thread.")
    md_path.write_text(f"{header}\n\n{table}")
    if args.docs is not None:
        update_docs(args.docs, table, header)
    print(f"{sum(r['supported'] for r in rows)}/{len(rows)} supported -> {json_path}, {md_path}")


if __name__ == "__main__":
    main()
