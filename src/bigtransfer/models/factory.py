"""`create_model`: one entry point from a name (released or architecture) and optional weights."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import BigTransferError
from . import checkpoint, zoo
from .resnetv2 import ModelConfig, ResNetV2, parse_arch

DEFAULT_NUM_CLASSES = 1000


def resolve_weights(spec: str | Path) -> Path:
    """Run directory -> its final.safetensors; released name -> cached file; else the path itself
    (a weights file, or a timm / transformers checkpoint folder)."""
    path = Path(spec)
    if path.is_dir():
        final = path / "final.safetensors"
        if final.is_file():
            return final
        if checkpoint.is_checkpoint_folder(path):
            return path
        raise BigTransferError(f"{path}: no final.safetensors in this run directory (is the run finished?)")
    entry = zoo.lookup(str(spec)) if not path.exists() else None
    return zoo.require_cached(entry) if entry else path


def model_source(model: str, weights: str | Path | None) -> tuple[str, str | None]:
    """(name for create_model, weights) from a --model that may also be a run directory or a file."""
    if weights is None and Path(model).exists():
        path = resolve_weights(model)
        return checkpoint.summarize(path).arch.name, str(path)
    return model, None if weights is None else str(weights)


def resolve_arch_name(name: str) -> str:
    """The architecture behind a released name (`BiT-M-R50x1` -> `R50x1`), or the name itself."""
    entry = zoo.lookup(name)
    return entry.arch_name if entry else parse_arch(name).name


def create_model(
    name: str,
    num_classes: int | None = None,
    weights: str | Path | None = None,
    zero_head: bool = True,
    *,
    norm: str = "gn_ws",
    groups: int = 32,
) -> ResNetV2:
    """Build a BiT model; load weights from a released name's cached file or from `weights`.

    `name` is a released name (`BiT-M-R50x1`, which needs its file in the cache; see
    `bigtransfer download`) or an architecture (`R50x1`, `R26x0.5`, ...; random init unless
    `weights` is given). `weights` is an authors' or big_vision `.npz`, a bigtransfer `.safetensors`,
    a timm BiT state dict (`.safetensors`), or a transformers BiT checkpoint (a folder with
    config.json and model.safetensors, or the model.safetensors itself).
    If `num_classes` differs from the file's head, the head is replaced (zeros if `zero_head`).
    """
    entry = zoo.lookup(name)
    arch = entry.arch if entry else parse_arch(name)
    if entry is not None and weights is None:
        weights = zoo.require_cached(entry)
    if weights is None:
        classes = num_classes or DEFAULT_NUM_CLASSES
        return ResNetV2(ModelConfig(arch, classes, norm, groups), zero_head=zero_head)

    summary = checkpoint.summarize(Path(weights))
    if summary.arch != arch:
        raise BigTransferError(f"{weights}: this file is {summary.describe()}, you asked for {arch.name}")
    if summary.num_classes is None and num_classes is None:
        raise BigTransferError(f"{weights}: the file has no head; pass num_classes for the new head")
    classes = num_classes or summary.num_classes
    # Built on the meta device: the file supplies every body tensor, so random init would be
    # wasted time and memory (seconds and gigabytes for R152x4).
    with torch.device("meta"):
        model = ResNetV2(summary.model_config(classes), zero_head=zero_head)
    keep_head = summary.num_classes == classes
    state = checkpoint.load_state_dict(Path(weights), model, load_head=keep_head)
    for key, tensor in state.items():
        # Into torch's own (64-byte aligned) memory, one tensor at a time: a file's tensors sit
        # wherever its header ends, and CPU reductions (weight standardization) round differently
        # at different alignments, so a reloaded model would differ from the saved one in the last bit.
        state[key] = tensor.clone(memory_format=torch.contiguous_format)
    model.load_state_dict(state, strict=keep_head, assign=True)
    if not keep_head:
        model.reset_head(classes, zero_init=zero_head)
    return model
