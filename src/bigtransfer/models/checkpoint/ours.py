"""Our `.safetensors`: the metadata that rebuilds and uses a model (architecture, norm, head, class
names, resolution, value range, provenance), each field checked against sane bounds and against the
tensors; and the save, streamed through the one atomic write."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import torch

from ...atomic import write_safetensors
from ...errors import BigTransferError
from ...safe_text import load_json, quoted
from ..resnetv2 import NORMS, WS_EPS, ArchSpec, ResNetV2, parse_arch
from .safetensors_file import FLOAT_DTYPES, INT_DTYPES, Header, read_safetensors
from .summary import (
    MAX_UNITS,
    MAX_WIDTH,
    FileSummary,
    check_same_architecture,
    model_state,
    summary_state,
)

FORMAT_TAG = "bigtransfer"
DEFAULT_VALUE_RANGE = (-1.0, 1.0)
MAX_RESOLUTION = 16384
MAX_WS_EPS = 1e-3  # far above any library's (1e-10 .. 1e-6): anything larger is damage, not a choice


def is_ours(header: Header) -> bool:
    """Was the file written by `save_checkpoint` (rather than by timm, transformers or another program)?"""
    return header.metadata.get("format") == FORMAT_TAG


def summarize(header: Header) -> FileSummary:
    """The architecture from our metadata, each field checked against sane bounds and the tensors:
    a file whose tensors are another architecture's (or not numbers) is refused, not described."""
    metadata, path = header.metadata, header.path
    if not is_ours(header):
        raise BigTransferError(
            f"{path}: a .safetensors file without bigtransfer metadata; "
            f"save models with bigtransfer.save_checkpoint so the architecture is recorded"
        )

    def damaged(what: str) -> BigTransferError:
        return BigTransferError(f"{path}: damaged bigtransfer metadata ({what})")

    try:
        units = tuple(int(u) for u in metadata["units"].split(","))
        width = float(metadata["width"])
        norm, groups = metadata["norm"], int(metadata["groups"])
        declared_classes = int(metadata["num_classes"])
        ws_eps = float(metadata.get("ws_eps", WS_EPS))  # files written before it was recorded used WS_EPS
    except (KeyError, ValueError) as err:
        raise damaged(str(err)) from None
    if not 0 < ws_eps <= MAX_WS_EPS:
        raise damaged(f"ws_eps {quoted(metadata['ws_eps'])}")
    if len(units) != 4 or not all(1 <= u <= MAX_UNITS for u in units):
        raise damaged(f"units {quoted(metadata['units'])}")
    if not 0 < width <= MAX_WIDTH or (64 * width) % 1:
        raise damaged(f"width {quoted(metadata['width'])}")
    if norm not in NORMS or not 1 <= groups <= 64 * width:
        raise damaged(f"norm {quoted(norm)}, groups {groups}")
    root = header.shapes.get("root.conv.weight")
    if root != (round(64 * width), 3, 7, 7):
        raise damaged(f"width {width:g} but root.conv.weight has shape {quoted(root)}")
    head = header.shapes.get("head.bias")
    num_classes = head[0] if head is not None and len(head) == 1 else None
    if head is not None and declared_classes != num_classes:
        raise damaged(f"num_classes {declared_classes} but head.bias has shape {quoted(head)}")
    summary = FileSummary(ArchSpec(units, width), num_classes, norm, groups, metadata, ws_eps)  # type: ignore[arg-type]
    if "architecture" in metadata and _parsed_arch(metadata["architecture"]) != summary.arch:
        raise damaged(f"architecture {quoted(metadata['architecture'])} but units and width say {summary.arch.name}")
    try:  # the tensors must be the model the metadata describes
        _check_tensors(header, summary_state(summary))
    except BigTransferError as err:
        raise damaged(f"it describes {summary.arch.name} ({norm}), but {str(err).removeprefix(f'{path}: ')}") \
            from None
    decoded_metadata(summary, path)  # every JSON field must parse and fit the tensors
    return summary


def load_state_dict(path: Path, header: Header, model: ResNetV2, load_head: bool) -> dict[str, torch.Tensor]:
    """A state dict for `model` from one of our files (`path`, whose weights `header` describes): checked, then read."""
    summary = summarize(header)
    check_same_architecture(summary, model, path)
    expected = model_state(model, load_head)
    _check_tensors(header, expected)
    return read_safetensors(header.path, list(expected))


def _parsed_arch(name: str) -> ArchSpec | None:
    try:
        return parse_arch(name)
    except BigTransferError:
        return None


def _check_tensors(header: Header, expected: dict[str, torch.Tensor]) -> None:
    """Every tensor `expected` names is in the file with its shape and a dtype of its kind (floating-point
    for weights; an integer for a BatchNorm's step counter), and the file holds nothing else but a head."""
    shapes, dtypes, path = header.shapes, header.dtypes, header.path
    for name, target in expected.items():
        if name not in shapes:
            raise BigTransferError(f"{path}: missing tensor {quoted(name)}")
        if shapes[name] != tuple(target.shape):
            raise BigTransferError(f"{path}: tensor {quoted(name)} has shape {quoted(shapes[name])}, expected {tuple(target.shape)}")
        allowed = FLOAT_DTYPES if target.dtype.is_floating_point else INT_DTYPES
        if dtypes[name] not in allowed:
            kind = "floating-point numbers" if target.dtype.is_floating_point else "integers"
            raise BigTransferError(f"{path}: tensor {quoted(name)} holds {dtypes[name]}, not {kind}")
    unexpected = [k for k in shapes if k not in expected and not k.startswith("head.")]
    if unexpected:
        raise BigTransferError(f"{path}: unexpected tensor {quoted(unexpected[0])}")


def decoded_metadata(summary: FileSummary, path: Path) -> dict:
    """class_names, resolution, value_range and provenance, each checked (absent ones left out)."""
    decoded = {}
    for key in ("class_names", "resolution", "value_range", "provenance"):
        if key not in summary.metadata:
            continue
        try:
            value = load_json(summary.metadata[key])
        except ValueError as err:
            raise BigTransferError(f"{path}: damaged bigtransfer metadata ({key} is not JSON: {err})") from None
        if not valid_field(key, value, summary.num_classes):
            raise BigTransferError(f"{path}: damaged bigtransfer metadata ({key}: {quoted(summary.metadata[key])})")
        decoded[key] = value
    return decoded


def valid_field(key: str, value, num_classes: int | None) -> bool:
    """Is `value` a sound class_names / resolution / value_range / provenance for a `num_classes` head?"""
    if value is None:
        return True
    if key == "class_names":
        return isinstance(value, list) and len(value) == num_classes and all(isinstance(n, str) for n in value)
    if key == "resolution":
        return isinstance(value, int) and 1 <= value <= MAX_RESOLUTION
    if key == "value_range":
        return isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
    return isinstance(value, dict)  # provenance


def save_checkpoint(
    model: ResNetV2,
    path: Path,
    *,
    class_names: list[str] | None = None,
    resolution: int | None = None,
    provenance: dict | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `model` as `.safetensors` with the metadata needed to rebuild and use it. Atomic.

    `state_dict` replaces `model.state_dict()` (a sharded model's tensors, gathered whole).
    """
    path = Path(path)
    config = model.config
    if class_names is not None and len(class_names) != config.num_classes:
        raise BigTransferError(
            f"{len(class_names)} class names given for a {config.num_classes}-class head"
        )
    metadata = {
        "format": FORMAT_TAG,
        "architecture": config.arch.name,
        "units": ",".join(str(u) for u in config.arch.units),
        "width": f"{config.arch.width:g}",
        "norm": config.norm,
        "groups": str(config.groups),
        "ws_eps": repr(config.ws_eps),
        "num_classes": str(config.num_classes),
        "class_names": json.dumps(class_names) if class_names is not None else "null",
        "resolution": str(resolution) if resolution is not None else "null",
        "value_range": json.dumps(list(DEFAULT_VALUE_RANGE)),
        "provenance": json.dumps(
            {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **(provenance or {})}
        ),
    }
    source = model.state_dict() if state_dict is None else state_dict
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in source.items()}
    return write_safetensors(path, tensors, metadata, what="weights file")
