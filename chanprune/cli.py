"""The command-line face of chanprune: train, prune, finetune, export, eval, analyze, demo."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ._version import __version__
from .allocators import ALLOCATIONS
from .config import GLOBAL_WEIGHTS, TRUNK_MODES
from .recipes import RECIPES
from .errors import ChanpruneError
from .selection import STRATEGIES
from .cli_options import data_options, device_option, json_kwargs, model_options

if TYPE_CHECKING:
    from torch import nn

    from .experiment import LoadedModel

LATENCY_REPEATS = 10  # median of this many batch-1 forward passes in prune's summary and eval


class _Group(click.Group):
    """Turns ChanpruneError, and click's own errors in a command's options, into one line on stderr
    and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ChanpruneError as err:
            _fail(str(err))
        except click.UsageError as err:
            path = err.ctx.command_path if err.ctx is not None else ctx.command_path
            _fail(f"{err.format_message().rstrip('.')}; see '{path} --help'")


def _fail(message: str) -> None:
    """Print ``message`` as one ``error:`` line (a message quoting another tool may hold newlines)."""
    click.echo("error: " + " ".join(line.strip() for line in message.splitlines() if line.strip()), err=True)
    sys.exit(2)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="chanprune")
def main() -> None:
    """Make trained CNNs faster by removing channels (He, Zhang, Sun 2017, and beyond)."""
    warnings.formatwarning = _one_line_warning


def _one_line_warning(message: Warning | str, category: type[Warning], *_: object, **__: object) -> str:
    """Warnings on the command line: one ``warning:`` line, without the source line that raised it."""
    return f"warning: {message}\n"


@main.command()
@click.option("--model", "model_name", default="vgg16-mnist", show_default=True, help="Bundled model name.")
@click.option("--epochs", default=20, show_default=True, help="Epochs of an MNIST model.")
@click.option("--steps", default=None, type=int,
              help="Steps of the super-resolution model (msrresnet-photos) [default: 3000].")
@click.option("--lr", default=None, type=float, help="Learning rate [default: 0.05 (MNIST), 0.001 (photos)].")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the checkpoint (default: the package's bundled checkpoint).")
@device_option
def train(model_name: str, epochs: int, steps: int | None, lr: float | None, seed: int, out: Path | None,
          device: str) -> None:
    """Train a bundled reference model on its bundled data (MNIST digits, or patches of the bundled
    photographs for the super-resolution model) and save its checkpoint."""
    from dataclasses import asdict

    from .devices import resolve_device
    from .io.state_file import save_state_file
    from .models import bundled_model

    entry = bundled_model(model_name)
    torch_seed(seed)
    model = entry.build().to(resolve_device(device))
    if entry.dataset == "photos":
        from .photos import photo_split
        from .sr import SRConfig, score, train_sr

        config = SRConfig(**{k: v for k, v in (("steps", steps), ("lr", lr)) if v is not None}, seed=seed)
        split = photo_split()
        result = train_sr(model, split, config, keep_best=True)
        result.update({f"test_{k}": v for k, v in asdict(score(model, split.test, config.scale)).items()})
        result.update({f"bicubic_test_{k}": v for k, v in asdict(score(None, split.test, config.scale)).items()})
        command = f"chanprune train --model {model_name} --steps {config.steps} --lr {config.lr} --seed {seed}"
        summary = (f"val PSNR {result['val_psnr']:.2f} dB  test PSNR {result['test_psnr']:.2f} dB, SSIM "
                   f"{result['test_ssim']:.4f} (bicubic {result['bicubic_test_psnr']:.2f} dB, "
                   f"{result['bicubic_test_ssim']:.4f})")
    else:
        from .data import mnist_split
        from .evaluate import accuracy
        from .train import TrainConfig, train as run_training

        config = TrainConfig(epochs=epochs, lr=0.05 if lr is None else lr, seed=seed)
        result = run_training(model, mnist_split("train"), mnist_split("val"), config)
        result["test_accuracy"] = accuracy(model, mnist_split("test"))
        command = f"chanprune train --model {model_name} --epochs {epochs} --lr {config.lr} --seed {seed}"
        summary = f"val accuracy {result['val_accuracy']:.4f}  test accuracy {result['test_accuracy']:.4f}"
    out = out or entry.checkpoint
    save_state_file(out, model.state_dict(), {"model": model_name, "recipe": asdict(config),
                                              "command": command, "result": result})
    click.echo(f"{summary}  -> {out}")


def torch_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def _number_or_auto(text: str | None, option: str, parse: type[int] | type[float]) -> int | float | str | None:
    """An option that takes a number or 'auto', or is unset (None: the recipe decides)."""
    if text is None or text == "auto":
        return text
    try:
        return parse(text)
    except ValueError:
        kind = "a whole number" if parse is int else "a number"
        raise ChanpruneError(f"{option} must be {kind} or 'auto', got {text!r}") from None


def _read_widths(path: Path) -> dict[str, int]:
    """The mapping layer name -> kept input channels of a JSON (``.json``) or YAML file."""
    import json

    import yaml

    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ChanpruneError(f"cannot read widths file {str(path)!r} ({getattr(err, 'strerror', None) or err}); "
                             "give a JSON/YAML file mapping layer name -> kept input channels") from err
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as err:
        raise ChanpruneError(f"widths file {str(path)!r} is not valid JSON ({err}); write a mapping such as "
                             '{"conv2": 4}') from err
    except yaml.YAMLError as err:
        raise ChanpruneError(f"widths file {str(path)!r} is not valid YAML ({_yaml_reason(err)}); write a mapping "
                             "such as 'conv2: 4', one layer a line") from err
    if not isinstance(data, dict):
        raise ChanpruneError(f"widths file {str(path)!r} holds a {type(data).__name__}, not a mapping; map layer "
                             'names to kept input channels, e.g. {"conv2": 4}')
    return data


def _yaml_reason(err: Exception) -> str:
    """A YAML error in one line: the problem and where (PyYAML's own text spans several lines)."""
    problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(err).split())


def _check_outputs(out: Path, report: Path | None = None) -> None:
    """Refuse output paths that cannot work before any work is done."""
    from .files import check_writable

    if out.suffix != ".safetensors":
        raise ChanpruneError(f"--out must end in .safetensors, got {str(out)!r}; name it e.g. "
                             f"{str(out.with_suffix('.safetensors'))!r}")
    if report is not None and report.resolve() == out.resolve():
        raise ChanpruneError(f"--report and --out are the same file {str(out)!r}; give the report its own path, "
                             f"e.g. {str(out.with_suffix('.json'))!r}")
    check_writable(out, "--out")
    if report is not None:
        check_writable(report, "--report")


@main.command()
@model_options
@click.option("--speedup", type=float, default=None, help="Target FLOPs(original) / FLOPs(pruned).")
@click.option("--recipe", type=click.Choice(list(RECIPES)), default="default", show_default=True,
              help="Defaults for every option below left unset. " +
                   "; ".join(f"{name}: {r.summary}" for name, r in RECIPES.items()) + ".")
@click.option("--method", type=click.Choice(list(STRATEGIES)), default=None,
              help="Channel selection [default: the recipe's].")
@click.option("--lasso-rounds", type=int, default=1, show_default=True,
              help="LASSO steps with least-squares refits between them (the paper's alternating form).")
@click.option("--allocation", type=click.Choice(list(ALLOCATIONS)), default=None,
              help="; ".join(f"{name}: {a.summary}" for name, a in ALLOCATIONS.items()) +
                   " [default: the recipe's].")
@click.option("--global-weight", type=click.Choice(GLOBAL_WEIGHTS), default=None,
              help="--allocation global: compare layers by error relative to their output energy, or also "
                   "weighted by the measured sensitivity of the model's output [default: the recipe's].")
@click.option("--trunk", type=click.Choice(TRUNK_MODES), default=None,
              help="Channels tied by residual adds: keep them whole (paper), prune them jointly, or fine (FCP: "
                   "each layer reads and writes its own subset, the adds stay full width) [default: the recipe's].")
@click.option("--residual-correction/--no-residual-correction", default=None,
              help="The last layer of a residual branch also makes up for its shortcut's error [default: the "
                   "recipe's].")
@click.option("--feature-map-sampling/--no-feature-map-sampling", default=None,
              help="A conv reading channels that stay whole reads a chosen subset through a channel select "
                   "[default: the recipe's].")
@click.option("--widths", "widths_file", type=click.Path(path_type=Path), default=None,
              help="JSON/YAML file: layer name -> kept input channels (instead of an allocation).")
@click.option("--exclude", multiple=True, help="Glob of layer names to leave unpruned (repeatable).")
@click.option("--calib-data", default=None, help="Folder of images or .npy/.pt tensor (N, C, H, W).")
@click.option("--calib-images", type=int, default=None, help="Number of calibration images [bundled: 500].")
@click.option("--samples-per-image", default=None,
              help="Sampled positions per image and layer, or 'auto': per layer, enough for 10 fitted samples per "
                   "input feature, at most the layer's whole output map [default: the recipe's].")
@click.option("--input-size", type=int, nargs=2, default=None, help="H W to resize calibration images to.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-reconstruction", is_flag=True, help="Keep original weights of kept channels (ablation).")
@click.option("--ridge", default=None,
              help="Least-squares ridge relative to trace(XᵀX)/dim, or 'auto': per layer, the ridge (or the "
                   "original weights) with the lowest error on the held-out calibration images [default: the "
                   "recipe's].")
@click.option("--round-to", default=None,
              help="Keep multiples of this many channels per layer (8 or 16 suit vectorised CPU kernels), or "
                   "'auto': blocks of 8 in layers of 64 channels or more [default: the recipe's].")
@click.option("--factorize", default="",
              help="3C: also factorize every reconstructed conv, 'spatial' (kxk -> kx1 + 1xk), 'channel' (a thinner "
                   "conv + 1x1) or 'spatial,channel'; each technique takes an equal share of the speed-up.")
@click.option("--channel-pruning/--no-channel-pruning", default=True, show_default=True,
              help="With --factorize: --no-channel-pruning lets the factorization alone make the speed-up.")
@data_options
@device_option
@click.option("--memory-budget", type=click.IntRange(min=0), default=None,
              help="MiB of carried activations kept in memory; the rest go to temporary files [default: half the "
                   "free memory].")
@click.option("--resume-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Save each unit's result here; the same command run again after a kill continues from it.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Pruned model (.safetensors).")
@click.option("--report", "report_path", type=click.Path(path_type=Path), required=True,
              help="Report JSON; REPORT.md and REPORT.png (per-layer widths and errors) are written next to it.")
def prune(model_spec: str | None, arch: str | None, arch_kwargs: str | None, weights: Path | None,
          trust_checkpoint: bool, speedup: float | None, recipe: str, method: str | None, lasso_rounds: int,
          allocation: str | None, global_weight: str | None, trunk: str | None, residual_correction: bool | None,
          feature_map_sampling: bool | None, widths_file: Path | None, exclude: tuple[str, ...],
          calib_data: str | None, calib_images: int | None, samples_per_image: str | None,
          input_size: tuple[int, int] | None, seed: int, no_reconstruction: bool, ridge: str | None,
          round_to: str | None, factorize: str, channel_pruning: bool, data_dir: str | None,
          val_split: str | None, test_split: str | None, preprocess: str, split_seed: int, device: str,
          memory_budget: int | None, resume_dir: Path | None, out: Path, report_path: Path) -> None:
    """Prune a model to a speed-up and write the pruned model and a JSON report.

    Under torchrun (``torchrun --nproc-per-node K -m chanprune prune ...``) each process keeps every
    K-th calibration batch, statistics are summed across processes, and rank 0 writes the files."""
    from .config import PruneConfig
    from .devices import resolve_device
    from .distributed import init_from_environment, writes_files
    from .data import first_images
    from .experiment import PROBE_IMAGES, calibration_images, compare, labelled_splits, load_model_spec
    from .io.checkpoint import save_model
    from .io.provenance import input_shape
    from .latency import measure_latency
    from .pruner import prune as run_prune
    from .summary import print_summary, write_report_files

    if speedup is None and widths_file is None:
        raise ChanpruneError("give --speedup S or --widths FILE")
    _check_outputs(out, report_path)
    widths = _read_widths(widths_file) if widths_file is not None else None
    options = dict(recipe=recipe, allocation=allocation, global_weight=global_weight, widths=widths, exclude=exclude,
                   samples_per_image=_number_or_auto(samples_per_image, "--samples-per-image", int), seed=seed,
                   reconstruct=not no_reconstruction, ridge=_number_or_auto(ridge, "--ridge", float),
                   lasso_rounds=lasso_rounds, trunk=trunk, residual_correction=residual_correction,
                   feature_map_sampling=feature_map_sampling, round_to=_number_or_auto(round_to, "--round-to", int),
                   factorize=tuple(k.strip() for k in factorize.split(",") if k.strip()),
                   channel_pruning=channel_pruning)
    config = PruneConfig(speedup=speedup, method=method, **options)
    config.validate()
    loaded = load_model_spec(model_spec, trust_checkpoint, input_size, weights, arch, json_kwargs(arch_kwargs))
    config.check_model(loaded.model)
    splits = labelled_splits(loaded, data_dir, val_split, test_split, preprocess, input_size, split_seed,
                             required=calib_data is None)  # a model's own calibration data need its data set
    images = calibration_images(loaded, calib_data, calib_images, seed, input_size, splits)
    target = resolve_device(device)
    loaded.model.to(target)
    init_from_environment()
    budget = memory_budget * 2**20 if memory_budget is not None else None
    pruned, report = run_prune(loaded.model, images, speedup, method, progress=sys.stderr.isatty(), device=target,
                               memory_budget=budget, checkpoint_dir=resume_dir, **options)
    if not writes_files():
        return
    report.config.update(model=model_spec or arch, weights=str(weights) if weights else None, data=data_dir,
                         calib_data=calib_data, calib_images=report.calibration_images,
                         input_size=list(input_shape(pruned)[1:]), widths_file=str(widths_file) if widths_file else None)
    measured = compare(loaded.model, pruned, splits.test if splits else None,
                       first_images(images, PROBE_IMAGES))
    report.accuracy_before = measured["accuracy_before"]
    report.accuracy_after = measured["accuracy_after"]
    report.logit_rel_error = measured["logit_rel_error"]
    shape = input_shape(pruned)
    report.latency_device = str(target)
    report.latency_before_ms, report.latency_after_ms = (
        1000 * measure_latency(net, shape, 1, repeats=LATENCY_REPEATS, device=str(target))
        for net in (loaded.model, pruned))
    save_model(pruned, out)
    try:
        report.save_json(report_path)
        written = write_report_files(report, report_path)
    except ChanpruneError:
        out.unlink(missing_ok=True)  # a failed run leaves no output, not a model without its report
        report_path.unlink(missing_ok=True)
        raise
    print_summary(report, out, written, resume_dir)


def _original(loaded: LoadedModel, spec: str | None, trust: bool, what: str) -> nn.Module:
    """The unpruned model ``loaded`` came from: ``spec`` if given, else what its file records."""
    from .experiment import load_model_spec
    from .io.checkpoint import load_original
    from .io.provenance import provenance

    if spec is not None:
        return load_model_spec(spec, trust).model
    record = provenance(loaded.model)
    if record is None:
        raise ChanpruneError(f"{what} needs the unpruned model; pass --original")
    return load_original(record, trust)


@main.command()
@model_options
@data_options
@click.option("--epochs", default=2, show_default=True)
@click.option("--lr", default=0.01, show_default=True,
              help="Learning rate; the run picks the best of lr/3, lr and 3·lr on validation.")
@click.option("--warmup-epochs", default=0, show_default=True)
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True)
@click.option("--weight-decay", default=5e-4, show_default=True)
@click.option("--batch-size", default=128, show_default=True)
@click.option("--distill", default=0.5, show_default=True,
              help="Weight of distillation from the original model (0: labels only).")
@click.option("--temperature", default=4.0, show_default=True)
@click.option("--original", "original_spec", default=None,
              help="The unpruned model to distill from [default: the one the pruned file records].")
@click.option("--from-scratch", is_flag=True,
              help="Baseline: re-initialise the pruned architecture and train it for --epochs instead.")
@click.option("--seed", default=0, show_default=True)
@device_option
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Fine-tuned model (.safetensors).")
def finetune(model_spec: str | None, arch: str | None, arch_kwargs: str | None, weights: Path | None,
             trust_checkpoint: bool, data_dir: str | None, val_split: str | None, test_split: str | None,
             preprocess: str, split_seed: int, epochs: int, lr: float, warmup_epochs: int, optimizer: str,
             weight_decay: float, batch_size: int, distill: float, temperature: float, original_spec: str | None,
             from_scratch: bool, seed: int, device: str, out: Path) -> None:
    """Fine-tune a pruned model on labelled data (--data, or a bundled model's own), distilling from
    the original by default; keeps the best validation epoch and learning rate."""
    from .devices import resolve_device
    from .evaluate import accuracy
    from .experiment import labelled_splits, load_model_spec
    from .finetune import finetune as run_finetune, train_from_scratch
    from .io.checkpoint import save_model
    from .train import TrainConfig

    _check_outputs(out)
    loaded = load_model_spec(model_spec, trust_checkpoint, None, weights, arch, json_kwargs(arch_kwargs))
    splits = labelled_splits(loaded, data_dir, val_split, test_split, preprocess, None, split_seed)
    if splits is None:
        raise ChanpruneError("fine-tuning needs labelled images; pass --data DIR (one subfolder per class)")
    config = TrainConfig(epochs=epochs, lr=lr, warmup_epochs=warmup_epochs, optimizer=optimizer, batch_size=batch_size,
                         weight_decay=weight_decay, distill=0.0 if from_scratch else distill,
                         temperature=temperature, seed=seed)
    config.validate()
    target = resolve_device(device)
    model = loaded.model.to(target)
    teacher = _original(loaded, original_spec, trust_checkpoint, "distillation").to(target) \
        if config.distill > 0 else None
    if from_scratch:
        model, result = train_from_scratch(model, splits.train, splits.val, config)
    else:
        result = run_finetune(model, splits.train, splits.val, config, teacher)
    save_model(model.cpu(), out)
    chosen = f"  (lr {result['lr']:g}, best epoch {result['best_epoch']})" if "lr" in result else ""
    click.echo(f"val accuracy {100 * result['val_accuracy']:.2f}%  test accuracy "
               f"{100 * accuracy(model.to(target), splits.test):.2f}%{chosen}  -> {out}")


@main.command()
@click.option("--model", "model_spec", required=True, help="Bundled name or (pruned) checkpoint path.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="ONNX file to write.")
@click.option("--program", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a torch.export archive (.pt2).")
@click.option("--opset", default=17, show_default=True)
@click.option("--trust-checkpoint", is_flag=True, help="Allow loading a pickled module, or a checkpoint that names a Python class (imports and runs code).")
def export(model_spec: str, out: Path, program: Path | None, opset: int, trust_checkpoint: bool) -> None:
    """Export to ONNX (dynamic batch), check it in ONNX Runtime, and measure its channel selects."""
    from .experiment import load_model_spec
    from .export import check_onnx, export_onnx, export_program, select_cost_onnx

    model = load_model_spec(model_spec, trust_checkpoint).model
    export_onnx(model, out, opset=opset)
    check = check_onnx(model, out)
    if not check["ok"]:
        out.unlink()
        raise ChanpruneError(f"ONNX Runtime disagrees with torch (max difference {check['max_abs_diff']:.3g}); "
                             "the file was removed")
    cost = select_cost_onnx(out)
    click.echo(f"{out}: {check['nodes']} nodes, {check['gather_nodes']} channel selects "
               f"({100 * cost['gather_share']:.1f}% of ONNX Runtime time), max difference to torch "
               f"{check['max_abs_diff']:.2g}, {cost['ms_median']:.2f} ms at batch 1")
    if program is not None:
        export_program(model, program)
        click.echo(f"{program}: torch.export archive, checked against torch")


@main.command(name="eval")
@model_options
@data_options
@click.option("--original", "original_spec", default=None,
              help="The unpruned model to compare logits with [default: the one the pruned file records].")
@click.option("--batch-size", "latency_batch", default=1, show_default=True, help="Batch size of the latency figure.")
@device_option
def eval_(model_spec: str | None, arch: str | None, arch_kwargs: str | None, weights: Path | None,
          trust_checkpoint: bool, data_dir: str | None, val_split: str | None, test_split: str | None,
          preprocess: str, split_seed: int, original_spec: str | None, latency_batch: int, device: str) -> None:
    """Top-1 / top-5 accuracy on the test part, logit error against the original, FLOPs,
    parameters and latency of a (pruned) model."""
    from .devices import resolve_device
    from .evaluate import logit_rel_error, predict_labelled, top_k
    from .experiment import labelled_splits, load_model_spec
    from .flops import count_flops, count_params
    from .io.checkpoint import has_trained_original
    from .io.provenance import input_shape, provenance
    from .latency import measure_latency

    loaded = load_model_spec(model_spec, trust_checkpoint, None, weights, arch, json_kwargs(arch_kwargs))
    shape = input_shape(loaded.model)
    if shape is None:
        raise ChanpruneError("the model records no input shape; evaluate a model saved by chanprune")
    target = resolve_device(device)
    model = loaded.model.to(target)
    record = provenance(model)
    # a model pruned from random weights has no original to compare with, unless --original names one
    original = _original(loaded, original_spec, trust_checkpoint, "the logit error").to(target) \
        if original_spec or (record.plan and has_trained_original(record)) else None
    splits = labelled_splits(loaded, data_dir, val_split, test_split, preprocess, tuple(shape[1:]), split_seed)
    rows = []
    if splits is not None:
        outputs, labels = predict_labelled([model] if original is None else [model, original], splits.test)
        logits = outputs[0]
        rows.append(f"test top-1 {100 * top_k(logits, labels, 1):.2f}%  top-5 {100 * top_k(logits, labels, 5):.2f}%  "
                    f"({len(labels)} images)")
        if original is not None:
            reference = outputs[1]
            rows.append(f"logit error vs. the original {logit_rel_error(logits, reference):.4f}  (original top-1 "
                        f"{100 * top_k(reference, labels, 1):.2f}%)")
    flops = count_flops(model, (1, *shape))
    line = f"flops {flops:,}  params {count_params(model):,}"
    if original is not None:
        line += f"  ({count_flops(original, (1, *shape)) / flops:.2f}× fewer FLOPs than the original)"
    rows.append(line)
    ms = 1000 * measure_latency(model, shape, latency_batch, repeats=LATENCY_REPEATS, device=str(target))
    latency = f"latency {ms:.2f} ms at batch {latency_batch} on {target}"
    if original is not None:
        before = 1000 * measure_latency(original, shape, latency_batch, repeats=LATENCY_REPEATS, device=str(target))
        latency += f"  (original {before:.2f} ms: {before / ms:.2f}× faster)"
    rows.append(latency)
    click.echo("\n".join(rows))


@main.command()
@model_options
@data_options
@click.option("--speedups", default="2,3,4,5", show_default=True, help="Comma-separated speed-ups.")
@click.option("--methods", default="lasso,max_response,first_k", show_default=True)
@click.option("--calib-images", type=int, default=500, show_default=True)
@click.option("--samples-per-image", default="auto", show_default=True, help="As in prune: a number or 'auto'.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--ridge", default="auto", show_default=True, help="As in prune: a number or 'auto'.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("analysis"),
              show_default=True)
@device_option
def analyze(model_spec: str | None, arch: str | None, arch_kwargs: str | None, weights: Path | None,
            trust_checkpoint: bool, data_dir: str | None, val_split: str | None, test_split: str | None,
            preprocess: str, split_seed: int, speedups: str, methods: str, calib_images: int,
            samples_per_image: str, seed: int, ridge: str, out_dir: Path, device: str) -> None:
    """Single-layer analysis (the paper's Fig. 4): each conv layer pruned alone, test error and
    reconstruction error per method and speed-up; CSV, JSON and one PNG per layer."""
    from .analysis import analyze_layers, write_analysis
    from .devices import resolve_device
    from .data import first_images
    from .experiment import calibration_images, labelled_splits, load_model_spec
    from .selection import STRATEGIES

    if model_spec is None and arch is None:
        model_spec = "vgg16-mnist"
    loaded = load_model_spec(model_spec, trust_checkpoint, None, weights, arch, json_kwargs(arch_kwargs))
    splits = labelled_splits(loaded, data_dir, val_split, test_split, preprocess, None, split_seed)
    if splits is None:
        raise ChanpruneError("single-layer analysis needs labelled test images; pass --data DIR (one subfolder per "
                             "class)")
    method_list = tuple(m.strip() for m in methods.split(","))
    unknown = [m for m in method_list if m not in STRATEGIES]
    if unknown:
        raise ChanpruneError(f"unknown methods {unknown}; use some of {', '.join(STRATEGIES)}")
    try:
        speedup_list = tuple(float(s) for s in speedups.split(","))
    except ValueError:
        raise ChanpruneError(f"--speedups must be comma-separated numbers, got {speedups!r}") from None
    if any(s < 1 for s in speedup_list):
        raise ChanpruneError("every speed-up must be >= 1")
    images = first_images(calibration_images(loaded, None, calib_images, seed, None, splits), calib_images)
    rows = analyze_layers(loaded.model.to(resolve_device(device)), images, splits.test, speedup_list, method_list,
                          _number_or_auto(samples_per_image, "--samples-per-image", int), seed,
                          ridge=_number_or_auto(ridge, "--ridge", float))
    paths = write_analysis(rows, out_dir)
    click.echo(f"wrote {len(paths)} files to {out_dir}")


@main.command()
@click.option("--calib-images", type=int, default=1000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def demo(calib_images: int, seed: int) -> None:
    """Prune the bundled VGG-16 at 2x, 4x, 5x: the paper's recipe, chanprune's default and filter
    pruning; print one table."""
    import time

    from .demo import format_table, run_demo

    start = time.perf_counter()
    rows = run_demo(calib_images=calib_images, seed=seed)
    click.echo(format_table(rows))
    click.echo(f"({calib_images} calibration images, seed {seed}, no fine-tuning; latency on this CPU; sparse fits: "
               f"layers fitted on fewer than 3 samples per kept input; {time.perf_counter() - start:.0f} s in all)")
