"""One clear error for every bad input (the table in docs/bad-inputs.md).

Each case is one bad input, given through the library and/or the command line. The library must
raise a ChanpruneError whose message names the problem and the fix, with the underlying exception
chained where there is one. The CLI must exit with code 2 and print exactly one line, starting
with ``error: ``, with no traceback, and leave no output file and no temporary file behind.
"""

from __future__ import annotations

import json
import os
import re
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn
from torch.fx.proxy import TraceError
from torch.utils.data import DataLoader, TensorDataset

from chanprune import load_model, prune
from chanprune.cli import main
from chanprune.data import load_calibration_file
from chanprune.errors import ChanpruneError
from chanprune.io.checkpoint import save_model
from chanprune.io.provenance import Provenance, attach
from chanprune.io.references import ArchRef

from conftest import make_odd, make_tiny, random_images

N_IMAGES = 12
FAST = {"samples_per_image": 2, "progress": False}


class DataDependent(nn.Module):
    """A conv net whose forward branches on the data: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if x.sum() > 0:
            x = x.relu()
        return self.fc(self.conv2(x).mean((2, 3)))


def images(n: int = N_IMAGES, shape: tuple[int, ...] = (3, 8, 8)) -> torch.Tensor:
    return random_images(n, shape)


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that only claims its size: enough for PIL's decompression-bomb check at open time."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))
    return path


def image_folder(folder: Path, sizes: list[tuple[int, int]]) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def d(tmp_path_factory) -> Path:
    """Every bad file the cases read, made once."""
    d = tmp_path_factory.mktemp("bad")
    tiny = make_tiny(0)
    attach(tiny, Provenance(ArchRef("class", "conftest:TinyCNN"), (), (3, 8, 8)))
    save_model(tiny, d / "tiny.safetensors")
    good = images().numpy()
    np.save(d / "calib.npy", good)
    for name, array in {"nan": good.copy(), "inf": good.copy()}.items():
        array[2, 1, 3, 3] = np.nan if name == "nan" else np.inf
        np.save(d / f"{name}.npy", array)
    np.save(d / "empty.npy", good[:0])
    np.save(d / "uint8.npy", (good * 40 + 128).clip(0, 255).astype(np.uint8))
    np.save(d / "rank3.npy", good[:, 0])
    np.save(d / "two_channels.npy", good[:, :2])
    np.save(d / "tiny_images.npy", images(shape=(3, 2, 2)).numpy())
    torch.save(DataDependent(), d / "data_dependent.pt")

    image_folder(d / "mixed", [(8, 8), (8, 8), (16, 12)])
    image_folder(d / "corrupt", [(8, 8)])
    (d / "corrupt" / "broken.png").write_bytes(b"not a png at all")
    image_folder(d / "bomb", [(8, 8)])
    png_header(d / "bomb" / "huge.png", 30000, 30000)
    image_folder(d / "bomb_warning", [(8, 8)])
    png_header(d / "bomb_warning" / "large.png", 10000, 10000)
    image_folder(d / "link_loop", [(8, 8), (8, 8)])
    os.symlink(".", d / "link_loop" / "loop")
    os.symlink("self.png", d / "link_loop" / "self.png")
    image_folder(d / "links", [(8, 8), (8, 8)])
    os.symlink(".", d / "links" / "loop")
    os.symlink("..", d / "links" / "up")
    (d / "empty_folder").mkdir()

    for name, text in {"malformed.json": '{"conv2": 4,', "malformed.yaml": "conv2: [4\nconv3: 2\n",
                       "list.json": "[4, 5]", "unknown.json": '{"conv22": 4}', "zero.json": '{"conv2": 0}',
                       "too_many.json": '{"conv2": 9}', "fraction.yaml": "conv2: 2.5\n",
                       "words.json": '{"conv2": "many"}'}.items():
        (d / name).write_text(text)

    blob = (d / "tiny.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(blob[: len(blob) // 2])
    (d / "corrupted.safetensors").write_bytes(blob[:8] + b"\xff" * 32 + blob[40:])  # inside the JSON header
    save_file({"w": torch.zeros(3)}, str(d / "headerless.safetensors"))
    np.save(d / "array.npy", good)
    (d / "array.npy").rename(d / "array.safetensors")
    (d / "text.safetensors").write_text("these are not weights\n")
    other = make_tiny(0)
    attach(other, Provenance(ArchRef("bundled", "resnet20-mnist"), (), (1, 32, 32)))
    save_model(other, d / "other_model.safetensors")
    (d / "a_file").write_text("a file, not a folder\n")
    return d


def make_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def tiny_args(d: Path, out: Path, *extra: Any, speedup: str | None = "1.5", calib: str = "calib.npy",
              model: str = "tiny.safetensors") -> list:
    """CLI arguments of a prune of the tiny checkpoint that writes into folder ``out``."""
    target = ["--speedup", speedup] if speedup else []
    return ["--model", d / model, "--trust-checkpoint", "--calib-data", d / calib, "--samples-per-image", "2",
            *target, *extra, "--out", out / "m.safetensors", "--report", out / "r.json"]


def widths_args(d: Path, out: Path, name: str) -> list:
    return tiny_args(d, out, "--widths", d / name, speedup=None)


def npy(d: Path, name: str) -> torch.Tensor:
    return torch.from_numpy(np.load(d / name))


def prune_tiny(data: Any = None, speedup: float | None = 1.5, **options: Any):
    return prune(make_tiny(0), images() if data is None else data, speedup, **FAST, **options)


@dataclass(frozen=True)
class Case:
    """One bad input: how the library and the CLI get it, and what the message must say."""

    name: str
    problem: str  # regex: what is wrong
    fix: str  # regex: what to do
    api: Callable[[Path], Any] | None = None
    cli: Callable[[Path, Path], list] | None = None  # (data folder, empty output folder) -> arguments
    cause: type[BaseException] | None = None  # the underlying exception the library chains


CASES = [
    # calibration data
    Case("NaN values", r"1 NaN and 0 infinite values", r"replace or drop",
         lambda d: prune_tiny(npy(d, "nan.npy")), lambda d, o: tiny_args(d, o, calib="nan.npy")),
    Case("infinite values", r"0 NaN and 1 infinite values", r"replace or drop",
         lambda d: prune_tiny(npy(d, "inf.npy")), lambda d, o: tiny_args(d, o, calib="inf.npy")),
    Case("no images", r"empty", r"at least one image",
         lambda d: prune_tiny(images()[:0]), lambda d, o: tiny_args(d, o, calib="empty.npy")),
    Case("uint8 images", r"uint8", r"convert .* float .* normalise",
         lambda d: prune_tiny(npy(d, "uint8.npy")), lambda d, o: tiny_args(d, o, calib="uint8.npy")),
    Case("3-D tensor", r"\(N, C, H, W\).*\(12, 8, 8\)", r"unsqueeze",
         lambda d: prune_tiny(images()[:, 0]), lambda d, o: tiny_args(d, o, calib="rank3.npy")),
    Case("wrong channel count", r"2 channels .* expects 3", r"convert the images to 3 channels",
         lambda d: prune_tiny(images()[:, :2]), lambda d, o: tiny_args(d, o, calib="two_channels.npy")),
    Case("images too small for the model", r"2x2 .* too small", r"runs on 8x8",
         lambda d: prune_tiny(images(shape=(3, 2, 2))), lambda d, o: tiny_args(d, o, calib="tiny_images.npy"),
         cause=RuntimeError),
    Case("no calibration data", r"NoneType", r"pass calibration images",
         lambda d: prune(make_tiny(0), None, 1.5, **FAST)),
    Case("a path instead of images", r"calib\.npy' is a path", r"load_calibration_file",
         lambda d: prune(make_tiny(0), str(d / "calib.npy"), 1.5, **FAST)),
    Case("--calib-images 0", r"--calib-images must be at least 1, got 0", r"number of images",
         cli=lambda d, o: tiny_args(d, o, "--calib-images", "0")),
    # iterables of batches
    Case("batches are dicts", r"dict \(keys 'image', 'label'\)", r"batch\['image'\]",
         lambda d: prune_tiny([{"image": images(), "label": torch.zeros(N_IMAGES)}])),
    Case("iterable yields nothing", r"empty", r"give a tensor \(N, C, H, W\)",
         lambda d: prune_tiny(DataLoader(TensorDataset(images()[:0]), batch_size=4))),
    Case("batches are numpy arrays", r"batch 0 .* numpy array", r"torch\.from_numpy",
         lambda d: prune_tiny([images().numpy()])),
    Case("a numpy array instead of a tensor", r"numpy array", r"torch\.from_numpy",
         lambda d: prune_tiny(images().numpy())),
    Case("batches are single images", r"batch 0 .* \(3, 8, 8\)", r"DataLoader",
         lambda d: prune_tiny(list(images()))),
    Case("batches of different sizes", r"differ in shape: \(3, 16, 16\) after \(3, 8, 8\)", r"resize",
         lambda d: prune_tiny([images(4), images(4, (3, 16, 16))])),
    # image folders
    Case("folder of mixed sizes", r"differ in size: .*0\.png is 8x8.*2\.png is 16x12", r"--input-size H W",
         lambda d: load_calibration_file(d / "mixed"), lambda d, o: tiny_args(d, o, calib="mixed")),
    Case("corrupt PNG", r"cannot read image .*broken\.png", r"remove it",
         lambda d: load_calibration_file(d / "corrupt"), lambda d, o: tiny_args(d, o, calib="corrupt"),
         cause=OSError),
    Case("decompression bomb", r"huge\.png.* too large", r"shrink it or remove it",
         lambda d: load_calibration_file(d / "bomb"), lambda d, o: tiny_args(d, o, calib="bomb"),
         cause=Image.DecompressionBombError),
    Case("image over PIL's warning limit", r"large\.png.* too large", r"shrink it or remove it",
         lambda d: load_calibration_file(d / "bomb_warning"),
         lambda d, o: tiny_args(d, o, calib="bomb_warning"), cause=Image.DecompressionBombWarning),
    Case("symlink loop named like an image", r"self\.png.*symbolic links", r"remove it",
         lambda d: load_calibration_file(d / "link_loop"),
         lambda d, o: tiny_args(d, o, calib="link_loop"), cause=OSError),
    Case("empty folder", r"no images", r"put images",
         lambda d: load_calibration_file(d / "empty_folder"),
         lambda d, o: tiny_args(d, o, calib="empty_folder")),
    Case("--input-size 0 0", r"--input-size .* got \(0, 0\)", r"positive",
         lambda d: load_calibration_file(d / "mixed", (0, 0)),
         lambda d, o: tiny_args(d, o, "--input-size", "0", "0", calib="mixed")),
    # speed-up
    Case("speed-up below 1", r"at least 1 .* got 0\.5", r"e\.g\. 2",
         lambda d: prune_tiny(speedup=0.5), lambda d, o: tiny_args(d, o, speedup="0.5")),
    Case("speed-up NaN", r"got nan", r"e\.g\. 2",
         lambda d: prune_tiny(speedup=float("nan")), lambda d, o: tiny_args(d, o, speedup="nan")),
    Case("speed-up inf", r"finite number .* got inf", r"e\.g\. 2",
         lambda d: prune_tiny(speedup=float("inf")), lambda d, o: tiny_args(d, o, speedup="inf")),
    Case("unreachable speed-up", r"1000x is out of reach: the most .* is \d+\.\d\dx", r"ask for at most",
         lambda d: prune_tiny(speedup=1000.0), lambda d, o: tiny_args(d, o, speedup="1000")),
    Case("--round-to too large", r"out of reach: the most .* is 1\.00x with --round-to 64", r"lower --round-to",
         lambda d: prune_tiny(round_to=64), lambda d, o: tiny_args(d, o, "--round-to", "64")),
    Case("--round-to 0", r"round_to must be a positive integer or .auto., got 0", r"1 \(no rounding\)",
         lambda d: prune_tiny(round_to=0), lambda d, o: tiny_args(d, o, "--round-to", "0")),
    Case("--samples-per-image 0", r"samples per image must be at least 1, got 0", r"--samples-per-image",
         lambda d: prune(make_tiny(0), images(), 1.5, samples_per_image=0, progress=False),
         lambda d, o: tiny_args(d, o, "--samples-per-image", "0")),
    Case("--ridge -1", r"ridge must be a number >= 0 or 'auto', got -1", r"use e\.g\. 1e-6 or 'auto'",
         lambda d: prune_tiny(ridge=-1.0), lambda d, o: tiny_args(d, o, "--ridge", "-1")),
    Case("--round-to abc", r"--round-to must be a whole number or 'auto', got 'abc'", r"",
         cli=lambda d, o: tiny_args(d, o, "--round-to", "abc")),
    Case("unknown recipe", r"unknown recipe 'fast'", r"use one of default, paper",
         lambda d: prune_tiny(recipe="fast")),
    Case("--speedup abc", r"'abc' is not a valid float", r"see .*prune --help",
         cli=lambda d, o: tiny_args(d, o, speedup="abc")),
    # widths
    Case("widths file is malformed JSON", r"not valid JSON", r"mapping such as",
         cli=lambda d, o: widths_args(d, o, "malformed.json")),
    Case("widths file is malformed YAML", r"not valid YAML .*line \d+", r"mapping such as",
         cli=lambda d, o: widths_args(d, o, "malformed.yaml")),
    Case("widths file is not a mapping", r"holds a list, not a mapping", r"e\.g\.",
         lambda d: prune_tiny(speedup=None, widths=[4, 5]), lambda d, o: widths_args(d, o, "list.json")),
    Case("widths name an unknown layer", r"unknown layer 'conv22'.*did you mean 'conv2'", r"one of: conv2, conv3",
         lambda d: prune_tiny(speedup=None, widths={"conv22": 4}),
         lambda d, o: widths_args(d, o, "unknown.json")),
    Case("widths ask for 0 channels", r"width of 'conv2' .* got 0", r"between 1 and 8",
         lambda d: prune_tiny(speedup=None, widths={"conv2": 0}), lambda d, o: widths_args(d, o, "zero.json")),
    Case("widths ask for more than all channels", r"width of 'conv2' .* got 9", r"between 1 and 8",
         lambda d: prune_tiny(speedup=None, widths={"conv2": 9}),
         lambda d, o: widths_args(d, o, "too_many.json")),
    Case("widths are fractions", r"width of 'conv2' .* got 2\.5", r"between 1 and 8",
         lambda d: prune_tiny(speedup=None, widths={"conv2": 2.5}),
         lambda d, o: widths_args(d, o, "fraction.yaml")),
    Case("widths are words", r"width of 'conv2' .* got 'many'", r"between 1 and 8",
         lambda d: prune_tiny(speedup=None, widths={"conv2": "many"}),
         lambda d, o: widths_args(d, o, "words.json")),
    Case("widths file missing", r"cannot read widths file .*missing\.json", r"give a JSON/YAML file",
         cli=lambda d, o: widths_args(d, o, "missing.json")),
    # --exclude, models
    Case("--exclude matches no layer", r"exclude glob 'conv9\*' matches no layer",
         r"fix the glob \(did you mean conv\d",
         lambda d: prune_tiny(exclude=("conv9*",)), lambda d, o: tiny_args(d, o, "--exclude", "conv9*")),
    Case("untraceable model", r"cannot trace DataDependent .*symbolically traced variables cannot be used as "
         r"inputs to control flow", r"remove data-dependent control flow",
         lambda d: prune(DataDependent(), images(), 1.5, **FAST),
         lambda d, o: tiny_args(d, o, model="data_dependent.pt"), cause=TraceError),
    Case("not a model", r"must be a torch\.nn\.Module, got str", r"load it first",
         lambda d: prune("tiny.safetensors", images(), 1.5, **FAST)),
    # checkpoints
    Case("truncated checkpoint", r"corrupt or not a safetensors file", r"re-create it",
         lambda d: load_model(d / "truncated.safetensors"),
         lambda d, o: tiny_args(d, o, model="truncated.safetensors"), cause=SafetensorError),
    Case("corrupted checkpoint header", r"corrupt or not a safetensors file", r"re-create it",
         lambda d: load_model(d / "corrupted.safetensors"),
         lambda d, o: tiny_args(d, o, model="corrupted.safetensors"), cause=SafetensorError),
    Case("safetensors without a chanprune header", r"without a chanprune model header", r"save models with",
         lambda d: load_model(d / "headerless.safetensors"),
         lambda d, o: tiny_args(d, o, model="headerless.safetensors")),
    Case(".npy renamed .safetensors", r"corrupt or not a safetensors file", r"re-create it",
         lambda d: load_model(d / "array.safetensors"),
         lambda d, o: tiny_args(d, o, model="array.safetensors"), cause=SafetensorError),
    Case("text file as checkpoint", r"corrupt or not a safetensors file", r"re-create it",
         lambda d: load_model(d / "text.safetensors"),
         lambda d, o: tiny_args(d, o, model="text.safetensors"), cause=SafetensorError),
    Case("checkpoint of another model", r"do not match", r"from another model",
         lambda d: load_model(d / "tiny.safetensors", model=make_odd(0)),
         lambda d, o: tiny_args(d, o, model="other_model.safetensors"), cause=RuntimeError),
    # outputs (the model given is missing: output checks come before any work)
    Case("--out under a file", r"a_file.* is a file, not a folder", r"choose another path",
         lambda d: save_model(make_tiny(0), d / "a_file" / "m.safetensors"),
         lambda d, o: ["--model", d / "missing.safetensors", "--speedup", "2",
                       "--out", d / "a_file" / "m.safetensors", "--report", o / "r.json"]),
    Case("--report under a file", r"--report .*a_file.* is a file, not a folder", r"choose another path",
         cli=lambda d, o: ["--model", d / "missing.safetensors", "--speedup", "2",
                           "--out", o / "m.safetensors", "--report", d / "a_file" / "r.json"]),
    Case("--report is the --out file", r"--report and --out are the same file", r"own path",
         cli=lambda d, o: ["--model", d / "missing.safetensors", "--speedup", "2",
                           "--out", o / "m.safetensors", "--report", o / "." / "m.safetensors"]),
    Case("--out not .safetensors", r"--out must end in \.safetensors, got .*m\.pt", r"name it .*m\.safetensors",
         cli=lambda d, o: ["--model", d / "missing.safetensors", "--speedup", "2",
                           "--out", o / "m.pt", "--report", o / "r.json"]),
    Case("--out is a folder", r"--out .*dir\.safetensors. is a folder", r"give a file name",
         cli=lambda d, o: ["--model", d / "missing.safetensors", "--speedup", "2",
                           "--out", make_folder(o / "dir.safetensors"), "--report", o / "r.json"]),
]

API_CASES = [c for c in CASES if c.api is not None]
CLI_CASES = [c for c in CASES if c.cli is not None]


def check_message(case: Case, message: str) -> None:
    assert re.search(case.problem, message), f"problem {case.problem!r} not in: {message}"
    assert re.search(case.fix, message), f"fix {case.fix!r} not in: {message}"
    assert "\n" not in message, message


@pytest.mark.parametrize("case", API_CASES, ids=[c.name for c in API_CASES])
def test_library_raises_one_clear_chanprune_error(case: Case, d: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(ChanpruneError) as info:
            case.api(d)
    check_message(case, str(info.value))
    if case.cause is not None:
        assert isinstance(info.value.__cause__, case.cause), repr(info.value.__cause__)


def files_under(*folders: Path) -> set[Path]:
    return {Path(root) / f for folder in folders for root, _, names in os.walk(folder) for f in names}


def run_cli(args: list) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return CliRunner().invoke(main, ["prune", *[str(a) for a in args]])


def assert_one_error_line(result: Any) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0][len("error: "):]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.name for c in CLI_CASES])
def test_cli_exits_2_with_one_line_and_leaves_no_file(case: Case, d: Path, tmp_path: Path):
    out = tmp_path / "out"
    before = files_under(d, tmp_path)
    result = run_cli(case.cli(d, out))
    check_message(case, assert_one_error_line(result))
    assert files_under(d, tmp_path) == before


# ---------------------------------------------------------------- decisions that accept the input


def test_loader_of_image_label_tuples_is_accepted():
    loader = DataLoader(TensorDataset(images(), torch.zeros(N_IMAGES)), batch_size=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruned, report = prune(make_tiny(0), loader, 1.5, **FAST)
    assert abs(report.speedup_achieved / 1.5 - 1) <= 0.02


def test_speedup_of_one_is_a_no_op(d: Path, tmp_path: Path):
    result = run_cli(tiny_args(d, tmp_path, speedup="1"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["flops_after"] == report["flops_before"]


def test_symlinked_folders_are_not_followed(d: Path):
    # `loop -> .` and `up -> ..` would make a recursive walk that follows links endless
    assert load_calibration_file(d / "links").shape == (2, 3, 8, 8)


# ---------------------------------------------------------------- a folder that cannot be written


def test_read_only_out_folder_is_refused_before_any_work(d: Path, tmp_path: Path, monkeypatch):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):  # root ignores the mode bits: make os.access answer as for a user
            real_access = os.access
            monkeypatch.setattr("chanprune.files.os.access",
                                lambda path, mode: Path(path) != folder and real_access(path, mode))
        # the model given does not even exist: the output check comes first
        result = run_cli(["--model", d / "missing.safetensors", "--speedup", "2",
                          "--out", folder / "m.safetensors", "--report", tmp_path / "r.json"])
        message = assert_one_error_line(result)
        assert re.search(r"cannot write --out .*: folder .*read_only' is not writable; choose a writable folder",
                         message), message
        with pytest.raises(ChanpruneError, match="is not writable; choose a writable folder"):
            save_model(make_tiny(0), folder / "m.safetensors")
        assert list(folder.iterdir()) == [] and not (tmp_path / "r.json").exists()
    finally:
        folder.chmod(0o755)


def test_a_write_that_fails_after_the_work_leaves_nothing(d: Path, tmp_path: Path, monkeypatch):
    def refuse(tensors, filename, metadata=None):
        raise PermissionError(13, "Permission denied", filename)

    monkeypatch.setattr("chanprune.io.state_file.save_file", refuse)
    result = run_cli(tiny_args(d, tmp_path))
    message = assert_one_error_line(result)
    assert re.search(r"cannot write .*m\.safetensors.* \(Permission denied\); choose a writable folder", message)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ChanpruneError, match="Permission denied") as info:
        save_model(make_tiny(0), tmp_path / "m.safetensors")
    assert isinstance(info.value.__cause__, PermissionError)
    assert list(tmp_path.iterdir()) == []


def test_failed_report_write_removes_the_model_file(d: Path, tmp_path: Path, monkeypatch):
    def refuse(path, text):
        raise ChanpruneError(f"cannot write {str(path)!r} (No space left on device); choose a writable folder")

    monkeypatch.setattr("chanprune.report.write_text_atomic", refuse)
    result = run_cli(tiny_args(d, tmp_path))
    assert "No space left" in assert_one_error_line(result)
    assert list(tmp_path.iterdir()) == []
