"""Deployment files for (pruned) models: ONNX and torch.export archives, checked against torch.

A pruned model's channel selects (:class:`~chanprune.layers.SelectedConv2d`) export as one ONNX
``Gather`` on the channel axis each; :func:`select_cost_onnx` measures what they cost in ONNX Runtime.
Every file is written atomically (a temporary file in the target directory, then ``os.replace``),
so a failed export never leaves a half-written or stale-named file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ChanpruneError, error_line
from .extras import require
from .files import write_atomically
from .io.provenance import input_shape as recorded_input_shape

INPUT_NAME = "input"
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}


def resolve_input_shape(model: nn.Module | None, input_shape: Sequence[int] | None) -> tuple[int, ...]:
    """``input_shape`` as a tuple (one sample, no batch axis), else the model's recorded one."""
    if input_shape is None and model is not None:
        input_shape = recorded_input_shape(model)
    if input_shape is None:
        raise ChanpruneError("the model's input shape is unknown; pass input_shape=(C, H, W) for one sample")
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise ChanpruneError(f"input_shape {input_shape!r} is not a sequence of integers such as (3, 32, 32)") from None
    if not shape or any(s <= 0 for s in shape):
        raise ChanpruneError(f"input_shape {shape} must be positive sizes of one sample such as (3, 32, 32)")
    return shape


def _check_batch(batch_size: int) -> int:
    if int(batch_size) < 1:
        raise ChanpruneError(f"batch_size must be at least 1, not {batch_size}")
    return int(batch_size)


def example_input(model: nn.Module, input_shape: Sequence[int], batch_size: int, seed: int = 0) -> torch.Tensor:
    """A seeded standard-normal batch on the model's device, in its floating dtype."""
    ref = next((t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()), None)
    dtype, device = (ref.dtype, ref.device) if ref is not None else (torch.float32, torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(_check_batch(batch_size), *input_shape, generator=gen, dtype=dtype).to(device)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration; the model's own mode comes back afterwards."""
    training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(training)


@torch.no_grad()
def _outputs(model: Callable[[torch.Tensor], Any], x: torch.Tensor, what: str = "the model") -> list[torch.Tensor]:
    """The outputs of ``model(x)`` as a list of tensors (a tensor, or a tuple / list of them)."""
    try:
        out = model(x)
    except Exception as err:
        raise ChanpruneError(f"{what} does not run on an input of shape {tuple(x.shape)} ({error_line(err)}); "
                             "check input_shape") from None
    outs = [out] if isinstance(out, torch.Tensor) else list(out) if isinstance(out, (tuple, list)) else None
    if outs is None or not outs or not all(isinstance(o, torch.Tensor) for o in outs):
        raise ChanpruneError(f"{what} returns {type(out).__name__}; export needs a tensor or a tuple of tensors")
    return outs


def _compare(ref: Sequence[torch.Tensor], got: Sequence[Any], atol: float, rtol: float) -> dict[str, Any]:
    """Largest absolute difference; ok when it is within ``atol + rtol * max|ref|``."""
    if len(ref) != len(got):
        return {"max_abs_diff": float("inf"), "max_abs_ref": 0.0, "ok": False}
    diff, scale = 0.0, 0.0
    for r, g in zip(ref, got):
        r = r.detach().cpu().double().numpy()
        g = np.asarray(g.detach().cpu() if isinstance(g, torch.Tensor) else g, dtype=np.float64)
        if r.shape != g.shape:
            return {"max_abs_diff": float("inf"), "max_abs_ref": 0.0, "ok": False}
        if r.size:
            err = np.abs(r - g)
            err[np.isnan(r) & np.isnan(g)] = 0.0  # NaN where torch has NaN too is a match
            d = float(np.max(err))
            diff = max(diff, float("inf") if np.isnan(d) else d)
            scale = max(scale, float(np.nanmax(np.abs(r))) if not np.isnan(r).all() else 0.0)
    return {"max_abs_diff": diff, "max_abs_ref": scale, "ok": bool(diff <= atol + rtol * scale)}


def _trace_batch(batch_size: int, dynamic_batch: bool) -> int:
    """The example batch to capture with: at least 2 when the batch axis is dynamic, so that
    size-1 specialisation cannot bake the batch size into the graph."""
    return max(_check_batch(batch_size), 2) if dynamic_batch else _check_batch(batch_size)


def _export_onnx_file(model: nn.Module, x: torch.Tensor, dest: Path, outputs: list[torch.Tensor],
                      dynamic_batch: bool, opset: int, dynamo: bool) -> None:
    output_names = ["output"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))]
    try:
        if dynamo:
            prog = torch.onnx.export(model, (x,), None, dynamo=True, opset_version=opset, verbose=False,
                                     input_names=[INPUT_NAME], output_names=output_names,
                                     dynamic_shapes=({0: torch.export.Dim("batch")},) if dynamic_batch else None)
            prog.save(str(dest), external_data=False)
            return
        axes = None
        if dynamic_batch:
            axes = {INPUT_NAME: {0: "batch"}}
            axes.update({n: {0: "batch"} for n, o in zip(output_names, outputs) if o.dim() > 0})
        with warnings.catch_warnings():  # the TorchScript exporter is deprecated (see export_onnx)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
            warnings.filterwarnings("ignore", message="The feature will be removed")
            torch.onnx.export(model, (x,), str(dest), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=output_names, dynamic_axes=axes,
                              do_constant_folding=True)
    except ChanpruneError:
        raise
    except Exception as err:
        raise ChanpruneError(f"cannot export {type(model).__name__} to ONNX opset {opset} ({error_line(err)}); "
                             "replace the unsupported operation, or try another opset or exporter") from None


def export_onnx(model: nn.Module, path: str | Path, input_shape: Sequence[int] | None = None, batch_size: int = 1,
                dynamic_batch: bool = True, opset: int = 17, dynamo: bool = False) -> Path:
    """Write ``model`` (run in eval mode) as an ONNX file with input ``"input"``; returns the path.

    ``input_shape`` is one sample's shape (C, H, W), by default the model's recorded one. The batch
    axis is dynamic unless ``dynamic_batch=False`` (then it is fixed at ``batch_size``; a dynamic
    axis is captured on an example batch of at least 2). The default exporter is torch's
    TorchScript one (``dynamo=False``): fast, it honours the requested opset (17 by default) and
    writes one Gather per channel select. ``dynamo=True`` uses the torch.export-based exporter
    (needs onnxscript and opset 18 or newer; it merges selects of the same channels of the same
    tensor). The file is validated with ``onnx.checker`` before it is moved into place.
    """
    onnx = require("onnx", "export")
    if dynamo:
        require("onnxscript", "onnx-dynamo")
        if opset < 18:
            raise ChanpruneError(f"the dynamo ONNX exporter writes opset 18 or newer, not {opset}; "
                                 "pass opset=18 or use the default exporter (dynamo=False)")
    shape = resolve_input_shape(model, input_shape)
    with _eval_mode(model):
        x = example_input(model, shape, _trace_batch(batch_size, dynamic_batch))
        outputs = _outputs(model, x)

        def write(tmp: Path) -> None:
            _export_onnx_file(model, x, tmp, outputs, dynamic_batch, opset, dynamo)
            try:
                onnx.checker.check_model(str(tmp))
            except Exception as err:
                raise ChanpruneError(f"the exported ONNX graph is invalid ({error_line(err)})") from None

        return write_atomically(path, write)


def channel_gathers(graph: Any) -> list[Any]:
    """The Gather nodes on axis 1 of an ONNX graph: the channel selects (shape arithmetic excluded)."""
    def axis(node: Any) -> int:
        return next((a.i for a in node.attribute if a.name == "axis"), 0)

    return [n for n in graph.node if n.op_type == "Gather" and n.domain in ("", "ai.onnx") and axis(n) == 1]


def _session(path: str | Path, threads: int = 1, profile_prefix: str | None = None) -> Any:
    ort = require("onnxruntime", "export")
    if not Path(path).is_file():
        raise ChanpruneError(f"ONNX file {str(path)!r} does not exist; write it with export_onnx")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as err:
        raise ChanpruneError(f"ONNX Runtime cannot load {str(path)!r} ({error_line(err)}); "
                             "re-create it with export_onnx") from None


def _ort_input(session: Any, input_shape: Sequence[int] | None, batch_size: int, seed: int) -> tuple[str, np.ndarray]:
    """The session's input name and a seeded standard-normal batch for it."""
    first = session.get_inputs()[0]
    if input_shape is None:
        dims = first.shape[1:]
        if not all(isinstance(d, int) and d > 0 for d in dims):
            raise ChanpruneError(f"the ONNX input has no fixed sample shape ({first.shape}); pass input_shape")
        input_shape = dims
    shape = resolve_input_shape(None, input_shape)
    x = np.random.default_rng(seed).standard_normal((_check_batch(batch_size), *shape))
    return first.name, x.astype(_ORT_DTYPES.get(first.type, np.float32))


def _run_session(session: Any, feed: dict[str, np.ndarray], path: str | Path) -> list[Any]:
    try:
        return session.run(None, feed)
    except Exception as err:
        x = next(iter(feed.values()))
        raise ChanpruneError(f"ONNX Runtime cannot run {str(path)!r} on an input of shape {x.shape} "
                             f"({error_line(err)}); was it exported with another input shape or "
                             "a fixed batch size (dynamic_batch=False)?") from None


def check_onnx(model: nn.Module, path: str | Path, input_shape: Sequence[int] | None = None, batch_size: int = 2,
               atol: float = 1e-4, rtol: float = 1e-4, seed: int = 0) -> dict[str, Any]:
    """Run the ONNX file in ONNX Runtime (CPU) and ``model`` in torch on the same random batch.

    ``ok`` when the largest absolute difference is within ``atol + rtol * max|torch output|``.
    Returns ``{"max_abs_diff", "max_abs_ref", "ok", "gather_nodes", "nodes", "batch_size"}``;
    ``gather_nodes`` counts the Gathers on the channel axis (the channel selects).
    """
    onnx = require("onnx", "export")
    session = _session(path)
    graph = onnx.load(str(path), load_external_data=False).graph
    shape = resolve_input_shape(model, input_shape)
    with _eval_mode(model):
        x = example_input(model, shape, batch_size, seed)
        ref = _outputs(model, x)
    got = _run_session(session, {session.get_inputs()[0].name: x.detach().cpu().numpy()}, path)
    result = _compare(ref, got, atol, rtol)
    return {**result, "gather_nodes": len(channel_gathers(graph)), "nodes": len(graph.node),
            "batch_size": int(batch_size)}


def check_program(model: nn.Module, path: str | Path, input_shape: Sequence[int] | None = None,
                  batch_size: int = 2, atol: float = 1e-4, rtol: float = 1e-4, seed: int = 0) -> dict[str, Any]:
    """Load a torch.export archive and compare ``load(path).module()(x)`` with ``model(x)``.

    Returns ``{"max_abs_diff", "max_abs_ref", "ok"}`` (``ok`` as in :func:`check_onnx`).
    """
    if not Path(path).is_file():
        raise ChanpruneError(f"program file {str(path)!r} does not exist; write it with export_program")
    try:
        loaded = torch.export.load(str(path)).module()
    except Exception as err:
        raise ChanpruneError(f"cannot load {str(path)!r} as a torch.export archive ({error_line(err)})") from None
    shape = resolve_input_shape(model, input_shape)
    with _eval_mode(model):
        x = example_input(model, shape, batch_size, seed)
        ref = _outputs(model, x)
    got = _outputs(loaded, x, "the saved program")
    return _compare(ref, got, atol, rtol)


def export_program(model: nn.Module, path: str | Path, input_shape: Sequence[int] | None = None,
                   batch_size: int = 1, dynamic_batch: bool = True, atol: float = 1e-4,
                   rtol: float = 1e-4) -> Path:
    """Write ``model`` (eval mode) as a ``torch.export`` archive (``.pt2``); returns the path.

    ``batch_size`` and ``dynamic_batch`` as in :func:`export_onnx`. The archive is saved to a
    temporary file, loaded back and checked with :func:`check_program`
    (on a batch of 2 when the batch axis is dynamic) before it is moved into place.
    """
    shape = resolve_input_shape(model, input_shape)
    with _eval_mode(model):
        x = example_input(model, shape, _trace_batch(batch_size, dynamic_batch))
        _outputs(model, x)
        dynamic = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
        try:
            program = torch.export.export(model, (x,), dynamic_shapes=dynamic)
        except Exception as err:
            raise ChanpruneError(f"torch.export cannot capture {type(model).__name__} ({error_line(err)}); "
                                 "see https://pytorch.org/docs/stable/export.html for what it supports") from None

        def write(tmp: Path) -> None:
            try:
                torch.export.save(program, str(tmp))
            except OSError:
                raise
            except Exception as err:
                raise ChanpruneError(f"cannot save the exported program ({error_line(err)})") from None
            check = check_program(model, tmp, shape, 2 if dynamic_batch else batch_size, atol, rtol)
            if not check["ok"]:
                raise ChanpruneError(f"the saved program's outputs differ from the model's by "
                                     f"{check['max_abs_diff']:.3g} (largest output {check['max_abs_ref']:.3g})")

        return write_atomically(path, write)


def select_cost_onnx(path: str | Path, input_shape: Sequence[int] | None = None, batch_size: int = 1,
                     repeats: int = 50, warmup: int = 5, threads: int = 1, seed: int = 0) -> dict[str, Any]:
    """Latency of an ONNX file in ONNX Runtime (CPU) and the share of it spent in Gather nodes
    (channel selects, and the gathers of fine-grained trunk writers) and in Pad nodes (the zero
    channel those scatters gather from).

    ``ms_median`` is the median wall-clock time of one run over ``repeats`` runs after ``warmup``
    (a session without profiling). ``gather_share`` comes from ONNX Runtime's profiler: the summed
    kernel time of the Gather nodes over the summed kernel time of all nodes, in the profiled runs
    after warm-up (framework overhead between kernels is in neither). ``input_shape`` defaults to
    the file's own sample shape.
    """
    repeats, warmup = max(1, int(repeats)), max(0, int(warmup))
    session = _session(path, threads)
    name, x = _ort_input(session, input_shape, batch_size, seed)
    feed = {name: x}
    for _ in range(warmup):
        _run_session(session, feed, path)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _run_session(session, feed, path)
        times.append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory(prefix="chanprune-ort-profile-") as tmp:
        profiled = _session(path, threads, profile_prefix=os.path.join(tmp, "profile"))
        for _ in range(warmup + repeats):
            _run_session(profiled, feed, path)
        with open(profiled.end_profiling()) as f:
            events = json.load(f)
    runs = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    start_ts = runs[warmup] if len(runs) > warmup else 0
    nodes = [e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")
             and e.get("ts", 0) >= start_ts]
    total = sum(e.get("dur", 0) for e in nodes)
    gather = sum(e.get("dur", 0) for e in nodes if e.get("args", {}).get("op_name") == "Gather")
    pad = sum(e.get("dur", 0) for e in nodes if e.get("args", {}).get("op_name") == "Pad")
    return {"ms_median": 1e3 * statistics.median(times), "gather_share": gather / total if total else 0.0,
            "pad_share": pad / total if total else 0.0,
            "gather_ms": gather / 1e3 / repeats, "kernel_ms": total / 1e3 / repeats,
            "batch_size": int(batch_size), "threads": threads, "repeats": repeats}
