"""Surviving a kill: each pruning unit's result saved atomically as it is done, replayed on restart.

A unit's record holds what its selection and reconstruction decided (the kept channels, the
surgery operations on its readers and the readers' new tensors, their errors, the random
generator's state), not the carried activations: a restarted run carries the calibration data
forward again and replays the recorded units in the same order with the same operations, so it
ends with the same bytes as a run that was never stopped. ``run.json`` fingerprints the model,
the data and the options; a resume that differs in any of them is refused, naming what changed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import ChanpruneError
from ..files import write_atomically, write_text_atomic
from ..io.provenance import parse_op
from ..surgery import PlanOp

_META = "chanprune-resume"
_GENERATOR = "__generator__"


@dataclass(frozen=True)
class UnitRecord:
    """What pruning unit ``index`` decided, enough to redo it without its moments."""

    index: int
    unit: str
    keep: tuple[int, ...]
    ops: tuple[PlanOp, ...]
    tensors: dict[str, torch.Tensor]  # "<module>.<param or buffer>" after reconstruction
    errors: dict[str, dict[str, Any]]
    generator: torch.Tensor


def model_fingerprint(model: nn.Module) -> str:
    """A hash of a model's class, parameter and buffer names, shapes and bytes."""
    digest = hashlib.sha256(type(model).__qualname__.encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class ResumeDir:
    """A folder of unit records for one run, identified by ``fingerprint`` (model, data, options)."""

    def __init__(self, path: str | Path, fingerprint: dict[str, Any]):
        self.path = Path(path)
        self.fingerprint = fingerprint
        run = self.path / "run.json"
        if run.exists():
            try:
                saved = json.loads(run.read_text())
            except (OSError, ValueError) as err:
                raise ChanpruneError(f"cannot read {str(run)!r} ({err}); delete {str(self.path)!r} to start "
                                     "afresh") from err
            changed = _differences(saved, fingerprint)
            if changed:
                raise ChanpruneError(f"cannot resume from {str(self.path)!r}: {'; '.join(changed)} since the saved "
                                     "run; use another --resume-dir, or delete this one to start afresh")
        else:
            write_text_atomic(run, json.dumps(fingerprint, indent=2, sort_keys=True))

    def _file(self, index: int) -> Path:
        return self.path / f"unit-{index:05d}.safetensors"

    def save(self, record: UnitRecord) -> None:
        """Write one unit's record atomically (a kill mid-write leaves the previous state)."""
        meta = {"index": record.index, "unit": record.unit, "keep": list(record.keep),
                "ops": [op.to_json() for op in record.ops], "errors": record.errors}
        tensors = {k: v.detach().cpu().contiguous() for k, v in record.tensors.items()}
        tensors[_GENERATOR] = record.generator
        write_atomically(self._file(record.index),
                         lambda tmp: save_file(tensors, str(tmp), metadata={_META: json.dumps(meta)}))

    def records(self) -> list[UnitRecord]:
        """The saved records 0, 1, ... up to the first missing one."""
        out = []
        while self._file(len(out)).exists():
            out.append(self._load(len(out)))
        return out

    def _load(self, index: int) -> UnitRecord:
        path = self._file(index)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})[_META])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, KeyError) as err:
            raise ChanpruneError(f"resume record {str(path)!r} is damaged ({err}); delete {str(self.path)!r} to "
                                 "start afresh") from err
        where = repr(str(path))
        keep = meta.get("keep")
        if meta.get("index") != index or not isinstance(keep, list) or not all(type(i) is int for i in keep) \
                or not isinstance(meta.get("errors"), dict) or _GENERATOR not in tensors:
            raise ChanpruneError(f"resume record {where} is damaged; delete {str(self.path)!r} to start afresh")
        ops = tuple(parse_op(op, where) for op in meta.get("ops", []))
        generator = tensors.pop(_GENERATOR)
        return UnitRecord(index, str(meta.get("unit")), tuple(keep), ops, tensors, meta["errors"], generator)


def _differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What changed between two fingerprints, in words."""
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if a == b:
            continue
        if key == "options" and isinstance(a, dict) and isinstance(b, dict):
            out += [f"option {k} changed ({a.get(k)!r} -> {b.get(k)!r})" for k in sorted(set(a) | set(b))
                    if a.get(k) != b.get(k)]
        else:
            out.append({"model": "the model's weights changed", "data": "the calibration data changed",
                        "widths": "the kept widths changed", "version": "the chanprune version changed"}
                       .get(key, f"{key} changed"))
    return out
