"""Checkpoint files: the authors' `.npz` (read) and our `.safetensors` (read and write).

Nothing here ever unpickles: `.npz` is read with `allow_pickle=False`, and pickle-based
PyTorch files are recognised by their bytes and refused with an explanation.

Loading is two-phase: first every tensor name and shape in the file is checked against
the model (and the file's architecture is inferred, so a mismatch reads as "this file is
R101x3, you asked for R50x1"); only then is anything copied.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import struct
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from ..errors import BigTransferError
from .resnetv2 import ArchSpec, ModelConfig, ResNetV2

FORMAT_TAG = "bigtransfer"
DEFAULT_VALUE_RANGE = (-1.0, 1.0)


# --------------------------------------------------------------------------- file sniffing
def sniff_format(path: Path) -> str:
    """Return 'npz', 'safetensors', or raise a BigTransferError saying what the file is."""
    path = Path(path)
    if not path.is_file():
        raise BigTransferError(f"{path}: no such weights file")
    with open(path, "rb") as fh:
        head = fh.read(9)
    if not head:
        raise BigTransferError(f"{path}: file is empty")
    # safetensors first: its first 8 bytes are a length, which can begin with 0x80 or "PK" too.
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < path.stat().st_size:
        return "safetensors"
    if head[0] == 0x80:  # pickle protocol marker: legacy torch.save / plain pickle
        raise _pickle_refusal(path)
    if head[:2] == b"PK":
        with _open_zip(path) as archive:
            names = archive.namelist()
        if any(n.endswith(".pkl") for n in names):
            raise _pickle_refusal(path)
        return "npz"
    if len(head) < 9:
        raise BigTransferError(f"{path}: file is truncated ({len(head)} bytes)")
    raise BigTransferError(f"{path}: not a .npz or .safetensors weights file")


def _pickle_refusal(path: Path) -> BigTransferError:
    return BigTransferError(
        f"{path}: this is a pickle-based PyTorch file; bigtransfer never unpickles weights "
        f"(loading a pickle can run arbitrary code). Save it as .safetensors "
        f"(safetensors.torch.save_file(model.state_dict(), 'model.safetensors')) or .npz"
    )


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise BigTransferError(f"{path}: truncated or corrupt .npz ({err})") from None


# --------------------------------------------------------------------------- reading files
def read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of a `.npz` as a dict (no pickle), with clear errors for damaged files."""
    sniff_format(path)
    arrays: dict[str, np.ndarray] = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            for key in npz.files:
                arrays[key] = npz[key]
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as err:
        raise BigTransferError(f"{path}: truncated or corrupt .npz ({err})") from None
    if not arrays:
        raise BigTransferError(f"{path}: the .npz holds no arrays")
    return arrays


def _safetensors_handle(path: Path):
    sniff_format(path)
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:  # header or data truncated/corrupt
        raise BigTransferError(f"{path}: truncated or corrupt .safetensors ({err})") from None


def read_safetensors_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor shapes and metadata of a `.safetensors` file, without reading the tensors."""
    with _safetensors_handle(path) as fh:
        names = fh.keys()
        shapes = {key: tuple(fh.get_slice(key).get_shape()) for key in names}
        return shapes, dict(fh.metadata() or {})


def read_safetensors(path: Path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file (all, or just `keys`)."""
    with _safetensors_handle(path) as fh:
        names = fh.keys() if keys is None else keys
        try:
            return {key: fh.get_tensor(key) for key in names}
        except (SafetensorError, OSError) as err:
            raise BigTransferError(f"{path}: corrupt .safetensors ({err})") from None


# --------------------------------------------------------------------------- authors' layout
_CONV_SUFFIX_RE = re.compile(r"/standardized_conv2d_\d+/")


def _normalise_keys(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Undo naming quirks: some released files say `standardized_conv2d_N`; some nest under `params/`."""
    out = {}
    for key, value in arrays.items():
        key = _CONV_SUFFIX_RE.sub("/standardized_conv2d/", key)
        key = key.removeprefix("params/")
        out[key] = value
    return out


@dataclass
class _Entry:
    """Where one model tensor lives in a file layout, and how to convert it."""

    file_key: str
    kind: str  # 'conv' (HWIO kernel), 'vector' (any shape with C elements), 'dense' ([C, K] or [1,1,C,K])


def _authors_layout(arch: ArchSpec, with_head: bool) -> dict[str, _Entry]:
    """Model parameter name -> entry in the authors' TF checkpoint (`resnet/...`)."""
    table = {"root.conv.weight": _Entry("resnet/root_block/standardized_conv2d/kernel", "conv")}
    for s, num_units in enumerate(arch.units):
        for u in range(num_units):
            ours = f"stages.{s}.{u}."
            theirs = f"resnet/block{s + 1}/unit{u + 1:02d}/"
            for i, letter in enumerate("abc", start=1):
                table[f"{ours}conv{i}.weight"] = _Entry(f"{theirs}{letter}/standardized_conv2d/kernel", "conv")
                table[f"{ours}norm{i}.weight"] = _Entry(f"{theirs}{letter}/group_norm/gamma", "vector")
                table[f"{ours}norm{i}.bias"] = _Entry(f"{theirs}{letter}/group_norm/beta", "vector")
            if u == 0:
                table[f"{ours}downsample.weight"] = _Entry(f"{theirs}a/proj/standardized_conv2d/kernel", "conv")
    table["norm.weight"] = _Entry("resnet/group_norm/gamma", "vector")
    table["norm.bias"] = _Entry("resnet/group_norm/beta", "vector")
    if with_head:
        table["head.weight"] = _Entry("resnet/head/conv2d/kernel", "dense")
        table["head.bias"] = _Entry("resnet/head/conv2d/bias", "vector")
    return table


def _big_vision_layout(arch: ArchSpec, with_head: bool) -> dict[str, _Entry]:
    """The same tensors under the names of the authors' successor codebase (big_vision)."""
    table = {"root.conv.weight": _Entry("root_block/conv_root/kernel", "conv")}
    for s, num_units in enumerate(arch.units):
        for u in range(num_units):
            ours = f"stages.{s}.{u}."
            theirs = f"block{s + 1}/unit{u + 1:02d}/"
            for i in (1, 2, 3):
                table[f"{ours}conv{i}.weight"] = _Entry(f"{theirs}conv{i}/kernel", "conv")
                table[f"{ours}norm{i}.weight"] = _Entry(f"{theirs}gn{i}/scale", "vector")
                table[f"{ours}norm{i}.bias"] = _Entry(f"{theirs}gn{i}/bias", "vector")
            if u == 0:
                table[f"{ours}downsample.weight"] = _Entry(f"{theirs}conv_proj/kernel", "conv")
    table["norm.weight"] = _Entry("norm-pre-head/scale", "vector")
    table["norm.bias"] = _Entry("norm-pre-head/bias", "vector")
    if with_head:
        table["head.weight"] = _Entry("head/kernel", "dense")
        table["head.bias"] = _Entry("head/bias", "vector")
    return table


_LAYOUTS = {
    "authors": (_authors_layout, "resnet/root_block/standardized_conv2d/kernel", "resnet/head/conv2d/bias"),
    "big_vision": (_big_vision_layout, "root_block/conv_root/kernel", "head/bias"),
}


def _detect_layout(arrays: dict[str, np.ndarray], path: Path) -> str:
    for name, (_, root_key, _) in _LAYOUTS.items():
        if root_key in arrays:
            return name
    raise BigTransferError(
        f"{path}: not a BiT checkpoint: expected the authors' layout "
        f"('resnet/root_block/standardized_conv2d/kernel') or big_vision's ('root_block/conv_root/kernel')"
    )


@dataclass
class FileSummary:
    """What a weights file holds, inferred from its tensors (and metadata, when present)."""

    arch: ArchSpec
    num_classes: int | None  # None: the file has no head
    norm: str = "gn_ws"
    groups: int = 32
    metadata: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        head = f"{self.num_classes} classes" if self.num_classes else "no head"
        return f"{self.arch.name} ({head})"


def _infer_from_npz(arrays: dict[str, np.ndarray], layout: str, path: Path) -> FileSummary:
    """Architecture from the tensors alone: units counted per block, width from the root conv."""
    _, root_key, head_bias_key = _LAYOUTS[layout]
    root = arrays[root_key]
    if root.ndim != 4:
        raise BigTransferError(f"{path}: tensor {root_key!r} has shape {root.shape}, expected a 4-d HWIO kernel")
    width = root.shape[3] / 64
    unit_re = re.compile(r"block(\d)/unit(\d+)/")
    units = [0, 0, 0, 0]
    for key in arrays:
        match = unit_re.search(key)
        if match and 1 <= int(match.group(1)) <= 4:
            block = int(match.group(1)) - 1
            units[block] = max(units[block], int(match.group(2)))
    if min(units) < 1:
        raise BigTransferError(f"{path}: a stage has no units ({units}); the file is incomplete")
    num_classes = int(arrays[head_bias_key].size) if head_bias_key in arrays else None
    return FileSummary(ArchSpec(tuple(units), width), num_classes)  # type: ignore[arg-type]


def _file_shape_candidates(entry: _Entry, target: torch.Size) -> list[tuple[int, ...]]:
    """The shapes under which a file may store a tensor that becomes `target` in PyTorch."""
    if entry.kind == "conv":
        o, i, h, w = target
        return [(h, w, i, o)]
    if entry.kind == "dense":
        k, c = target[0], target[1]
        return [(c, k), (1, 1, c, k)]
    n = target.numel()
    return [(n,), (1, 1, 1, n)]  # TF stores [C], big_vision [1, 1, 1, C]


def _shape_fits(shape: tuple[int, ...], entry: _Entry, target: torch.Size) -> bool:
    return tuple(shape) in _file_shape_candidates(entry, target)


def _convert(array: np.ndarray, entry: _Entry, target: torch.Size) -> np.ndarray:
    """The array in PyTorch's layout (its shape already checked by `_shape_fits`)."""
    if entry.kind == "conv":
        return np.ascontiguousarray(np.transpose(array, (3, 2, 0, 1)))  # HWIO -> OIHW
    if entry.kind == "dense":
        return np.ascontiguousarray(array.reshape(array.shape[-2:]).T).reshape(tuple(target))
    return array.reshape(tuple(target))


def _expected_file_shape(entry: _Entry, target: torch.Size) -> tuple[int, ...]:
    return _file_shape_candidates(entry, target)[0]


# --------------------------------------------------------------------------- public API
def summarize(path: Path) -> FileSummary:
    """Inspect a weights file (architecture, head size, norm) without building a model."""
    path = Path(path)
    if sniff_format(path) == "npz":
        arrays = _normalise_keys(read_npz(path))
        return _infer_from_npz(arrays, _detect_layout(arrays, path), path)
    shapes, metadata = read_safetensors_header(path)
    return _summary_from_safetensors(shapes, metadata, path)


def _summary_from_safetensors(shapes: dict[str, tuple[int, ...]], metadata: dict[str, str], path: Path) -> FileSummary:
    if metadata.get("format") != FORMAT_TAG:
        raise BigTransferError(
            f"{path}: a .safetensors file without bigtransfer metadata; "
            f"save models with bigtransfer.save_checkpoint so the architecture is recorded"
        )
    try:
        units = tuple(int(u) for u in metadata["units"].split(","))
        arch = ArchSpec(units, float(metadata["width"]))  # type: ignore[arg-type]
        num_classes = int(metadata["num_classes"]) if "head.bias" in shapes else None
        return FileSummary(arch, num_classes, metadata["norm"], int(metadata["groups"]), metadata)
    except (KeyError, ValueError) as err:
        raise BigTransferError(f"{path}: damaged bigtransfer metadata ({err})") from None


def load_state_dict(path: Path, model: ResNetV2, load_head: bool) -> dict[str, torch.Tensor]:
    """Read `path` into a state dict for `model`, after checking every name and shape.

    The file's architecture must equal the model's; `load_head=False` leaves the head out
    (used when the class count changes). Raises BigTransferError on any mismatch, before
    anything is handed back to be copied.
    """
    path = Path(path)
    if sniff_format(path) == "npz":
        arrays = _normalise_keys(read_npz(path))
        layout = _detect_layout(arrays, path)
        summary = _infer_from_npz(arrays, layout, path)
        _check_same_architecture(summary, model, path)
        return _npz_state_dict(arrays, layout, summary.arch, _expected(model, load_head), path)
    shapes, metadata = read_safetensors_header(path)
    summary = _summary_from_safetensors(shapes, metadata, path)
    _check_same_architecture(summary, model, path)
    expected = _expected(model, load_head)
    _check_safetensors_shapes(shapes, expected, path)
    return read_safetensors(path, list(expected))


def _expected(model: ResNetV2, load_head: bool) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict().items() if load_head or not k.startswith("head.")}


def _check_same_architecture(summary: FileSummary, model: ResNetV2, path: Path) -> None:
    config = model.config
    if summary.arch != config.arch:
        raise BigTransferError(f"{path}: this file is {summary.describe()}, you asked for {config.arch.name}")
    if (summary.norm, summary.groups) != (config.norm, config.groups):
        raise BigTransferError(
            f"{path}: this file is a norm={summary.norm} (groups {summary.groups}) model, "
            f"you asked for norm={config.norm} (groups {config.groups})"
        )


def _npz_state_dict(
    arrays: dict[str, np.ndarray], layout: str, arch: ArchSpec, expected: dict[str, torch.Size], path: Path
) -> dict[str, torch.Tensor]:
    """Check every name and shape first; then convert, releasing each source array as we go."""
    table = _LAYOUTS[layout][0](arch, "head.weight" in expected)
    for name, entry in table.items():
        if entry.file_key not in arrays:
            raise BigTransferError(f"{path}: missing tensor {entry.file_key!r} (needed for {name})")
        if not _shape_fits(arrays[entry.file_key].shape, entry, expected[name]):
            raise BigTransferError(
                f"{path}: tensor {entry.file_key!r} has shape {tuple(arrays[entry.file_key].shape)}, "
                f"expected {_expected_file_shape(entry, expected[name])}"
            )
    converted: dict[str, torch.Tensor] = {}
    for name, entry in table.items():
        array = _convert(arrays.pop(entry.file_key), entry, expected[name])
        converted[name] = torch.from_numpy(array.astype(np.float32, copy=False))
    return converted


def _check_safetensors_shapes(shapes: dict[str, tuple[int, ...]], expected: dict[str, torch.Size], path: Path) -> None:
    for name, target in expected.items():
        if name not in shapes:
            raise BigTransferError(f"{path}: missing tensor {name!r}")
        if shapes[name] != tuple(target):
            raise BigTransferError(f"{path}: tensor {name!r} has shape {shapes[name]}, expected {tuple(target)}")
    unexpected = [k for k in shapes if k not in expected and not k.startswith("head.")]
    if unexpected:
        raise BigTransferError(f"{path}: unexpected tensor {unexpected[0]!r}")


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
    from safetensors.torch import save_file

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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_metadata(path: Path) -> dict:
    """Decoded bigtransfer metadata of a weights file (class names, resolution, ...)."""
    summary = summarize(path)
    meta = summary.metadata
    decoded: dict = {"architecture": summary.arch.name, "norm": summary.norm, "num_classes": summary.num_classes}
    for key in ("class_names", "resolution", "value_range", "provenance"):
        if key in meta:
            decoded[key] = json.loads(meta[key])
    return decoded


def build_from_summary(summary: FileSummary, num_classes: int, zero_head: bool = True) -> ResNetV2:
    return ResNetV2(ModelConfig(summary.arch, num_classes, summary.norm, summary.groups), zero_head=zero_head)
