"""The authors' and big_vision `.npz` files (read only, `allow_pickle=False`).

Every member's header is read and checked (count, names, declared shapes, number dtypes) before any
array is decompressed: a 14 MB file can hold a deflated 3 GiB array, or declare a 4 TB shape. The two
layouts differ only in names, so each is a name map and one function builds either's table.
"""

from __future__ import annotations

import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...errors import BigTransferError
from ...safe_text import quoted
from ..resnetv2 import ArchSpec, ResNetV2
from .sniff import open_zip, sniff_format
from .summary import (
    MAX_ARRAYS,
    MAX_UNITS,
    MAX_WIDTH,
    FileSummary,
    check_same_architecture,
    model_shapes,
    summary_shapes,
)

# --------------------------------------------------------------------------- the two layouts
# Our tensor name -> the file's. A unit's names follow its prefix (`stages.{s}.{u}.`), where the
# files count blocks and units from 1; inside a unit, layer {i} (1..3) is also letter {abc} (a..c).
AUTHORS = {  # the authors' TF checkpoints
    "root.conv.weight": "resnet/root_block/standardized_conv2d/kernel",
    "stages.{s}.{u}.": "resnet/block{block}/unit{unit:02d}/",
    "conv{i}.weight": "{abc}/standardized_conv2d/kernel",
    "norm{i}.weight": "{abc}/group_norm/gamma",
    "norm{i}.bias": "{abc}/group_norm/beta",
    "downsample.weight": "a/proj/standardized_conv2d/kernel",
    "norm.weight": "resnet/group_norm/gamma",
    "norm.bias": "resnet/group_norm/beta",
    "head.weight": "resnet/head/conv2d/kernel",
    "head.bias": "resnet/head/conv2d/bias",
}
BIG_VISION = {  # the authors' successor codebase
    "root.conv.weight": "root_block/conv_root/kernel",
    "stages.{s}.{u}.": "block{block}/unit{unit:02d}/",
    "conv{i}.weight": "conv{i}/kernel",
    "norm{i}.weight": "gn{i}/scale",
    "norm{i}.bias": "gn{i}/bias",
    "downsample.weight": "conv_proj/kernel",
    "norm.weight": "norm-pre-head/scale",
    "norm.bias": "norm-pre-head/bias",
    "head.weight": "head/kernel",
    "head.bias": "head/bias",
}
LAYOUTS = {"authors": AUTHORS, "big_vision": BIG_VISION}

# How a file stores each of our tensors: an HWIO 'conv' kernel, a 'dense' [C, K] or [1, 1, C, K]
# matrix, or a 'vector' of any shape with C elements.
_KINDS = {"root.conv.weight": "conv", "conv{i}.weight": "conv", "norm{i}.weight": "vector",
          "norm{i}.bias": "vector", "downsample.weight": "conv", "norm.weight": "vector", "norm.bias": "vector",
          "head.weight": "dense", "head.bias": "vector"}
_UNIT_TENSORS = ("conv{i}.weight", "norm{i}.weight", "norm{i}.bias")


@dataclass
class _Entry:
    """Where one model tensor lives in a file layout, and how to convert it."""

    file_key: str
    kind: str  # a value of _KINDS


def layout_table(names: dict[str, str], arch: ArchSpec, with_head: bool) -> dict[str, _Entry]:
    """Model parameter name -> its entry in a file of layout `names` (AUTHORS or BIG_VISION)."""

    def entry(ours: str, prefix: str = "", **fields) -> _Entry:
        return _Entry(prefix + names[ours].format(**fields), _KINDS[ours])

    table = {"root.conv.weight": entry("root.conv.weight")}
    for s, num_units in enumerate(arch.units):
        for u in range(num_units):
            ours, theirs = f"stages.{s}.{u}.", names["stages.{s}.{u}."].format(block=s + 1, unit=u + 1)
            for i, abc in enumerate("abc", start=1):
                for tensor in _UNIT_TENSORS:
                    table[ours + tensor.format(i=i)] = entry(tensor, theirs, i=i, abc=abc)
            if u == 0:  # a stage's first unit projects its input
                table[ours + "downsample.weight"] = entry("downsample.weight", theirs)
    for tensor in ("norm.weight", "norm.bias", *(("head.weight", "head.bias") if with_head else ())):
        table[tensor] = entry(tensor)
    return table


def _detect_layout(headers: dict[str, _NpyHeader], path: Path) -> str:
    for layout, names in LAYOUTS.items():
        if names["root.conv.weight"] in headers:
            return layout
    raise BigTransferError(
        f"{path}: not a BiT checkpoint: expected the authors' layout "
        f"('{AUTHORS['root.conv.weight']}') or big_vision's ('{BIG_VISION['root.conv.weight']}')"
    )


# --------------------------------------------------------------------------- members and headers
@dataclass(frozen=True)
class _NpyHeader:
    """What a `.npz` member declares, read from its header alone."""

    member: str  # the zip member's name
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool


def npz_headers(path: Path) -> dict[str, _NpyHeader]:
    """Name -> declared shape and dtype of every array in a `.npz`, decompressing only the headers.

    Nothing is allocated from what a file declares until the names and shapes have been checked
    against the model."""
    sniff_format(path)
    headers: dict[str, _NpyHeader] = {}
    try:
        with open_zip(path) as archive:
            members = [m for m in archive.infolist() if m.filename.endswith(".npy")]
            if len(members) > MAX_ARRAYS:
                raise BigTransferError(f"{path}: {len(members)} arrays, more than any BiT checkpoint holds")
            for info in members:
                with archive.open(info) as fh:
                    shape, fortran, dtype = _read_npy_header(fh)
                if dtype.hasobject or dtype.kind not in "fiu":
                    raise BigTransferError(f"{path}: array {quoted(info.filename)} holds {dtype}, not numbers")
                headers[info.filename[: -len(".npy")]] = _NpyHeader(info.filename, shape, dtype, fortran)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as err:
        raise BigTransferError(f"{path}: truncated or corrupt .npz ({err})") from None
    if not headers:
        raise BigTransferError(f"{path}: the .npz holds no arrays")
    return headers


def _read_npy_header(fh) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fh)
    if version in ((2, 0), (3, 0)):
        return np.lib.format.read_array_header_2_0(fh)
    raise ValueError(f"unsupported .npy format version {version}")


def read_npz_arrays(path: Path, headers: dict[str, _NpyHeader], names: list[str]) -> dict[str, np.ndarray]:
    """The named arrays (whose headers the caller has checked), each read up to its declared size."""
    arrays = {}
    try:
        with open_zip(path) as archive:
            for name in names:
                with archive.open(headers[name].member) as fh:
                    arrays[name] = np.lib.format.read_array(fh, allow_pickle=False)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as err:
        raise BigTransferError(f"{path}: truncated or corrupt .npz ({err})") from None
    return arrays


_CONV_SUFFIX_RE = re.compile(r"/standardized_conv2d_\d+/")


def _normalised_name(key: str) -> str:
    """Undo naming quirks: some released files say `standardized_conv2d_N`; some nest under `params/`."""
    return _CONV_SUFFIX_RE.sub("/standardized_conv2d/", key).removeprefix("params/")


def _read_headers(path: Path) -> tuple[dict[str, _NpyHeader], str, FileSummary]:
    """The headers under normalised names, their layout, and the summary they declare."""
    headers = {_normalised_name(key): value for key, value in npz_headers(path).items()}
    layout = _detect_layout(headers, path)
    return headers, layout, _infer_summary(headers, layout, path)


# --------------------------------------------------------------------------- summary and state dict
def summarize(path: Path) -> FileSummary:
    """The architecture and head of a `.npz`, every tensor it needs checked by name and declared shape."""
    headers, layout, summary = _read_headers(path)
    _check_shapes(path, headers, layout, summary.arch, summary_shapes(summary))
    return summary


def load_state_dict(path: Path, model: ResNetV2, load_head: bool) -> dict[str, torch.Tensor]:
    """A state dict for `model` from a `.npz` of its architecture: names and shapes checked, then read."""
    headers, layout, summary = _read_headers(path)
    check_same_architecture(summary, model, path)
    return _state_dict(path, headers, layout, summary.arch, model_shapes(model, load_head))


def _infer_summary(headers: dict[str, _NpyHeader], layout: str, path: Path) -> FileSummary:
    """Architecture from the declared shapes alone: units counted per block, width from the root conv."""
    root_key, head_bias_key = LAYOUTS[layout]["root.conv.weight"], LAYOUTS[layout]["head.bias"]
    root = headers[root_key].shape
    if len(root) != 4 or root[:3] != (7, 7, 3) or not 0 < root[3] <= 64 * MAX_WIDTH:
        raise BigTransferError(f"{path}: tensor {quoted(root_key)} has shape {quoted(root)}, expected a 7x7x3xC HWIO kernel")
    unit_re = re.compile(r"block(\d)/unit(\d+)/")
    units = [0, 0, 0, 0]
    for key in headers:
        match = unit_re.search(key)
        if match and 1 <= int(match.group(1)) <= 4:
            block = int(match.group(1)) - 1
            units[block] = max(units[block], int(match.group(2)))
    if min(units) < 1:
        raise BigTransferError(f"{path}: a stage has no units ({units}); the file is incomplete")
    if max(units) > MAX_UNITS:
        raise BigTransferError(f"{path}: a stage has {max(units)} units, more than any BiT model")
    head = headers.get(head_bias_key)
    num_classes = int(np.prod(head.shape, dtype=object)) if head is not None else None
    return FileSummary(ArchSpec(tuple(units), root[3] / 64), num_classes,  # type: ignore[arg-type]
                       source_format=layout)


def _check_shapes(path: Path, headers: dict[str, _NpyHeader], layout: str, arch: ArchSpec,
                  expected: dict[str, torch.Size]) -> dict[str, _Entry]:
    """Every tensor the model needs is in the file with the right declared shape, or one clear error."""
    table = layout_table(LAYOUTS[layout], arch, "head.weight" in expected)
    for name, entry in table.items():
        if entry.file_key not in headers:
            raise BigTransferError(f"{path}: missing tensor {quoted(entry.file_key)} (needed for {name})")
        if not _shape_fits(headers[entry.file_key].shape, entry, expected[name]):
            raise BigTransferError(
                f"{path}: tensor {quoted(entry.file_key)} has shape {quoted(headers[entry.file_key].shape)}, "
                f"expected {_expected_file_shape(entry, expected[name])}"
            )
        if headers[entry.file_key].dtype.kind != "f":
            raise BigTransferError(f"{path}: tensor {quoted(entry.file_key)} holds {headers[entry.file_key].dtype}, "
                                   f"not floating-point numbers")
    return table


def _state_dict(path: Path, headers: dict[str, _NpyHeader], layout: str, arch: ArchSpec,
                expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Check every name and declared shape first; then read and convert only those arrays."""
    table = _check_shapes(path, headers, layout, arch, expected)
    members = {headers[e.file_key].member[: -len(".npy")]: e.file_key for e in table.values()}
    raw = read_npz_arrays(path, {k: headers[v] for k, v in members.items()}, list(members))
    arrays = {members[k]: v for k, v in raw.items()}
    converted: dict[str, torch.Tensor] = {}
    for name, entry in table.items():
        array = _convert(arrays.pop(entry.file_key), entry, expected[name])
        converted[name] = torch.from_numpy(array.astype(np.float32, copy=False))
    return converted


# --------------------------------------------------------------------------- TF layout to PyTorch's
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


def _expected_file_shape(entry: _Entry, target: torch.Size) -> tuple[int, ...]:
    return _file_shape_candidates(entry, target)[0]


def _convert(array: np.ndarray, entry: _Entry, target: torch.Size) -> np.ndarray:
    """The array in PyTorch's layout (its shape already checked by `_shape_fits`)."""
    if entry.kind == "conv":
        return np.ascontiguousarray(np.transpose(array, (3, 2, 0, 1)))  # HWIO -> OIHW
    if entry.kind == "dense":
        return np.ascontiguousarray(array.reshape(array.shape[-2:]).T).reshape(tuple(target))
    return array.reshape(tuple(target))
