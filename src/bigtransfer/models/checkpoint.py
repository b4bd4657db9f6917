"""Checkpoint files: the authors' and big_vision `.npz` (read), our `.safetensors` (read and
write), and timm / Hugging Face transformers BiT `.safetensors` state dicts and folders (read;
their names are in `interop.py`, their config.json in `foreign_config.py`).

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
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from ..atomic import write_safetensors
from ..errors import BigTransferError
from ..safe_text import load_json, quoted
from . import foreign_config, interop
from .resnetv2 import FOREIGN_WS_EPS, NORMS, WS_EPS, ArchSpec, ModelConfig, ResNetV2, parse_arch

FORMAT_TAG = "bigtransfer"
DEFAULT_VALUE_RANGE = (-1.0, 1.0)


# --------------------------------------------------------------------------- file sniffing
def sniff_format(path: Path) -> str:
    """Return 'npz', 'safetensors', 'folder' (a timm/transformers checkpoint folder), or raise a
    BigTransferError saying what the file is."""
    path = Path(path)
    if path.is_dir():
        _folder_files(path)
        return "folder"
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
        f"(loading a pickle can run arbitrary code). Convert it with the library that wrote it, "
        f"where you trust the file: timm: safetensors.torch.save_file(model.state_dict(), 'model.safetensors'); "
        f"transformers: BitForImageClassification.from_pretrained(DIR).save_pretrained(OUT) (writes "
        f"model.safetensors); then pass the .safetensors (or the transformers folder)"
    )


PICKLE_NAMES = ("pytorch_model.bin", "model.bin", "model.pth", "model.pt")


def _folder_files(folder: Path) -> tuple[Path, Path]:
    """The weights and config.json of a timm / transformers checkpoint folder, or why it is not one."""
    weights, config = folder / foreign_config.WEIGHTS_NAME, folder / foreign_config.CONFIG_NAME
    if weights.is_file():
        if not config.is_file():
            raise BigTransferError(
                f"{folder}: no {config.name} beside {weights.name}; a transformers checkpoint folder needs it "
                f"(the padding and layer settings that decide what the model computes live there). To read "
                f"{weights.name} with transformers' default BiT settings anyway, name the file itself")
        return weights, config
    if (folder / f"{weights.name}.index.json").is_file():
        raise BigTransferError(f"{folder}: a sharded checkpoint (model.safetensors.index.json); save it as one file "
                               f"(save_pretrained(OUT, max_shard_size='1000GB')) and pass that folder")
    for name in PICKLE_NAMES:
        if (folder / name).is_file():
            raise _pickle_refusal(folder / name)
    raise BigTransferError(f"{folder}: a folder without {weights.name}; name a weights file, a finished run "
                           f"directory, or a timm / transformers checkpoint folder")


def is_checkpoint_folder(folder: Path) -> bool:
    """Does `folder` look like a timm / transformers checkpoint (rather than, say, a run directory)?"""
    folder = Path(folder)
    names = (foreign_config.WEIGHTS_NAME, f"{foreign_config.WEIGHTS_NAME}.index.json", *PICKLE_NAMES)
    if any((folder / name).is_file() for name in names):
        return True
    config = folder / foreign_config.CONFIG_NAME
    try:
        return config.is_file() and foreign_config.library_of(foreign_config.read_json(config)) is not None
    except BigTransferError:
        return False


def weights_file(path: Path) -> Path:
    """The file that holds the tensors: `path` itself, or a checkpoint folder's model.safetensors."""
    path = Path(path)
    return _folder_files(path)[0] if path.is_dir() else path


def _open_zip(path: Path) -> zipfile.ZipFile:
    """The archive, once its directory is known to be small enough to read (`_check_zip_directory`)."""
    try:
        _check_zip_directory(path)
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, struct.error) as err:
        raise BigTransferError(f"{path}: truncated or corrupt .npz ({err})") from None


_END_OF_DIRECTORY = b"PK\x05\x06"  # the End Of Central Directory record: 22 bytes, then a comment
_ZIP64_LOCATOR, _ZIP64_END = b"PK\x06\x07", b"PK\x06\x06"
MAX_ZIP_COMMENT = 65535
MAX_ARRAYS = 10_000  # the largest released file (R152x4) has about 500
MAX_ZIP_DIRECTORY = 256 * MAX_ARRAYS  # bytes of central directory (a BiT member needs about 150)


def _check_zip_directory(path: Path) -> None:
    """Refuse an archive whose directory lists more members than a checkpoint holds, from the counts in
    its End Of Central Directory record, before zipfile reads the whole directory (a small crafted
    .npz can list a million members: seconds and hundreds of megabytes of ZipInfo objects)."""
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        start = max(0, size - 22 - MAX_ZIP_COMMENT)
        fh.seek(start)
        tail = fh.read()
        at = tail.rfind(_END_OF_DIRECTORY)
        if at < 0 or len(tail) - at < 22:
            raise zipfile.BadZipFile("no end of central directory record")
        entries, directory_size = struct.unpack("<HI", tail[at + 10:at + 16])
        if (entries == 0xFFFF or directory_size == 0xFFFFFFFF) and at >= 20 \
                and tail[at - 20:at - 16] == _ZIP64_LOCATOR:
            (zip64_end,) = struct.unpack("<Q", tail[at - 12:at - 4])
            fh.seek(zip64_end)
            record = fh.read(56)
            if len(record) < 56 or record[:4] != _ZIP64_END:
                raise zipfile.BadZipFile("damaged zip64 end of central directory record")
            entries, directory_size = struct.unpack("<QQ", record[32:48])
    if entries > MAX_ARRAYS or directory_size > MAX_ZIP_DIRECTORY:
        raise BigTransferError(f"{path}: the archive lists {entries:,} members in a {directory_size:,}-byte directory, "
                               f"more than any BiT checkpoint holds ({MAX_ARRAYS:,} arrays)")


# --------------------------------------------------------------------------- reading files
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
    against the model: a 14 MB file can hold a deflated 3 GiB array, or declare a 4 TB shape."""
    sniff_format(path)
    headers: dict[str, _NpyHeader] = {}
    try:
        with _open_zip(path) as archive:
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
        with _open_zip(path) as archive:
            for name in names:
                with archive.open(headers[name].member) as fh:
                    arrays[name] = np.lib.format.read_array(fh, allow_pickle=False)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as err:
        raise BigTransferError(f"{path}: truncated or corrupt .npz ({err})") from None
    return arrays


def _safetensors_handle(path: Path):
    sniff_format(path)
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:  # header or data truncated/corrupt
        raise BigTransferError(f"{path}: truncated or corrupt .safetensors ({err})") from None


def read_safetensors_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor shapes and metadata of a `.safetensors` file, without reading the tensors."""
    shapes, _, metadata = _safetensors_layout(path)
    return shapes, metadata


def _safetensors_layout(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str], dict[str, str]]:
    """Shapes, dtypes and metadata from the header (safetensors itself checks they fit the file)."""
    with _safetensors_handle(path) as fh:
        names = fh.keys()
        if len(names) > MAX_ARRAYS:
            raise BigTransferError(f"{path}: {len(names)} tensors, more than any BiT checkpoint holds")
        slices = {key: fh.get_slice(key) for key in names}
        shapes = {key: tuple(s.get_shape()) for key, s in slices.items()}
        dtypes = {key: str(s.get_dtype()) for key, s in slices.items()}
        return shapes, dtypes, dict(fh.metadata() or {})


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


def _normalised_name(key: str) -> str:
    """Undo naming quirks: some released files say `standardized_conv2d_N`; some nest under `params/`."""
    return _CONV_SUFFIX_RE.sub("/standardized_conv2d/", key).removeprefix("params/")


def _normalise_keys(headers: dict[str, _NpyHeader]) -> dict[str, _NpyHeader]:
    return {_normalised_name(key): value for key, value in headers.items()}


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


def _detect_layout(headers: dict[str, _NpyHeader], path: Path) -> str:
    for name, (_, root_key, _) in _LAYOUTS.items():
        if root_key in headers:
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
    ws_eps: float = WS_EPS
    source_format: str = "bigtransfer"  # authors | big_vision | bigtransfer | timm | transformers
    details: dict = field(default_factory=dict)  # timm / transformers: checked class_names, resolution, ...

    def model_config(self, num_classes: int | None = None) -> ModelConfig:
        """The structure of a model that holds this file (`num_classes` replaces the file's head)."""
        return ModelConfig(self.arch, num_classes or self.num_classes or 1, self.norm, self.groups, self.ws_eps)

    def describe(self) -> str:
        head = f"{self.num_classes} classes" if self.num_classes else "no head"
        return f"{self.arch.name} ({head})"


MAX_UNITS = 100  # per stage (R152 has 36)
MAX_WIDTH = 64  # times 64 root channels (R152x4 has 4)


def _infer_from_npz(headers: dict[str, _NpyHeader], layout: str, path: Path) -> FileSummary:
    """Architecture from the declared shapes alone: units counted per block, width from the root conv."""
    _, root_key, head_bias_key = _LAYOUTS[layout]
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
    """Inspect a weights file or checkpoint folder (architecture, head size, norm) without building a model."""
    path = Path(path)
    kind = sniff_format(path)
    if kind == "npz":
        headers = _normalise_keys(npz_headers(path))
        layout = _detect_layout(headers, path)
        summary = _infer_from_npz(headers, layout, path)
        _check_npz_shapes(path, headers, layout, summary.arch, _expected_shapes(summary))
        return summary
    weights = weights_file(path)
    shapes, dtypes, metadata = _safetensors_layout(weights)
    if metadata.get("format") == FORMAT_TAG:
        return _summary_from_safetensors(shapes, dtypes, metadata, weights)
    return _foreign(path, shapes, dtypes, metadata)[0]


MAX_RESOLUTION = 16384
MAX_WS_EPS = 1e-3  # far above any library's (1e-10 .. 1e-6): anything larger is damage, not a choice


def _summary_from_safetensors(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str], metadata: dict[str, str],
                              path: Path) -> FileSummary:
    """The architecture from our metadata, each field checked against sane bounds and the tensors:
    a file whose tensors are another architecture's (or not numbers) is refused, not described."""
    if metadata.get("format") != FORMAT_TAG:
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
    root = shapes.get("root.conv.weight")
    if root != (round(64 * width), 3, 7, 7):
        raise damaged(f"width {width:g} but root.conv.weight has shape {quoted(root)}")
    head = shapes.get("head.bias")
    num_classes = head[0] if head is not None and len(head) == 1 else None
    if head is not None and declared_classes != num_classes:
        raise damaged(f"num_classes {declared_classes} but head.bias has shape {quoted(head)}")
    summary = FileSummary(ArchSpec(units, width), num_classes, norm, groups, metadata, ws_eps)  # type: ignore[arg-type]
    if "architecture" in metadata and _parsed_arch(metadata["architecture"]) != summary.arch:
        raise damaged(f"architecture {quoted(metadata['architecture'])} but units and width say {summary.arch.name}")
    try:  # the tensors must be the model the metadata describes
        _check_safetensors_tensors(shapes, dtypes, _meta_state(summary), path)
    except BigTransferError as err:
        raise damaged(f"it describes {summary.arch.name} ({norm}), but {str(err).removeprefix(f'{path}: ')}") \
            from None
    _decoded_metadata(summary, path)  # every JSON field must parse and fit the tensors
    return summary


def _parsed_arch(name: str) -> ArchSpec | None:
    try:
        return parse_arch(name)
    except BigTransferError:
        return None


def _decoded_metadata(summary: FileSummary, path: Path) -> dict:
    """class_names, resolution, value_range and provenance, each checked (absent ones left out)."""
    decoded = {}
    for key in ("class_names", "resolution", "value_range", "provenance"):
        if key not in summary.metadata:
            continue
        try:
            value = load_json(summary.metadata[key])
        except ValueError as err:
            raise BigTransferError(f"{path}: damaged bigtransfer metadata ({key} is not JSON: {err})") from None
        if not _valid_field(key, value, summary.num_classes):
            raise BigTransferError(f"{path}: damaged bigtransfer metadata ({key}: {quoted(summary.metadata[key])})")
        decoded[key] = value
    return decoded


def _valid_field(key: str, value, num_classes: int | None) -> bool:
    if value is None:
        return True
    if key == "class_names":
        return isinstance(value, list) and len(value) == num_classes and all(isinstance(n, str) for n in value)
    if key == "resolution":
        return isinstance(value, int) and 1 <= value <= MAX_RESOLUTION
    if key == "value_range":
        return isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
    return isinstance(value, dict)  # provenance


def load_state_dict(path: Path, model: ResNetV2, load_head: bool) -> dict[str, torch.Tensor]:
    """Read `path` into a state dict for `model`, after checking every name and shape.

    The file's architecture must equal the model's; `load_head=False` leaves the head out
    (used when the class count changes). Raises BigTransferError on any mismatch, before
    anything is handed back to be copied.
    """
    path = Path(path)
    if sniff_format(path) == "npz":
        headers = _normalise_keys(npz_headers(path))
        layout = _detect_layout(headers, path)
        summary = _infer_from_npz(headers, layout, path)
        _check_same_architecture(summary, model, path)
        return _npz_state_dict(path, headers, layout, summary.arch, _expected(model, load_head))
    weights = weights_file(path)
    shapes, dtypes, metadata = _safetensors_layout(weights)
    if metadata.get("format") != FORMAT_TAG:
        summary, layout = _foreign(path, shapes, dtypes, metadata)
        _check_same_architecture(summary, model, path)
        expected = _expected(model, load_head)
        table = interop.name_table(expected, layout)
        tensors = read_safetensors(weights, [theirs for theirs, _ in table.values()])
        return {ours: interop.to_ours(tensors.pop(theirs), expected[ours]) for ours, (theirs, _) in table.items()}
    summary = _summary_from_safetensors(shapes, dtypes, metadata, weights)
    _check_same_architecture(summary, model, path)
    expected = {k: v for k, v in model.state_dict().items() if load_head or not k.startswith("head.")}
    _check_safetensors_tensors(shapes, dtypes, expected, weights)
    return read_safetensors(weights, list(expected))


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


def _meta_state(summary: FileSummary) -> dict[str, torch.Tensor]:
    """Every tensor a model of this summary holds, shape and dtype (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = ResNetV2(summary.model_config())
    return {k: v for k, v in model.state_dict().items() if summary.num_classes is not None or not k.startswith("head.")}


def _expected_shapes(summary: FileSummary) -> dict[str, torch.Size]:
    """Every tensor a model of this summary holds, by shape."""
    return {k: v.shape for k, v in _meta_state(summary).items()}


def _check_npz_shapes(path: Path, headers: dict[str, _NpyHeader], layout: str, arch: ArchSpec,
                      expected: dict[str, torch.Size]) -> dict[str, _Entry]:
    """Every tensor the model needs is in the file with the right declared shape, or one clear error."""
    table = _LAYOUTS[layout][0](arch, "head.weight" in expected)
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


def _npz_state_dict(path: Path, headers: dict[str, _NpyHeader], layout: str, arch: ArchSpec,
                    expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Check every name and declared shape first; then read and convert only those arrays."""
    table = _check_npz_shapes(path, headers, layout, arch, expected)
    members = {headers[e.file_key].member[: -len(".npy")]: e.file_key for e in table.values()}
    raw = read_npz_arrays(path, {k: headers[v] for k, v in members.items()}, list(members))
    arrays = {members[k]: v for k, v in raw.items()}
    converted: dict[str, torch.Tensor] = {}
    for name, entry in table.items():
        array = _convert(arrays.pop(entry.file_key), entry, expected[name])
        converted[name] = torch.from_numpy(array.astype(np.float32, copy=False))
    return converted


def _check_safetensors_tensors(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str],
                               expected: dict[str, torch.Tensor], path: Path) -> None:
    """Every tensor `expected` names is in the file with its shape and a dtype of its kind (floating-point
    for weights; an integer for a BatchNorm's step counter), and the file holds nothing else but a head."""
    for name, target in expected.items():
        if name not in shapes:
            raise BigTransferError(f"{path}: missing tensor {quoted(name)}")
        if shapes[name] != tuple(target.shape):
            raise BigTransferError(f"{path}: tensor {quoted(name)} has shape {quoted(shapes[name])}, expected {tuple(target.shape)}")
        allowed = _FLOAT_DTYPES if target.dtype.is_floating_point else _INT_DTYPES
        if dtypes[name] not in allowed:
            kind = "floating-point numbers" if target.dtype.is_floating_point else "integers"
            raise BigTransferError(f"{path}: tensor {quoted(name)} holds {dtypes[name]}, not {kind}")
    unexpected = [k for k in shapes if k not in expected and not k.startswith("head.")]
    if unexpected:
        raise BigTransferError(f"{path}: unexpected tensor {quoted(unexpected[0])}")


# --------------------------------------------------------------------------- timm / transformers
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
_INT_DTYPES = {"I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64"}
BIGTRANSFER_KEY = "bigtransfer"  # our class names, resolution and provenance in an exported file's metadata


def _foreign(path: Path, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str],
             metadata: dict[str, str]) -> tuple[FileSummary, interop.Layout]:
    """Summary of a timm or transformers BiT state dict: architecture from the tensors, settings
    from its config.json, every tensor's name, shape and type checked."""
    weights = weights_file(path)
    layout = interop.detect(shapes)
    if layout is None:
        first = next(iter(shapes), None)
        raise BigTransferError(
            f"{weights}: a .safetensors file without bigtransfer metadata that is not a timm or transformers BiT "
            f"state dict either (first tensor {quoted(first)}); save models with bigtransfer.save_checkpoint so the "
            f"architecture is recorded")
    reason = interop.not_bit_reason(layout, set(shapes))
    if reason:
        raise BigTransferError(f"{weights}: {reason}; bigtransfer reads only BiT")
    arch = _foreign_arch(weights, layout, shapes)
    head = shapes.get(layout.head_bias_key)
    num_classes = head[0] if head is not None and len(head) == 1 else None
    config_path = _config_beside(path, weights)
    config = foreign_config.read_json(config_path) if config_path else None
    found = foreign_config.library_of(config) if config is not None else None
    if config is not None and found is None and not path.is_dir():  # some other program's config.json
        config = config_path = None
    if config is not None and found != layout.library:
        raise BigTransferError(f"{config_path}: a {found or 'unrecognised'} config beside a {layout.describe()}")
    details = _exported_details(metadata, num_classes, weights)
    groups = 32  # timm's BiT models all have 32 groups; transformers' config says
    if layout.library == interop.TRANSFORMERS and config is not None:
        checked = foreign_config.check_transformers(config, arch, num_classes, config_path)
        groups = checked["groups"]
    elif config is not None:
        checked = foreign_config.check_timm(config, arch, num_classes, config_path)
    else:
        checked = {}
    details.update({k: v for k, v in checked.items() if k != "groups" and v is not None})
    details["config"] = str(config_path) if config_path else None
    summary = FileSummary(arch, num_classes, "gn_ws", groups, metadata, FOREIGN_WS_EPS, layout.library, details)
    _check_foreign_tensors(weights, shapes, dtypes, layout, summary)
    return summary, layout


def _config_beside(path: Path, weights: Path) -> Path | None:
    """The config.json that belongs to a checkpoint: a folder's, or the one beside a model.safetensors."""
    if path.is_dir():
        return _folder_files(path)[1]
    beside = weights.with_name(foreign_config.CONFIG_NAME)
    return beside if weights.name == foreign_config.WEIGHTS_NAME and beside.is_file() else None


def _foreign_arch(weights: Path, layout: interop.Layout, shapes: dict[str, tuple[int, ...]]) -> ArchSpec:
    """Units counted per stage, width from the root conv; bounded like any file's declarations."""
    root = shapes.get(layout.root_key)
    if root is None or len(root) != 4 or root[1:] != (3, 7, 7) or not 0 < root[0] <= 64 * MAX_WIDTH:
        raise BigTransferError(f"{weights}: tensor {quoted(layout.root_key)} has shape {quoted(root)}, expected a Cx3x7x7 kernel")
    units = interop.count_units(layout, shapes)
    if sorted(units) != [0, 1, 2, 3]:
        raise BigTransferError(f"{weights}: units in stages {sorted(units)}; BiT has four stages, 0 to 3")
    if max(units.values()) > MAX_UNITS:
        raise BigTransferError(f"{weights}: a stage has {max(units.values())} units, more than any BiT model")
    return ArchSpec(tuple(units[s] for s in range(4)), root[0] / 64)  # type: ignore[arg-type]


def _exported_details(metadata: dict[str, str], num_classes: int | None, weights: Path) -> dict:
    """What bigtransfer recorded when it exported the file (class names, resolution, provenance), checked."""
    if BIGTRANSFER_KEY not in metadata:
        return {}
    try:
        block = load_json(metadata[BIGTRANSFER_KEY])
    except ValueError as err:
        raise BigTransferError(f"{weights}: damaged bigtransfer metadata ({BIGTRANSFER_KEY} is not JSON: {err})") \
            from None
    if not isinstance(block, dict):
        raise BigTransferError(f"{weights}: damaged bigtransfer metadata ({BIGTRANSFER_KEY} is not a JSON object)")
    details = {}
    for key in ("class_names", "resolution", "provenance"):
        value = block.get(key)
        if value is None:
            continue
        if not _valid_field(key, value, num_classes):
            raise BigTransferError(f"{weights}: damaged bigtransfer metadata ({key}: {quoted(value)})")
        details[key] = value
    return details


def _check_foreign_tensors(weights: Path, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str],
                           layout: interop.Layout, summary: FileSummary) -> None:
    """Every tensor a model of `summary` needs, with its shape and a float type, and nothing else."""
    table = interop.name_table(_expected_shapes(summary), layout)
    for theirs, shape in table.values():
        if theirs not in shapes:
            raise BigTransferError(f"{weights}: missing tensor {quoted(theirs)} (a {summary.arch.name} BiT has it)")
        if shapes[theirs] != shape:
            raise BigTransferError(f"{weights}: tensor {quoted(theirs)} has shape {quoted(shapes[theirs])}, expected {shape} "
                                   f"for {summary.arch.name}")
        if dtypes[theirs] not in _FLOAT_DTYPES:
            raise BigTransferError(f"{weights}: tensor {quoted(theirs)} holds {dtypes[theirs]}, not floating-point numbers")
    known = {theirs for theirs, _ in table.values()}
    unexpected = [name for name in shapes if name not in known]
    if unexpected:
        raise BigTransferError(f"{weights}: unexpected tensor {quoted(unexpected[0])} (not part of a "
                               f"{summary.describe()} BiT model)")


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


def read_metadata(path: Path) -> dict:
    """Decoded metadata of a weights file (format, class names, resolution, ...), each field checked."""
    summary = summarize(path)
    decoded: dict = {"architecture": summary.arch.name, "norm": summary.norm, "num_classes": summary.num_classes,
                     "format": summary.source_format, "ws_eps": summary.ws_eps}
    if summary.source_format in interop.LIBRARIES:
        return {**decoded, **summary.details}
    return {**decoded, **_decoded_metadata(summary, weights_file(path))}


def build_from_summary(summary: FileSummary, num_classes: int, zero_head: bool = True) -> ResNetV2:
    return ResNetV2(summary.model_config(num_classes), zero_head=zero_head)
