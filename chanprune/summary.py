"""What a person reads after a prune: REPORT.md and REPORT.png next to the JSON report, and a short
console summary. Widths kept per layer against the original, each layer's held-out
reconstruction error, and the whole-model figures (FLOPs, parameters, accuracy or logit error,
measured latency)."""

from __future__ import annotations

from pathlib import Path

import click

from .errors import ChanpruneError
from .files import write_atomically, write_text_atomic
from .report import LayerReport, PruneReport


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def _error(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def summary_rows(report: PruneReport) -> list[tuple[str, str, str]]:
    """(figure, before, after) rows of the whole-model summary."""
    rows = [("FLOPs", f"{report.flops_before:,}", f"{report.flops_after:,} ({report.speedup_achieved:.2f}× fewer)"),
            ("parameters", f"{report.params_before:,}", f"{report.params_after:,}")]
    if report.accuracy_after is not None:
        rows.append(("test accuracy (top-1)", _percent(report.accuracy_before), _percent(report.accuracy_after)))
    rows.append(("logit error vs. the original", "0", _error(report.logit_rel_error)))
    if report.latency_before_ms is not None and report.latency_after_ms is not None:
        rows.append((f"latency, batch 1 ({report.latency_device})", f"{report.latency_before_ms:.2f} ms",
                     f"{report.latency_after_ms:.2f} ms ({report.latency_before_ms / report.latency_after_ms:.2f}× "
                     "faster)"))
    return rows


def markdown(report: PruneReport, image: str | None) -> str:
    """REPORT.md: the summary table, the plot, and one row per changed layer."""
    lines = ["# chanprune report", "", f"{report.config.get('model')} pruned at {report.speedup_achieved:.2f}× "
             f"(asked {report.config.get('speedup')}) with the {report.config.get('recipe')} recipe "
             f"on {report.calibration_images} calibration images in {report.seconds:.0f} s.", "",
             "| | before | after |", "|---|---|---|"]
    lines += [f"| {name} | {before} | {after} |" for name, before, after in summary_rows(report)]
    if image:
        lines += ["", f"![kept widths and reconstruction errors]({image})"]
    lines += ["", "| layer | kind | in channels | out channels | held-out error | fitted error | samples |",
              "|---|---|---|---|---|---|---|"]
    for layer in report.layers:
        lines.append(f"| {layer.name} | {layer.kind} | {layer.in_channels_before} → {layer.in_channels_after} | "
                     f"{layer.out_channels_before} → {layer.out_channels_after} | {_error(layer.rel_error_heldout)} | "
                     f"{_error(layer.rel_error)} | {layer.samples if layer.samples is not None else '–'} |")
    return "\n".join(lines) + "\n"


def _conv_layers(report: PruneReport) -> list[LayerReport]:
    return [layer for layer in report.layers if layer.kind != "trunk"]


def plot(report: PruneReport, path: Path) -> None:
    """REPORT.png: input channels kept per layer over the original, and held-out errors."""
    from .extras import require

    require("matplotlib", "plots").use("Agg")
    import matplotlib.pyplot as plt

    layers = _conv_layers(report)
    xs = range(len(layers))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.22 * len(layers) + 2), 6.5), sharex=True)
    top.bar(xs, [layer.in_channels_before for layer in layers], color="#cccccc", label="original")
    top.bar(xs, [layer.in_channels_after for layer in layers], color="#1f77b4", label="kept")
    top.set(ylabel="input channels", title=f"{report.config.get('model')}: {report.speedup_achieved:.2f}× fewer "
                                             "FLOPs")
    top.legend(fontsize=8)
    errors = [layer.rel_error_heldout if layer.rel_error_heldout is not None else float("nan") for layer in layers]
    bottom.bar(xs, errors, color="#d62728")
    bottom.set(ylabel="held-out relative error")
    bottom.set_xticks(list(xs), [layer.name for layer in layers], rotation=90, fontsize=6)
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def write_report_files(report: PruneReport, report_path: Path) -> list[str]:
    """Write REPORT.md and REPORT.png next to ``report_path`` (same name, other suffixes); returns
    what was written, or why the plot was not (matplotlib is an extra)."""
    image = report_path.with_suffix(".png")
    written = []
    try:
        plot(report, image)
        written.append(str(image))
    except ChanpruneError as err:
        if "pip install" not in str(err):
            raise
        image = None
        written.append(f"no plot: {err}")
    md = report_path.with_suffix(".md")
    write_text_atomic(md, markdown(report, image.name if image else None))
    return [str(md), *written]


def print_summary(report: PruneReport, out: Path, written: list[str], resume_dir: Path | None) -> None:
    """The console's last lines after a prune: the summary table and the files written."""
    width = max(len(name) for name, _, _ in summary_rows(report))
    for name, before, after in summary_rows(report):
        click.echo(f"{name:<{width}}  {before:>16}  ->  {after}")
    resumed = f" ({report.resumed_units} units resumed from {resume_dir})" if report.resumed_units else ""
    click.echo(f"wrote {out}{resumed}, " + ", ".join(written))
