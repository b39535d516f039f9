"""Bundled reference models: architectures plus the checkpoints this project trained itself."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from ..errors import ChanpruneError
from ..io.provenance import Provenance, attach
from ..io.references import ArchRef
from ..io.state_file import load_state_file
from .resnet import resnet20, resnet50_small, resnet56
from .srresnet import msrresnet_small
from .vgg import vgg16_half
from .xception import xception50_small

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"


@dataclass(frozen=True)
class BundledModel:
    """A reference architecture, the data it is trained on ("mnist": classification of the bundled
    digits; "photos": x2 super-resolution of the bundled photographs), and where its checkpoint lives."""

    name: str
    build: Callable[[], nn.Module]
    dataset: str
    input_size: tuple[int, int]
    in_chans: int

    @property
    def checkpoint(self) -> Path:
        return CHECKPOINT_DIR / f"{self.name}.safetensors"


BUNDLED: dict[str, BundledModel] = {
    "vgg16-mnist": BundledModel("vgg16-mnist", vgg16_half, "mnist", (32, 32), 1),
    "resnet20-mnist": BundledModel("resnet20-mnist", resnet20, "mnist", (32, 32), 1),
    "resnet56-mnist": BundledModel("resnet56-mnist", resnet56, "mnist", (32, 32), 1),
    "resnet50-mnist": BundledModel("resnet50-mnist", resnet50_small, "mnist", (32, 32), 1),
    "xception50-mnist": BundledModel("xception50-mnist", xception50_small, "mnist", (32, 32), 1),
    # x2 super-resolution of the bundled photographs (chanprune.photos): FCP's second experiment
    "msrresnet-photos": BundledModel("msrresnet-photos", msrresnet_small, "photos", (32, 32), 3),
}


def bundled_model(name: str) -> BundledModel:
    """The registry entry for ``name``; a clear error lists the known names."""
    if name not in BUNDLED:
        raise ChanpruneError(f"unknown bundled model {name!r}; known: {', '.join(sorted(BUNDLED))}")
    return BUNDLED[name]


def create_model(name: str, pretrained: bool = True) -> nn.Module:
    """Build a bundled model; with ``pretrained`` load the checkpoint shipped in the package."""
    entry = bundled_model(name)
    model = entry.build()
    if pretrained:
        if not entry.checkpoint.exists():
            raise ChanpruneError(f"no trained checkpoint for {name!r} at {entry.checkpoint}; "
                                 f"run `chanprune train --model {name}` to create it")
        model.load_state_dict(load_state_file(entry.checkpoint)[0])
    return attach(model, Provenance(ArchRef("bundled", name), (), (entry.in_chans, *entry.input_size))).eval()
