"""What a weights path is, from its first bytes: a `.npz`, a `.safetensors`, or a timm / transformers
checkpoint folder. Pickle-based PyTorch files are recognised and refused with a way out, never
unpickled; a zip archive's directory is bounded before it is listed."""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

from ...errors import BigTransferError
from .. import foreign_config
from .summary import MAX_ARRAYS

PICKLE_NAMES = ("pytorch_model.bin", "model.bin", "model.pth", "model.pt")


def sniff_format(path: Path) -> str:
    """Return 'npz', 'safetensors', 'folder' (a timm/transformers checkpoint folder), or raise a
    BigTransferError saying what the file is."""
    path = Path(path)
    if path.is_dir():
        folder_files(path)
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
        with open_zip(path) as archive:
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


def folder_files(folder: Path) -> tuple[Path, Path]:
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
    return folder_files(path)[0] if path.is_dir() else path


# --------------------------------------------------------------------------- zip archives
_END_OF_DIRECTORY = b"PK\x05\x06"  # the End Of Central Directory record: 22 bytes, then a comment
_ZIP64_LOCATOR, _ZIP64_END = b"PK\x06\x07", b"PK\x06\x06"
MAX_ZIP_COMMENT = 65535
MAX_ZIP_DIRECTORY = 256 * MAX_ARRAYS  # bytes of central directory (a BiT member needs about 150)


def open_zip(path: Path) -> zipfile.ZipFile:
    """The archive, once its directory is known to be small enough to read (`_check_zip_directory`)."""
    try:
        _check_zip_directory(path)
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, struct.error) as err:
        raise BigTransferError(f"{path}: truncated or corrupt .npz ({err})") from None


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
