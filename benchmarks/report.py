"""Markdown tables, target checks and PNG plots of the suite's results (benchmarks/run.py).

Accuracy is test-split top-1 in percent, as mean ± standard deviation over calibration seeds;
validation accuracy is kept in the JSON. Reads whatever results files the out-dir holds, so a
section rerun alone refreshes the report.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.accuracy import ALLOCATION_ARMS, DEFAULT_ARM, RESIDUAL_ARMS, TABLE1_METHODS  # noqa: E402
from benchmarks.allocation import PRESET  # noqa: E402
from benchmarks.latency import table as latency_table  # noqa: E402
from benchmarks.summary import mean_sd  # noqa: E402

STAGES = {"as_is": "as is", "bn": "BN re-estimated", "ft": "fine-tuned"}
ALLOCATION_LABELS = {"uniform": "uniform", "preset": "preset", "default": "global"}
TRUNK_LABELS = {"trunk-keep": "keep", "default": "joint", "trunk-fine": "fine"}
LABELS = {"default": "chanprune default recipe", "lasso": "lasso (chanprune, the paper)", "max_response": "max response (filter pruning, Li et al.)",
          "first_k": "first k", "scratch": "trained from scratch", "plain": "plain (paper, trunk kept)",
          "enhanced": "enhanced (paper: residual correction + sampling)", "joint": "joint trunk (chanprune)",
          "tp-l1": "Torch-Pruning L1", "tp-l2": "Torch-Pruning L2", "tp-bn_scale": "Torch-Pruning BN scale",
          "tp-taylor": "Torch-Pruning Taylor"}


def accs(rows: list[dict], stage: str) -> list[float]:
    return [100 * r[stage]["test_acc"] for r in rows if r[stage] is not None]


def select(arms: list[dict], **match: Any) -> list[dict]:
    return [r for r in arms if all(r[k] == v for k, v in match.items())]


def base_acc(arms: list[dict], model: str) -> float:
    return 100 * select(arms, model=model)[0]["base"]["test_acc"]


def table1(arms: list[dict], model: str) -> str:
    """The paper's Table 1: increase of test error (points) without / with fine-tuning."""
    rows = select(arms, model=model)
    speedups = sorted({r["speedup"] for r in rows if r["arm"] == "first_k"})
    base = base_acc(arms, model)
    head = " | ".join(f"{s:g}× {what}" for s in speedups for what in ("no FT", "FT"))
    lines = [f"| method | {head} |", "|---|" + "---|" * 2 * len(speedups)]
    for arm in (*TABLE1_METHODS, "scratch"):
        cells = []
        for s in speedups:
            sel = select(rows, arm=arm, speedup=s)
            for stage in ("as_is", "ft"):
                cells.append(mean_sd([base - a for a in accs(sel, stage)], "+.2f"))
        lines.append(f"| {LABELS[arm]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stage_table(arms: list[dict], arm_names: tuple[str, ...], speedups: set[float] | None = None) -> str:
    """Accuracy as is / BN re-estimated / fine-tuned per (model, speed-up, arm)."""
    lines = ["| model | speed-up | method | achieved | as is | BN re-estimated | fine-tuned (epochs) |",
             "|---|---|---|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in arms):
        for s in sorted({r["speedup"] for r in select(arms, model=model)}):
            if speedups is not None and s not in speedups:
                continue
            for arm in arm_names:
                sel = select(arms, model=model, arm=arm, speedup=s)
                if not sel:
                    continue
                achieved = statistics.mean(r["achieved"] for r in sel)
                epochs = sel[0]["ft"]["epochs"]
                lines.append(f"| {model} ({base_acc(arms, model):.1f}) | {s:g}× | {LABELS.get(arm, arm)} | "
                             f"{achieved:.2f}× | {mean_sd(accs(sel, 'as_is'))} | {mean_sd(accs(sel, 'bn'))} | "
                             f"{mean_sd(accs(sel, 'ft'))} ({epochs}) |")
    return "\n".join(lines)


def comparison_table(arms: list[dict], refused: list[dict], labels: dict[str, str]) -> str:
    """Arms side by side (``labels``: arm -> column label): test logit error and accuracy as is,
    and accuracy fine-tuned, per (model, speed-up) where the first arm ran, with the calibration
    seeds the first arm's rows come from (a suite still running has fewer for some rows)."""
    head = " | ".join(f"{label} {what}" for label in labels.values() for what in ("logit error", "acc.", "FT acc."))
    lines = [f"| model | speed-up | {head} |", "|---|---|" + "---|" * 3 * len(labels)]
    first = next(iter(labels))
    for model in dict.fromkeys(r["model"] for r in select(arms, arm=first)):
        for s in sorted({r["speedup"] for r in select(arms, model=model, arm=first)}):
            cells = []
            for arm in labels:
                sel = select(arms, model=model, arm=arm, speedup=s)
                if not sel:
                    cells += ["refused" if select(refused, model=model, arm=arm, speedup=s) else "–"] * 3
                    continue
                cells += [mean_sd([r["as_is"]["logit_err"] for r in sel], ".4f"), mean_sd(accs(sel, "as_is")),
                          mean_sd(accs(sel, "ft"))]
            seeds = ",".join(str(r["seed"]) for r in sorted(select(arms, model=model, arm=first, speedup=s),
                                                            key=lambda r: r["seed"]))
            lines.append(f"| {model} ({base_acc(arms, model):.1f}) | {s:g}× (seeds {seeds}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def peer_arms(arms: list[dict]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(r["arm"] for r in arms if r["family"] == "torch-pruning"))


def target_checks(arms: list[dict], latency_rows: dict[str, list[dict]]) -> list[str]:
    """The issue's targets, each as a measured yes/no line."""
    lines = []
    peers = peer_arms(arms)
    ours = DEFAULT_ARM  # the chanprune row that meets the peers
    for model in dict.fromkeys(r["model"] for r in arms):
        for s in sorted({r["speedup"] for r in select(arms, model=model, family="torch-pruning")}):
            mine = select(arms, model=model, arm=ours, speedup=s)
            best = max(peers, key=lambda a: statistics.mean(accs(select(arms, model=model, arm=a, speedup=s), "ft")))
            theirs = statistics.mean(accs(select(arms, model=model, arm=best, speedup=s), "ft"))
            ft, as_is = statistics.mean(accs(mine, "ft")), statistics.mean(accs(mine, "as_is"))
            lines.append(f"- {model} {s:g}×: chanprune fine-tuned {ft:.2f} vs best Torch-Pruning ({best}) fine-tuned "
                         f"{theirs:.2f}: {'met' if ft >= theirs else 'NOT met'}; chanprune without fine-tuning "
                         f"{as_is:.2f}: {'met' if as_is >= theirs else 'NOT met'}")
    for model in dict.fromkeys(r["model"] for r in arms):
        for s in (4.0, 5.0):
            logit = {a: [r["as_is"]["logit_err"] for r in select(arms, model=model, arm=a, speedup=s)]
                     for a in ALLOCATION_ARMS}
            if not logit["default"]:
                continue
            others = {a: statistics.mean(v) for a, v in logit.items() if a != "default" and v}
            mine = statistics.mean(logit["default"])
            versus = ", ".join(f"{a} {v:.4f}" for a, v in others.items())
            lines.append(f"- {model} {s:g}×: global widths' test logit error {mine:.4f} vs {versus}: "
                         f"{'met' if all(mine < v for v in others.values()) else 'NOT met'}")
    tuned = [r for r in arms if r["as_is"] is not None]
    kept = [r for r in tuned if r["ft"]["val_acc"] >= r[r["ft_start"]]["val_acc"]]
    if tuned:
        lines.append(f"- fine-tuned ≥ not fine-tuned on validation: {len(kept)} of {len(tuned)} rows: "
                     f"{'met' if len(kept) == len(tuned) else 'NOT met'}")
    vgg4 = select(arms, model="vgg16-mnist", arm=ours, speedup=4.0)
    if vgg4:
        for stage, limit in (("as_is", 0.2), ("ft", 0.3)):
            drop = base_acc(arms, "vgg16-mnist") - statistics.mean(accs(vgg4, stage))
            lines.append(f"- vgg16-mnist 4× {ours} {STAGES[stage]}: {drop:+.2f} points below the unpruned model "
                         f"(target ≤ {limit}): {'met' if drop <= limit else 'NOT met'}")
    for row in latency_rows.get("vgg16-mnist", []):
        if row["model"] == f"{ours}-4x":
            for engine in ("eager b32 channels_last", "onnxruntime b32"):
                measured = row["speedup"][engine]
                ratio = measured / row["flops_speedup"]
                lines.append(f"- vgg16-mnist {row['model']} CPU latency ({engine}): {measured:.2f}× measured vs "
                             f"{row['flops_speedup']:.2f}× FLOPs = {ratio:.2f} (target ≥ 0.9): "
                             f"{'met' if ratio >= 0.9 else 'NOT met'}")
    return lines


def plot_table1(arms: list[dict], model: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for i, arm in enumerate((*TABLE1_METHODS, "scratch")):
        rows = select(arms, model=model, arm=arm)
        speedups = sorted({r["speedup"] for r in rows})
        color = f"C{i}"
        for stage, style in (("as_is", "--"), ("ft", "-")):
            ys = [statistics.mean(accs(select(rows, speedup=s), stage) or [float("nan")]) for s in speedups]
            label = f"{arm}, {'fine-tuned' if stage == 'ft' else 'no fine-tuning'}"
            if arm == "scratch":
                if stage == "as_is":
                    continue
                label = "from scratch"
            ax.plot(speedups, ys, style, marker="o", color=color, label=label)
    ax.axhline(base_acc(arms, model), color="gray", lw=0.8, label="unpruned")
    ax.set(xlabel="FLOPs speed-up", ylabel="test accuracy (%)", title=f"{model}: the paper's Table 1, rerun")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


CURVE_KEYS = {"error_increase": "increase of test error (points)",
              "rel_error_heldout": "relative reconstruction error (held-out)"}


def plot_curves(curves: list[dict], key: str, path: Path) -> None:
    layers = list(dict.fromkeys(r["layer"] for r in curves))
    cols = 5
    fig, axes = plt.subplots((len(layers) + cols - 1) // cols, cols, figsize=(3 * cols, 2.5 * ((len(layers) + cols - 1) // cols)),
                             squeeze=False)
    for ax, layer in zip(axes.flat, layers):
        for method in dict.fromkeys(r["method"] for r in curves):
            sel = [r for r in curves if r["layer"] == layer and r["method"] == method]
            ax.plot([r["speedup"] for r in sel], [r[key] for r in sel], marker="o", ms=3, label=method)
        ax.set_title(layer, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.supxlabel("speed-up of the one layer")
    fig.supylabel(CURVE_KEYS[key])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_latency(latency_rows: dict[str, list[dict]], path: Path) -> None:
    fig, axes = plt.subplots(1, len(latency_rows), figsize=(4.2 * len(latency_rows), 3.6), squeeze=False)
    for ax, (model, rows) in zip(axes.flat, latency_rows.items()):
        pruned = rows[1:]
        engines = list(pruned[0]["speedup"]) if pruned else []
        width = 0.8 / (len(engines) + 1)
        xs = range(len(pruned))
        ax.bar([x - 0.4 + width / 2 for x in xs], [r["flops_speedup"] for r in pruned], width, color="black",
               label="FLOPs")
        for i, engine in enumerate(engines):
            ax.bar([x - 0.4 + width * (i + 1.5) for x in xs], [r["speedup"][engine] for r in pruned], width,
                   label=engine)
        ax.set_xticks(list(xs), [r["model"] for r in pruned], fontsize=7)
        ax.set(title=model, ylabel="speed-up over the original")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def write(out_dir: Path, size: Any, command: str, machine: str, minutes: dict[str, float]) -> str:
    """Write ``report.md`` and the PNGs into ``out_dir``; returns the report body for the README
    (images linked by their path from the repository root)."""
    rows = load(out_dir / "accuracy.json") or []
    arms = [r for r in rows if "refused" not in r]
    refused = [r for r in rows if "refused" in r]
    curves = load(out_dir / "single_layer.json") or []
    latency_rows = load(out_dir / "latency.json") or {}
    img = "IMAGES"  # image links: bare names in report.md, repository paths in the README
    b = size.budget
    epochs = ", ".join(f"{m}: {b.epochs_for(m)}" for m in dict.fromkeys(r["model"] for r in arms))
    parts = [f"Produced by `{command}` on {machine}; "
             + ", ".join(f"{k} {v:.0f} min" for k, v in minutes.items()) + ".",
             f"Calibration: {b.calib_images} training images × {b.samples_per_image} positions, seeds "
             f"{', '.join(map(str, sorted({r['seed'] for r in arms})))} (each seed also seeds fine-tuning). "
             "chanprune's default rows: `recipe=\"default\"` as it ships (its own positions per image and "
             f"ridge); the paper's rows: `recipe=\"paper\"` with ridge `{b.ridge}`. "
             f"Fine-tuning (every method alike): SGD, lr {b.ft_lr}, cosine, epochs per model: {epochs}; it starts "
             "from the model as is or with BN re-estimated, whichever has the higher validation accuracy. "
             f"From scratch: {b.scratch_epochs} epochs, lr {b.scratch_lr}. Accuracy: test split (1000 images), "
             "mean ± sd over seeds; unpruned accuracy in brackets."]
    vgg = [m for m in dict.fromkeys(r["model"] for r in arms) if select(arms, model=m, arm="first_k")]
    for model in vgg:
        plot_table1(arms, model, out_dir / f"table1-{model}.png")
        parts += [f"#### Table 1 analog: {model}, increase of test error (points; unpruned "
                  f"{base_acc(arms, model):.2f}%)", table1(arms, model), f"![Table 1]({img}/table1-{model}.png)"]
    residual_arms = select([r for r in arms if r["model"] not in vgg], family="chanprune")
    if residual_arms:
        parts += ["#### Residual analog: the paper's variants, joint trunk pruning and the default recipe",
                  stage_table(residual_arms, RESIDUAL_ARMS, set(b.residual_speedups))]
    if arms:
        ours = [r for r in arms if r["family"] == "chanprune" and r["arm"] == DEFAULT_ARM]
        peers = [r for r in arms if r["family"] == "torch-pruning"]
        presets = ", ".join(f"{v} for {k}" for k, v in PRESET.items())
        parts += ["#### Width allocations: the default recipe with global, uniform and preset widths",
                  f"Test logit error against the unpruned model and test accuracy without fine-tuning, and "
                  f"accuracy fine-tuned; preset: {presets}, resnet-paper for the others; 'refused': the preset "
                  "cannot reach the speed-up in blocks of 8 channels.", comparison_table(arms, refused, ALLOCATION_LABELS),
                  "#### Torch-Pruning at equal FLOPs (same models, calibration images and fine-tuning)",
                  stage_table(ours + peers, (DEFAULT_ARM, *peer_arms(arms)), set(b.peer_speedups))]
    if select(arms, arm="trunk-fine"):
        parts += ["#### Residual trunks: kept, pruned jointly, fine-grained (FCP)",
                  "The default recipe with `trunk=\"keep\"` (trunk readers still read chosen subsets through "
                  "channel selects), `\"joint\"` (the default) and `\"fine\"` (readers read, and branch ends "
                  "write, their own subsets); 4.6× is FCP's 78% of FLOPs removed. Columns as above.",
                  comparison_table(arms, refused, TRUNK_LABELS)]
    if curves:
        for key in CURVE_KEYS:
            plot_curves(curves, key, out_dir / f"single_layer_{key}.png")
        parts += [f"#### Single layers pruned alone ({size.curve_model}; the paper's Fig. 4, no fine-tuning)",
                  "Each conv layer's input channels pruned alone, every method followed by least squares. "
                  "Test error moves by a few tenths of a point at most here (1000 test images: ±0.3 points "
                  "of noise), so the held-out reconstruction error of the layer is shown as well.",
                  *(f"![{CURVE_KEYS[key]}]({img}/single_layer_{key}.png)" for key in CURVE_KEYS)]
    if latency_rows:
        plot_latency(latency_rows, out_dir / "latency.png")
        parts += [f"#### Latency (median of {size.latency_repeats} runs after warm-up; seed-0 models)"]
        parts += [f"{model}:\n\n" + latency_table(rows) for model, rows in latency_rows.items()]
        parts += [f"![latency]({img}/latency.png)"]
    checks = target_checks(arms, latency_rows)
    if checks:
        parts += ["#### Targets", "\n".join(checks)]
    body = "\n\n".join(parts)
    (out_dir / "report.md").write_text("# chanprune results suite\n\n" + body.replace(f"]({img}/", "](") + "\n")
    return body.replace(f"]({img}/", f"]({out_dir.as_posix()}/")

