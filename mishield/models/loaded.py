"""What mishield knows about a loaded classifier: the module and where it came from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from mishield.preprocessing import Preprocessing


@dataclass
class LoadedModel:
    """A classifier ready to use (eval mode, CPU) and everything known about where it came from."""

    model: nn.Module
    arch: str | None
    num_classes: int | None
    preprocessing: Preprocessing
    recipe: dict | None = None
    source: Path | None = None
    source_sha256: str | None = None
    kind: str = "state_dict"  # "state_dict" | "mishield" | "pickled_module" | "torchscript" | "exported" | "spec"
    supports_surgery: bool = True
