"""Tensor names of BiT in timm and Hugging Face transformers, and how they map onto ours.

Pure functions on names, shapes and tensors: reading files, and deciding what a file may be
trusted with, is `checkpoint/`'s job.

All three hold the same parameters in the same PyTorch layouts:

    ours                         timm (resnetv2_*_bit)               transformers (BitForImageClassification)
    root.conv.weight             stem.conv.weight                    bit.embedder.convolution.weight
    stages.S.U.norm1.weight      stages.S.blocks.U.norm1.weight      bit.encoder.stages.S.layers.U.norm1.weight
    stages.S.U.downsample.weight stages.S.blocks.U.downsample.conv.weight  (same under bit.encoder...layers.U)
    norm.weight                  norm.weight                         bit.norm.weight
    head.weight [K, C, 1, 1]     head.fc.weight [K, C, 1, 1]         classifier.1.weight [K, C] (a Linear)

A transformers `BitModel` (no head) saves the same names without the `bit.` prefix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

TIMM = "timm"
TRANSFORMERS = "transformers"
LIBRARIES = (TIMM, TRANSFORMERS)


@dataclass(frozen=True)
class Layout:
    """Which library's names a state dict uses (and, for transformers, under which prefix)."""

    library: str
    prefix: str = ""  # transformers: "bit." (BitForImageClassification, BitBackbone) or "" (BitModel)

    @property
    def root_key(self) -> str:
        return "stem.conv.weight" if self.library == TIMM else f"{self.prefix}embedder.convolution.weight"

    @property
    def head_bias_key(self) -> str:
        return "head.fc.bias" if self.library == TIMM else "classifier.1.bias"

    @property
    def unit_pattern(self) -> re.Pattern:
        """Matches a unit's tensors; groups: stage index, unit index."""
        if self.library == TIMM:
            return re.compile(r"^stages\.(\d{1,3})\.blocks\.(\d{1,3})\.")
        return re.compile(rf"^{re.escape(self.prefix)}encoder\.stages\.(\d{{1,3}})\.layers\.(\d{{1,3}})\.")

    def describe(self) -> str:
        if self.library == TIMM:
            return "timm ResNet-v2 (BiT) state dict"
        return f"transformers {'BitModel' if not self.prefix else 'BitForImageClassification'} state dict"


def detect(names: set[str] | list[str]) -> Layout | None:
    """The layout a set of tensor names is in, or None if it is neither library's BiT."""
    names = set(names)
    if "stem.conv.weight" in names or any(n.startswith("stem.conv1.") for n in names):
        return Layout(TIMM)
    for prefix in ("bit.", ""):
        if f"{prefix}embedder.convolution.weight" in names:
            return Layout(TRANSFORMERS, prefix)
    return None


def not_bit_reason(layout: Layout, names: set[str]) -> str | None:
    """Why a state dict in `layout` is a relative of BiT that computes something else, if it is."""
    if layout.library == TIMM:
        if any(n.endswith(".running_mean") for n in names):
            return "a timm ResNet-v2 with BatchNorm, not BiT's GroupNorm + Weight Standardization"
        if any(n.startswith("stem.conv1.") for n in names):
            return "a timm ResNet-v2 with a deep (3-conv) stem, not BiT's 7x7 root"
        if "stem.norm.weight" in names:
            return "a timm ResNet-v2 without pre-activation (the ViT-hybrid backbone), not BiT's pre-activation units"
        return None
    p = layout.prefix
    if f"{p}embedder.norm.weight" in names or (f"{p}encoder.stages.0.layers.0.norm1.weight" in names
                                                and f"{p}norm.weight" not in names):
        return ("a transformers BiT with layer_type='bottleneck' (post-activation units, the ViT-hybrid "
                "backbone), not BiT's pre-activation ResNet-v2")
    return None


def count_units(layout: Layout, names: set[str] | list[str]) -> dict[int, int]:
    """Stage index -> number of units, from the highest unit index named in each stage."""
    units: dict[int, int] = {}
    pattern = layout.unit_pattern
    for name in names:
        match = pattern.match(name)
        if match:
            stage, unit = int(match.group(1)), int(match.group(2))
            units[stage] = max(units.get(stage, 0), unit + 1)
    return units


def foreign_name(ours: str, layout: Layout) -> str:
    """Our parameter name in `layout`."""
    if ours.startswith("head."):
        leaf = ours.removeprefix("head.")
        return f"head.fc.{leaf}" if layout.library == TIMM else f"classifier.1.{leaf}"
    body = layout.prefix if layout.library == TRANSFORMERS else ""
    if ours == "root.conv.weight":
        return "stem.conv.weight" if layout.library == TIMM else f"{body}embedder.convolution.weight"
    if ours.startswith("norm."):
        return f"{body}{ours}"
    match = re.fullmatch(r"stages\.(\d+)\.(\d+)\.(.+)", ours)
    if not match:
        raise ValueError(f"not a BiT parameter name: {ours!r}")
    stage, unit, leaf = match.groups()
    if leaf == "downsample.weight":
        leaf = "downsample.conv.weight"
    if layout.library == TIMM:
        return f"stages.{stage}.blocks.{unit}.{leaf}"
    return f"{body}encoder.stages.{stage}.layers.{unit}.{leaf}"


def foreign_shape(ours: str, shape: tuple[int, ...], layout: Layout) -> tuple[int, ...]:
    """The shape our tensor has in `layout`: the same, except transformers' Linear head."""
    if layout.library == TRANSFORMERS and ours == "head.weight":
        return tuple(shape[:2])
    return tuple(shape)


def name_table(expected: dict[str, torch.Size], layout: Layout) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Our name -> (name, shape) in `layout`, for every tensor of `expected` (our state dict's shapes)."""
    return {ours: (foreign_name(ours, layout), foreign_shape(ours, tuple(shape), layout))
            for ours, shape in expected.items()}


def to_ours(tensor: torch.Tensor, target: torch.Size) -> torch.Tensor:
    """A tensor read from the library's file, in our layout (its shape already checked) and fp32."""
    return tensor.reshape(target).to(torch.float32)


def eps_matched(state: dict[str, torch.Tensor], kernels: set[str], eps: float, target_eps: float
                ) -> dict[str, torch.Tensor]:
    """Kernels rescaled so that standardising them with `target_eps` gives what `eps` gave.

    Weight standardisation ignores a kernel's scale except through eps:
    (c w - c mean) / sqrt(c^2 var + target) equals (w - mean) / sqrt(var + eps) for
    c = sqrt(target / eps). So scaling every standardised kernel by c makes the library's model
    compute exactly ours."""
    scale = (target_eps / eps) ** 0.5
    if scale == 1.0:
        return dict(state)
    return {name: tensor * scale if name in kernels else tensor for name, tensor in state.items()}


def from_ours(state: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """Our state dict under `layout`'s names and shapes, ready to save for that library."""
    out = {}
    for ours, tensor in state.items():
        shape = foreign_shape(ours, tuple(tensor.shape), layout)
        out[foreign_name(ours, layout)] = tensor.detach().to("cpu").reshape(shape).contiguous()
    return out
