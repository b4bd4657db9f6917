"""Weights files: the authors' and big_vision `.npz` (read), our `.safetensors` (read and write), and
timm / Hugging Face transformers BiT `.safetensors` state dicts and folders (read).

Nothing here ever unpickles: `.npz` is read with `allow_pickle=False`, and pickle-based PyTorch
files are recognised by their bytes and refused with an explanation.

Loading is two-phase: first every tensor name and shape in the file is checked against the model
(and the file's architecture is inferred, so a mismatch reads as "this file is R101x3, you asked
for R50x1"); only then is anything copied.

One module a job; this one sends each file to its reader:
    sniff.py             what a path is (npz, safetensors, a checkpoint folder), pickles refused
    npz.py               the authors' and big_vision layouts: two name maps, one table builder
    safetensors_file.py  any .safetensors header and tensors
    ours.py              our metadata, checked; save_checkpoint
    foreign.py           timm / transformers (names in ../interop.py, config.json in ../foreign_config.py)
    summary.py           FileSummary and the bounds every reader shares
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import interop
from ..resnetv2 import ResNetV2
from . import foreign, npz, ours
from .foreign import BIGTRANSFER_KEY
from .ours import FORMAT_TAG, save_checkpoint
from .safetensors_file import read_header
from .sniff import is_checkpoint_folder, sniff_format, weights_file
from .summary import FileSummary

__all__ = ["BIGTRANSFER_KEY", "FORMAT_TAG", "FileSummary", "is_checkpoint_folder", "load_state_dict", "read_metadata",
           "save_checkpoint", "sniff_format", "summarize", "weights_file"]


def summarize(path: Path) -> FileSummary:
    """Inspect a weights file or checkpoint folder (architecture, head size, norm) without building a model."""
    path = Path(path)
    if sniff_format(path) == "npz":
        return npz.summarize(path)
    header = read_header(weights_file(path))
    return ours.summarize(header) if ours.is_ours(header) else foreign.summarize(path, header)


def load_state_dict(path: Path, model: ResNetV2, load_head: bool) -> dict[str, torch.Tensor]:
    """Read `path` into a state dict for `model`, after checking every name and shape.

    The file's architecture must equal the model's; `load_head=False` leaves the head out
    (used when the class count changes). Raises BigTransferError on any mismatch, before
    anything is handed back to be copied.
    """
    path = Path(path)
    if sniff_format(path) == "npz":
        return npz.load_state_dict(path, model, load_head)
    header = read_header(weights_file(path))
    reader = ours if ours.is_ours(header) else foreign
    return reader.load_state_dict(path, header, model, load_head)


def read_metadata(path: Path) -> dict:
    """Decoded metadata of a weights file (format, class names, resolution, ...), each field checked."""
    summary = summarize(path)
    decoded: dict = {"architecture": summary.arch.name, "norm": summary.norm, "num_classes": summary.num_classes,
                     "format": summary.source_format, "ws_eps": summary.ws_eps}
    if summary.source_format in interop.LIBRARIES:
        return {**decoded, **summary.details}
    return {**decoded, **ours.decoded_metadata(summary, weights_file(path))}
