"""What a weights file holds (`FileSummary`), the bounds no BiT file exceeds, and the tensors a
summary or a model implies: what every format's reader shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...errors import BigTransferError
from ..resnetv2 import WS_EPS, ArchSpec, ModelConfig, ResNetV2

MAX_ARRAYS = 10_000  # tensors in one file: the largest released file (R152x4) has about 500
MAX_UNITS = 100  # per stage (R152 has 36)
MAX_WIDTH = 64  # times 64 root channels (R152x4 has 4)


@dataclass
class FileSummary:
    """What a weights file holds, inferred from its tensors (and metadata, when present)."""

    arch: ArchSpec
    num_classes: int | None  # None: the file has no head
    norm: str = "gn_ws"
    groups: int = 32
    metadata: dict[str, str] = field(default_factory=dict)
    ws_eps: float = WS_EPS
    source_format: str = "bigtransfer"  # authors | big_vision | bigtransfer | timm | transformers
    details: dict = field(default_factory=dict)  # timm / transformers: checked class_names, resolution, ...

    def model_config(self, num_classes: int | None = None) -> ModelConfig:
        """The structure of a model that holds this file (`num_classes` replaces the file's head)."""
        return ModelConfig(self.arch, num_classes or self.num_classes or 1, self.norm, self.groups, self.ws_eps)

    def describe(self) -> str:
        """The architecture and head, for a message: 'R50x1 (10 classes)'."""
        head = f"{self.num_classes} classes" if self.num_classes else "no head"
        return f"{self.arch.name} ({head})"


def summary_state(summary: FileSummary) -> dict[str, torch.Tensor]:
    """Every tensor a model of this summary holds, shape and dtype (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = ResNetV2(summary.model_config())
    return {k: v for k, v in model.state_dict().items() if summary.num_classes is not None or not k.startswith("head.")}


def summary_shapes(summary: FileSummary) -> dict[str, torch.Size]:
    """Every tensor a model of this summary holds, by shape."""
    return {k: v.shape for k, v in summary_state(summary).items()}


def model_state(model: ResNetV2, load_head: bool) -> dict[str, torch.Tensor]:
    """The tensors of `model` a file must supply: all of them, or all but the head."""
    return {k: v for k, v in model.state_dict().items() if load_head or not k.startswith("head.")}


def model_shapes(model: ResNetV2, load_head: bool) -> dict[str, torch.Size]:
    """The shapes of the tensors of `model` a file must supply."""
    return {k: v.shape for k, v in model_state(model, load_head).items()}


def check_same_architecture(summary: FileSummary, model: ResNetV2, path: Path) -> None:
    """Refuse a file whose architecture or normalisation is not the model's, naming both."""
    config = model.config
    if summary.arch != config.arch:
        raise BigTransferError(f"{path}: this file is {summary.describe()}, you asked for {config.arch.name}")
    if (summary.norm, summary.groups) != (config.norm, config.groups):
        raise BigTransferError(
            f"{path}: this file is a norm={summary.norm} (groups {summary.groups}) model, "
            f"you asked for norm={config.norm} (groups {config.groups})"
        )
