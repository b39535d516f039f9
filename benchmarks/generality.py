"""Generality sweep: every torchvision CNN classifier and a broad set of timm CNNs, pruned at 2x and 4x.

Each model is built with random weights (nothing is downloaded) at the input size its weights use
(224, 299, ...; ``--input-size N`` fixes one), its BatchNorm statistics re-estimated on crops of
real photos (scikit-learn's two sample photos), and pruned with chanprune's default recipe on
other crops to each target speed-up, then checked: the pruned forward pass works, the output
shape is unchanged and finite, and the achieved FLOPs ratio is within 5% of the target, or
chanprune said why it could not be done. The prune time is reported as a ratio to one forward
pass of the calibration images through the original model. With ``--peer`` Torch-Pruning's
group-L1 is run on the same model at the same targets. Each model and target runs in a child
process with a time limit, so one hang or memory blow-up does not end the sweep; models with more
parameters than ``--max-params`` are listed as not run (they need the GPU machine: ``--device cuda``).

    OMP_NUM_THREADS=1 python -m benchmarks.generality                       # the whole sweep
    python -m benchmarks.generality --models resnet18,timm:dla --timeout 600  # a subset
    python -m benchmarks.generality --list                                  # the model list

Every finished model is appended to ``<out>.rows.jsonl`` at once and a rerun skips it (``--force``
reruns; models whose rows say ``not run`` are tried again, and ``--retry timeout`` tries the
timed-out ones), so a sweep longer than a session continues where it stopped. Models run smallest
first (by parameters), so a run cut short leaves the most models done. ``<out>.json`` / ``.md`` and,
with ``--docs docs/generality.md``, the table in that page are written from every saved row; the
page's table is only replaced when every model of the list has a row, so a partial run never
overwrites a complete table. torchvision and timm are imported as chanprune imports them
(``chanprune.io.libraries``, with the operator-schema workaround for the CUDA torchvision wheel).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import statistics
import time
import copy
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
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
    "resnet10t", "resnet18", "resnet26", "resnet50", "resnet50d", "resnetv2_50", "resnetaa50", "resnetblur18",
    "resnext50_32x4d", "seresnet18", "seresnet50", "seresnext26d_32x4d", "ecaresnet26t", "gcresnet33ts",
    "skresnet18", "resnest14d", "res2net50_14w_8s", "res2next50", "bat_resnext26ts", "resnetrs50",
    "nf_resnet26", "tresnet_m", "gernet_s",
    # RegNet
    "regnetx_002", "regnety_002", "regnety_004", "regnetz_005", "nf_regnet_b0",
    # EfficientNet / MobileNet / NAS families
    "efficientnet_b0", "tf_efficientnet_b0", "efficientnet_es", "efficientnet_lite0", "efficientnetv2_rw_t",
    "mobilenetv1_100", "mobilenetv2_050", "mobilenetv3_small_050", "mobilenetv3_large_100",
    "mobilenetv4_conv_small", "mnasnet_050", "semnasnet_050", "spnasnet_100", "fbnetc_100", "fbnetv3_b",
    "lcnet_050", "lcnet_100", "hardcorenas_a", "tinynet_e", "mixnet_s", "rexnet_100",
    # Ghost
    "ghostnet_050", "ghostnet_100", "ghostnetv2_100", "repghostnet_050",
    # dense / aggregation / dual path / multi-resolution
    "densenet121", "densenetblur121d", "rdnet_tiny", "dla34", "dla46_c", "dpn68", "hrnet_w18_small",
    "selecsls42b", "selecsls60", "vovnet39a", "ese_vovnet19b_slim_dw", "hgnet_tiny", "hgnetv2_b0",
    # CSP / Darknet
    "cspresnet50", "cspdarknet53", "cs3darknet_s", "cs3sedarknet_l", "darknet53",
    # ConvNeXt and other modern pure-conv designs
    "convnext_atto", "convnextv2_atto", "inception_next_atto", "starnet_s1", "mambaout_femto", "repvit_m0_9",
    "fastvit_t8",
    # Inception / Xception
    "inception_v3", "inception_v4", "inception_resnet_v2", "xception41", "legacy_xception",
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


@dataclass(frozen=True)
class SweepConfig:
    """How every model of the sweep is prepared, pruned and checked."""

    input_size: int | None = None  # None: the size the model's weights use
    images: int = 64
    bn_images: int = 128
    samples_per_image: int | None = None  # None: chanprune's default (what each layer needs)
    speedups: tuple[float, ...] = (2.0, 4.0)
    recipe: str = "default"
    method: str | None = None  # None: the recipe's
    options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    calibration: str = "photos"  # or "random"
    peer: bool = False
    device: str = "cpu"


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


def prepared_images(model: torch.nn.Module, cfg: SweepConfig, size: int) -> torch.Tensor:
    """Calibration images; with real photos the model's BatchNorm statistics are first re-estimated
    on other crops of them, so that random weights see activations shaped like a trained net's."""
    if cfg.calibration == "random":
        return torch.randn(cfg.images, 3, size, size, generator=torch.Generator().manual_seed(cfg.seed))
    from benchmarks.scale import photo_crops
    from chanprune.finetune import reestimate_batchnorm

    reestimate_batchnorm(model, photo_crops(cfg.bn_images, size, cfg.seed + 1).to(cfg.device))
    return photo_crops(cfg.images, size, cfg.seed)


def prepared_model(spec: str, cfg: SweepConfig) -> tuple[torch.nn.Module, torch.Tensor]:
    """The constructor's model with random weights (seeded) on ``cfg.device`` and its calibration
    images (see :func:`prepared_images`) at the size it runs at; the same for chanprune and its peer."""
    import_library("torchvision")
    from chanprune.experiment import constructor_model, default_input_size

    torch.manual_seed(cfg.seed)
    model = constructor_model(spec)
    size = working_input(model, cfg.input_size or default_input_size(spec, model)[0])
    model = model.to(cfg.device)
    return model, prepared_images(model, cfg, size).to(cfg.device)


def forward_seconds(model: torch.nn.Module, images: torch.Tensor, batch: int = 32) -> float:
    """Time of one forward pass of ``images`` (batches of ``batch``, after a warm-up batch)."""
    def synchronize() -> None:
        if images.device.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        model(images[:batch])
        synchronize()
        start = time.perf_counter()
        for i in range(0, len(images), batch):
            model(images[i:i + batch])
        synchronize()
    return time.perf_counter() - start


def unpruned_share(model: torch.nn.Module, example: torch.Tensor) -> float:
    """Share of the model's channels (over every group) that chanprune cannot prune at all."""
    from chanprune.graph import build_graph

    graph = build_graph(model, example, warn=False)
    total = sum(g.channels for g in graph.groups)
    return sum(g.channels for g in graph.groups if not g.prunable) / max(total, 1)


def peer_result(model: torch.nn.Module, images: torch.Tensor, speedup: float) -> dict[str, Any]:
    """Torch-Pruning's group-L1 at ``speedup``: its status and the speed-up it reached."""
    from benchmarks.peers import tp_prune

    try:
        net, reached = tp_prune(copy.deepcopy(model), "l1", speedup, images[:8], None, tolerance=0.05)
        with torch.no_grad():
            ok = tuple(net(images[:2]).shape) == tuple(model(images[:2]).shape)
        return {"status": "ok" if ok else "output shape changed", "speedup": reached}
    except ChanpruneError as err:
        return {"status": "missed target", "error": str(err)}
    except Exception as err:  # Torch-Pruning's own failure on this model
        return {"status": "failed", "error": f"{type(err).__name__}: {str(err)[:200]}"}


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


def run_one(spec: str, cfg: SweepConfig) -> list[dict[str, Any]]:
    """Build, prepare, prune (at every target) and check one model, in the calling process."""
    from chanprune import prune

    base: dict[str, Any] = {"model": spec}
    rows: list[dict[str, Any]] = []
    try:
        model, images = prepared_model(spec, cfg)
        base["params"] = sum(p.numel() for p in model.parameters())
        base["input_size"] = images.shape[-1]
        base["forward_seconds"] = forward_seconds(model, images)
        base["unpruned_share"] = unpruned_share(model, images[:1])
    except ChanpruneError as err:  # chanprune says why (a model torch.fx cannot trace): a refusal
        return [{**base, "target": t, "supported": False, "status": "refused", "error": str(err)}
                for t in cfg.speedups]
    except Exception as err:  # a model that does not build or run: every target fails alike
        return [{**base, "target": t, "supported": False, "status": "crashed",
                 "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=-6)}
                for t in cfg.speedups]
    for target in cfg.speedups:
        row: dict[str, Any] = {**base, "target": target, "supported": False, "status": "error"}
        caught: list[warnings.WarningMessage] = []
        start = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    method = {"method": cfg.method} if cfg.method else {}
                    pruned, report = prune(model, images, target, recipe=cfg.recipe, progress=False,
                                           samples_per_image=cfg.samples_per_image, seed=cfg.seed,
                                           device=cfg.device, **method, **cfg.options)
                finally:  # a refusal keeps the warnings that explain it (what stayed unpruned)
                    row["warnings"] = summarise_warnings([str(w.message) for w in caught])
            row["prune_seconds"] = time.perf_counter() - start
            row["time_ratio"] = row["prune_seconds"] / base["forward_seconds"]
            row.update(flops_before=report.flops_before, flops_after=report.flops_after,
                       params_after=report.params_after, speedup=report.flops_before / report.flops_after)
            with torch.no_grad():
                before, after = model(images[:16]), pruned(images[:16])
            row["shape_ok"] = tuple(before.shape) == tuple(after.shape)
            row["finite"] = bool(torch.isfinite(after).all())
            row["logit_rel_error"] = float((after - before).norm() / before.norm().clamp_min(1e-12))
            row["within_5pct"] = abs(row["speedup"] / target - 1) <= 0.05
            row["supported"] = row["shape_ok"] and row["finite"] and row["within_5pct"]
            row["status"] = "ok" if row["supported"] else (
                "output shape changed" if not row["shape_ok"] else
                "non-finite output" if not row["finite"] else "missed target")
        except ChanpruneError as err:
            row["status"], row["error"] = "refused", str(err)
        except Exception as err:  # a bug: keep the traceback for the JSON
            row["status"], row["error"] = "crashed", f"{type(err).__name__}: {err}"
            row["traceback"] = traceback.format_exc(limit=-6)
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
    return rows


def run_peer(spec: str, cfg: SweepConfig) -> list[dict[str, Any]]:
    """Torch-Pruning's group-L1 on the same model, prepared the same way, at every target."""
    model, images = prepared_model(spec, replace(cfg, device="cpu"))
    return [{"model": spec, "target": t, "peer": peer_result(model, images, t)} for t in cfg.speedups]


Job = Callable[[str, SweepConfig], list[dict[str, Any]]]


def _child(conn, job: Job, spec: str, cfg: SweepConfig) -> None:
    try:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        conn.send(job(spec, cfg))
    except BaseException as err:  # MemoryError and the like: report rather than die silently
        conn.send([{"model": spec, "target": t, "supported": False, "status": "crashed",
                    "error": f"{type(err).__name__}: {err}"} for t in cfg.speedups])
    finally:
        conn.close()


def run_isolated(job: Job, spec: str, cfg: SweepConfig, timeout: float) -> list[dict[str, Any]]:
    """``job`` (:func:`run_one` or :func:`run_peer`) in a child process, stopped after ``timeout`` seconds."""
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    start = time.perf_counter()
    proc = ctx.Process(target=_child, args=(send, job, spec, cfg), daemon=True)
    proc.start()
    send.close()
    rows = None
    if recv.poll(timeout):
        try:
            rows = recv.recv()
        except EOFError:
            rows = None
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if rows is None:
        seconds = time.perf_counter() - start
        if seconds >= timeout:
            status, error = "timeout", f"stopped after the {timeout:.0f} s limit"
        else:
            status, error = "crashed", f"the worker process died (exit code {proc.exitcode}; out of memory?)"
        rows = [{"model": spec, "target": t, "supported": False, "status": status, "error": error,
                 "seconds": seconds} for t in cfg.speedups]
    return rows


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


def markdown_table(rows: list[dict[str, Any]], peer: bool) -> str:
    """One line per (model, target); with ``peer``, Torch-Pruning's group-L1 beside it."""
    head = "| model | target | status | achieved | time / forward | input | unprunable channels | logit error |"
    head += " Torch-Pruning (L1) |" if peer else ""
    lines = [head + " note |", "|" + "---|" * (head.count("|"))]
    for row in rows:
        speed = f"{row['speedup']:.2f}x" if "speedup" in row else "–"
        ratio = f"{row['time_ratio']:.0f}" if "time_ratio" in row else "–"
        size = f"{row['input_size']}²" if "input_size" in row else "–"
        error = f"{row['logit_rel_error']:.3f}" if "logit_rel_error" in row else "–"
        share = f"{100 * row['unpruned_share']:.0f}%" if "unpruned_share" in row else "–"
        status = "ok" if row["supported"] else row["status"]
        line = f"| `{row['model']}` | {row['target']:g}x | {status} | {speed} | {ratio} | {size} | {share} | {error} |"
        if peer:
            tp = row.get("peer") or {}
            line += f" {tp.get('status', '–')}" + (f" {tp['speedup']:.2f}x" if "speedup" in tp else "") + " |"
        lines.append(f"{line} {note(row)} |")
    lines.append("")
    lines += [summary(rows, target, peer) for target in sorted({r["target"] for r in rows})]
    return "\n".join(lines) + "\n"


def summary(rows: list[dict[str, Any]], target: float, peer: bool) -> str:
    """The sentence under the table for one target: how many models are ok (of all, and of those
    run), the other statuses, the prune time over a forward pass, and Torch-Pruning's statuses."""
    at = [r for r in rows if r["target"] == target]
    run = [r for r in at if r["status"] != "not run"]
    ok = sum(r["supported"] for r in at)
    others = Counter(r["status"] for r in at if not r["supported"])
    text = (f"At {target:g}x: {ok} of {len(at)} models ok (forward pass works, output shape unchanged and "
            f"finite, FLOPs ratio within 5% of the target), {ok} of the {len(run)} run "
            f"({100 * ok / max(len(run), 1):.1f}%)")
    if others:
        text += "; " + ", ".join(f"{n} {status}" for status, n in sorted(others.items()))
    ratios = sorted(r["time_ratio"] for r in at if "time_ratio" in r)
    if ratios:
        text += f"; prune time {statistics.median(ratios):.1f}x a forward pass at the median, {ratios[-1]:.0f}x at most"
    if peer:
        statuses = Counter((r.get("peer") or {}).get("status", "–") for r in run)
        text += "; Torch-Pruning on the same models: " + ", ".join(
            f"{n} {status}" for status, n in sorted(statuses.items(), key=lambda item: -item[1]))
    return text + "."


START, END = "<!-- generality-table:start -->", "<!-- generality-table:end -->"


def update_docs(path: Path, table: str, header: str) -> None:
    """Replace the text between the table markers of ``path``."""
    text = path.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{path} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n{header}\n\n{table}{END}{tail}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None,
                        help="comma-separated substrings of the specs to run (e.g. resnet,timm:dla)")
    parser.add_argument("--source", choices=["all", "torchvision", "timm"], default="all")
    parser.add_argument("--input-size", default="native",
                        help="'native' (the size the model's weights use) or a square side in pixels")
    parser.add_argument("--images", type=int, default=64, help="calibration images")
    parser.add_argument("--bn-images", type=int, default=128, help="photo crops the BatchNorm statistics are "
                        "re-estimated on (other crops than the calibration images)")
    parser.add_argument("--calibration", choices=["photos", "random"], default="photos")
    parser.add_argument("--samples-per-image", type=int, default=None, help="default: what each layer needs")
    parser.add_argument("--speedups", default="2,4", help="comma-separated targets")
    parser.add_argument("--recipe", default="default", choices=["default", "paper"])
    parser.add_argument("--method", default=None, help="selection method (default: the recipe's)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="extra PruneConfig field (JSON value), e.g. --option trunk='\"joint\"'")
    parser.add_argument("--peer", action="store_true", help="also Torch-Pruning's group-L1 at the same targets")
    parser.add_argument("--device", default="cpu", help="where each model is pruned (cuda on the GPU machine)")
    parser.add_argument("--max-params", type=float, default=60e6,
                        help="larger models are listed as not run (they need the GPU machine)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per model and target (child process)")
    parser.add_argument("--in-process", action="store_true", help="no child processes (debugging; no time limit)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/generality"),
                        help="output path without suffix: .rows.jsonl (every finished model), .json and .md")
    parser.add_argument("--force", action="store_true", help="rerun models that already have rows")
    parser.add_argument("--retry", default="not run",
                        help="comma-separated statuses whose models are run again (e.g. 'not run,timeout')")
    parser.add_argument("--docs", type=Path, default=None, help="also replace the table in this markdown page")
    parser.add_argument("--list", action="store_true", help="print the model specs and exit")
    return parser.parse_args(argv)


def model_params(spec: str) -> int:
    """Parameters of a constructor's model (built on the meta device where its initialisation
    allows: no memory, no weights)."""
    from chanprune.experiment import constructor_model

    try:
        with torch.device("meta"):
            return sum(p.numel() for p in constructor_model(spec).parameters())
    except ChanpruneError:  # an initialisation that copies data (torchvision's RegNet)
        return sum(p.numel() for p in constructor_model(spec).parameters())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    listed = []  # the sweep's whole list; --models runs part of it
    if args.source in ("all", "torchvision"):
        listed += torchvision_models()
    if args.source in ("all", "timm"):
        listed += timm_models()
    models = select(listed, args.models)
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
    cfg = SweepConfig(input_size=None if args.input_size == "native" else int(args.input_size), images=args.images,
                      bn_images=args.bn_images, samples_per_image=args.samples_per_image,
                      speedups=tuple(float(s) for s in args.speedups.split(",")), recipe=args.recipe,
                      method=args.method, options=options, seed=args.seed, calibration=args.calibration,
                      peer=args.peer, device=args.device)

    from tqdm import tqdm

    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows_path = args.out.with_suffix(".rows.jsonl")
    saved = [json.loads(line) for line in rows_path.read_text().splitlines()] if rows_path.exists() else []
    retried = {s.strip() for s in args.retry.split(",")}
    done = {r["model"] for r in saved if r["status"] not in retried}
    params = {m: model_params(m) for m in models if args.force or m not in done}
    bar = tqdm(sorted(params, key=params.get), desc="generality", unit="model")
    for spec in bar:
        bar.set_postfix_str(spec)
        if args.device == "cpu" and params[spec] > args.max_params:
            rows = [{"model": spec, "target": t, "supported": False, "status": "not run",
                     "error": f"over {args.max_params / 1e6:g}M parameters: run it with --device cuda"}
                    for t in cfg.speedups]
        else:
            rows = []
            for target in cfg.speedups:  # a child and a time limit per target: 4x does not eat 2x's time
                one = replace(cfg, speedups=(target,))
                rows += run_one(spec, one) if args.in_process else run_isolated(run_one, spec, one, args.timeout)
                if cfg.peer:  # in a child of its own: a slow peer never costs chanprune its row
                    peer = (run_peer(spec, one) if args.in_process else
                            run_isolated(run_peer, spec, one, args.timeout))[0]
                    rows[-1]["peer"] = peer.get("peer") or {"status": peer["status"], "error": peer.get("error")}
        saved = [r for r in saved if r["model"] != spec] + rows
        with rows_path.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        for row in rows:
            tqdm.write(f"{spec:40s} {row['target']:g}x {row['status']:14s} {row.get('speedup', float('nan')):6.2f}x "
                       f"{row.get('seconds', 0):7.1f}s  {note(row, 100)}")

    latest = {(r["model"], r["target"]): r for r in saved}  # a forced rerun's rows replace earlier ones
    rows = sorted(latest.values(), key=lambda r: (r["model"], r["target"]))
    config = {**asdict(cfg), "timeout": args.timeout, "torch": torch.__version__,
              "threads": int(os.environ["OMP_NUM_THREADS"])}
    try:
        config.update(torchvision=import_library("torchvision").__version__, timm=import_library("timm").__version__)
    except ChanpruneError:
        pass
    args.out.with_suffix(".json").write_text(json.dumps({"config": config, "rows": rows}, indent=2))
    table = markdown_table(rows, cfg.peer)
    size = "the input size of each model's weights" if cfg.input_size is None else f"{cfg.input_size}x{cfg.input_size}"
    header = (f"chanprune's `{cfg.recipe}` recipe at {', '.join(f'{t:g}x' for t in cfg.speedups)}, {cfg.images} "
              f"calibration images ({'crops of real photos, BatchNorm statistics re-estimated on other crops' if cfg.calibration == 'photos' else 'random'}) "
              f"at {size}, random weights; time / forward: prune time over one forward pass of the calibration "
              f"images; torch {config['torch']}, torchvision {config.get('torchvision', '?')}, timm "
              f"{config.get('timm', '?')}, {config['threads']} CPU thread(s) on {cfg.device}.")
    every = set(listed)
    missing = len(every - {m for m, _ in latest})  # of the whole list, whatever --models ran
    complete = missing == 0
    partial = "" if complete else (f"\n\nPartial: {missing} of the {len(every)} models of the list have no row yet; "
                                   "the same command continues the sweep.")
    args.out.with_suffix(".md").write_text(f"{header}\n\n{table}{partial}")
    if args.docs is not None and complete:
        update_docs(args.docs, table, header)
    elif args.docs is not None:
        print(f"{missing} models have no row yet: {args.docs} keeps its table")
    print(f"{sum(r['supported'] for r in rows)}/{len(rows)} ok -> {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
