"""What a pruning run did and measured, as plain data that round-trips to JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .allocation import Unit
from .files import write_text_atomic
from .layers import FactorizedConv2d, SelectedConv2d


@dataclass
class LayerReport:
    """One layer whose shape changed; errors are ||Y - Ŷ|| / ||Y|| of its reconstruction."""

    name: str
    kind: str
    in_channels_before: int
    in_channels_after: int
    out_channels_before: int
    out_channels_after: int
    kept_indices: list[int] | None
    rel_error: float | None = None
    rel_error_heldout: float | None = None
    rel_error_before: float | None = None  # kept channels, original weights (no reconstruction)
    samples: int | None = None  # fitted samples of its reconstruction
    positions_per_image: int | None = None  # sampled output positions per calibration image


@dataclass
class PruneReport:
    """Whole-model figures of a pruning run; ``config`` holds every option used."""

    flops_before: int
    flops_after: int
    params_before: int
    params_after: int
    seconds: float
    config: dict[str, Any]
    layers: list[LayerReport] = field(default_factory=list)
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    logit_rel_error: float | None = None
    calibration_images: int | None = None
    peak_activation_bytes: int | None = None  # carried activations held in memory at once
    spilled_bytes: int | None = None  # carried activations written to temporary files
    resumed_units: int = 0  # units replayed from a checkpoint folder instead of solved again
    latency_before_ms: float | None = None  # median forward time at batch 1, measured by the CLI
    latency_after_ms: float | None = None
    latency_device: str | None = None

    @property
    def speedup_achieved(self) -> float:
        return self.flops_before / self.flops_after

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["speedup_achieved"] = self.speedup_achieved
        return out

    def save_json(self, path: str | Path) -> None:
        """Write the report atomically (no partial file on failure)."""
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2))


def layer_reports(original: nn.Module, pruned: nn.Module, errors: dict[str, dict[str, Any]],
                  positions: dict[str, int] | None = None) -> list[LayerReport]:
    """One entry per Conv2d / Linear whose shape changed, with the errors of its reconstruction and
    the samples it was fitted on (``positions``: sampled positions per image, by layer)."""
    reports = []
    for name, before in original.named_modules():
        if not isinstance(before, (nn.Conv2d, nn.Linear)):
            continue
        after = pruned.get_submodule(name)
        shape_before, shape_after = tuple(before.weight.shape[:2]), tuple(after.weight.shape[:2])
        if shape_before == shape_after and name not in errors:
            continue
        first = after[0] if isinstance(after, FactorizedConv2d) else after
        kind = "linear" if isinstance(before, nn.Linear) else "conv+select" if isinstance(first, SelectedConv2d) \
            else "conv"
        if isinstance(after, FactorizedConv2d):
            kind += f" factorized ({'-'.join(str(c.out_channels) for c in after[:-1])})"
        err = errors.get(name, {})
        reports.append(LayerReport(
            name=name, kind=kind,
            in_channels_before=_in_channels(before), in_channels_after=_in_channels(after),
            out_channels_before=shape_before[0], out_channels_after=shape_after[0],
            kept_indices=err.get("kept_indices"), rel_error=err.get("rel_error"),
            rel_error_heldout=err.get("rel_error_heldout"), rel_error_before=err.get("rel_error_before"),
            samples=err.get("samples"), positions_per_image=(positions or {}).get(name)))
    return reports


def unit_reports(units: list[Unit], kept: dict[str, torch.Tensor],
                 errors: dict[str, dict[str, Any]]) -> list[LayerReport]:
    """One entry per pruned residual trunk (the channels every writer and reader of it lost) and
    per fine-grained trunk writer (the trunk channels it still writes, and its error on the block
    output, dropped channels included)."""
    reports = [LayerReport(name=f"trunk:{u.name}", kind="trunk", in_channels_before=u.channels,
                           in_channels_after=len(kept[u.name]), out_channels_before=u.channels,
                           out_channels_after=len(kept[u.name]), kept_indices=kept[u.name].tolist())
               for u in units if u.kind == "trunk"]
    for u in units:
        if u.kind == "write" and u.name in errors:
            err = errors[u.name]
            reports.append(LayerReport(
                name=u.name, kind="write", in_channels_before=u.channels, in_channels_after=u.channels,
                out_channels_before=u.channels, out_channels_after=len(err["kept_indices"]),
                kept_indices=err["kept_indices"], rel_error=err["rel_error"],
                rel_error_heldout=err["rel_error_heldout"], samples=err["samples"]))
    return reports


def _in_channels(layer: nn.Module) -> int:
    return layer.in_channels if isinstance(layer, (nn.Conv2d, FactorizedConv2d)) else layer.in_features
