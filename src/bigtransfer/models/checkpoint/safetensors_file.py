"""Any `.safetensors` file, ours or a library's: its header (names, shapes, dtypes, metadata), bounded,
and then the tensors asked for; a truncated or corrupt file is one clear error."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ...errors import BigTransferError
from .sniff import sniff_format
from .summary import MAX_ARRAYS

FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
INT_DTYPES = {"I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64"}


@dataclass(frozen=True)
class Header:
    """What a `.safetensors` header declares (safetensors itself checks that it fits the file)."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]  # safetensors' names: 'F32', 'BF16', 'I64', ...
    metadata: dict[str, str]


def _open(path: Path):
    sniff_format(path)
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:  # header or data truncated/corrupt
        raise BigTransferError(f"{path}: truncated or corrupt .safetensors ({err})") from None


def read_header(path: Path) -> Header:
    """Shapes, dtypes and metadata of a `.safetensors` file, without reading the tensors."""
    with _open(path) as fh:
        names = fh.keys()
        if len(names) > MAX_ARRAYS:
            raise BigTransferError(f"{path}: {len(names)} tensors, more than any BiT checkpoint holds")
        slices = {key: fh.get_slice(key) for key in names}
        shapes = {key: tuple(s.get_shape()) for key, s in slices.items()}
        dtypes = {key: str(s.get_dtype()) for key, s in slices.items()}
        return Header(path, shapes, dtypes, dict(fh.metadata() or {}))


def read_safetensors(path: Path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file (all, or just `keys`)."""
    with _open(path) as fh:
        names = fh.keys() if keys is None else keys
        try:
            return {key: fh.get_tensor(key) for key in names}
        except (SafetensorError, OSError) as err:
            raise BigTransferError(f"{path}: corrupt .safetensors ({err})") from None
