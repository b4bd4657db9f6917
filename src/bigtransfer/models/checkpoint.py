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
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from ..atomic import write_atomically
from ..errors import BigTransferError
from .resnetv2 import NORMS, ArchSpec, ModelConfig, ResNetV2

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
@dataclass(frozen=True)
class _NpyHeader:
    """What a `.npz` member declares, read from its header alone."""

    member: str  # the zip member's name
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool


MAX_ARRAYS = 10_000  # the largest released file (R152x4) has about 500


def npz_headers(path: Path) -> dict[str, _NpyHeader]:
    """Name -> declared shape and dtype of every array in a `.npz`, decompressing only the headers.

    Nothing is allocated from what a file declares until the names and shapes have been checked
    against the model: a 14 MB file can hold a deflated 3 GiB array, or declare a 4 TB shape."""
    sniff_format(path)
    headers: dict[str, _NpyHeader] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if m.filename.endswith(".npy")]
            if len(members) > MAX_ARRAYS:
                raise BigTransferError(f"{path}: {len(members)} arrays, more than any BiT checkpoint holds")
            for info in members:
                with archive.open(info) as fh:
                    shape, fortran, dtype = _read_npy_header(fh)
                if dtype.hasobject or dtype.kind not in "fiu":
                    raise BigTransferError(f"{path}: array {info.filename!r} holds {dtype}, not numbers")
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
        with zipfile.ZipFile(path) as archive:
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
        raise BigTransferError(f"{path}: tensor {root_key!r} has shape {root}, expected a 7x7x3xC HWIO kernel")
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
    return FileSummary(ArchSpec(tuple(units), root[3] / 64), num_classes)  # type: ignore[arg-type]


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
        headers = _normalise_keys(npz_headers(path))
        layout = _detect_layout(headers, path)
        summary = _infer_from_npz(headers, layout, path)
        _check_npz_shapes(path, headers, layout, summary.arch, _expected_shapes(summary))
        return summary
    shapes, metadata = read_safetensors_header(path)
    return _summary_from_safetensors(shapes, metadata, path)


MAX_RESOLUTION = 16384


def _summary_from_safetensors(shapes: dict[str, tuple[int, ...]], metadata: dict[str, str], path: Path) -> FileSummary:
    """The architecture from our metadata, each field checked against sane bounds and the tensors."""
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
    except (KeyError, ValueError) as err:
        raise damaged(str(err)) from None
    if len(units) != 4 or not all(1 <= u <= MAX_UNITS for u in units):
        raise damaged(f"units {metadata['units']!r}")
    if not 0 < width <= MAX_WIDTH or (64 * width) % 1:
        raise damaged(f"width {metadata['width']!r}")
    if norm not in NORMS or not 1 <= groups <= 64 * width:
        raise damaged(f"norm {norm!r}, groups {groups}")
    root = shapes.get("root.conv.weight")
    if root != (round(64 * width), 3, 7, 7):
        raise damaged(f"width {width:g} but root.conv.weight has shape {root}")
    head = shapes.get("head.bias")
    num_classes = head[0] if head is not None and len(head) == 1 else None
    if head is not None and declared_classes != num_classes:
        raise damaged(f"num_classes {declared_classes} but head.bias has shape {head}")
    summary = FileSummary(ArchSpec(units, width), num_classes, norm, groups, metadata)  # type: ignore[arg-type]
    _decoded_metadata(summary, path)  # every JSON field must parse and fit the tensors
    return summary


def _decoded_metadata(summary: FileSummary, path: Path) -> dict:
    """class_names, resolution, value_range and provenance, each checked (absent ones left out)."""
    decoded = {}
    for key in ("class_names", "resolution", "value_range", "provenance"):
        if key not in summary.metadata:
            continue
        try:
            value = json.loads(summary.metadata[key])
        except ValueError:
            raise BigTransferError(f"{path}: damaged bigtransfer metadata ({key} is not JSON)") from None
        if not _valid_field(key, value, summary.num_classes):
            raise BigTransferError(f"{path}: damaged bigtransfer metadata ({key}: {summary.metadata[key][:80]!r})")
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


def _expected_shapes(summary: FileSummary) -> dict[str, torch.Size]:
    """Every tensor a model of this summary holds (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = ResNetV2(ModelConfig(summary.arch, summary.num_classes or 1, summary.norm, summary.groups))
    return _expected(model, load_head=summary.num_classes is not None)


def _check_npz_shapes(path: Path, headers: dict[str, _NpyHeader], layout: str, arch: ArchSpec,
                      expected: dict[str, torch.Size]) -> dict[str, _Entry]:
    """Every tensor the model needs is in the file with the right declared shape, or one clear error."""
    table = _LAYOUTS[layout][0](arch, "head.weight" in expected)
    for name, entry in table.items():
        if entry.file_key not in headers:
            raise BigTransferError(f"{path}: missing tensor {entry.file_key!r} (needed for {name})")
        if not _shape_fits(headers[entry.file_key].shape, entry, expected[name]):
            raise BigTransferError(
                f"{path}: tensor {entry.file_key!r} has shape {headers[entry.file_key].shape}, "
                f"expected {_expected_file_shape(entry, expected[name])}"
            )
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
    return write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), what="weights file",
                            durable=True)


def read_metadata(path: Path) -> dict:
    """Decoded bigtransfer metadata of a weights file (class names, resolution, ...), each field checked."""
    summary = summarize(path)
    decoded: dict = {"architecture": summary.arch.name, "norm": summary.norm, "num_classes": summary.num_classes}
    return {**decoded, **_decoded_metadata(summary, Path(path))}


def build_from_summary(summary: FileSummary, num_classes: int, zero_head: bool = True) -> ResNetV2:
    return ResNetV2(ModelConfig(summary.arch, num_classes, summary.norm, summary.groups), zero_head=zero_head)
