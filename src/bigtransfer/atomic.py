"""Whole-file writes: a temporary file in the same folder, then a rename.

A reader (or a run resumed after a crash) sees the old file or the new one, never half of
either. A write that fails (full disk, quota, read-only folder, a file-size limit) leaves the old
file as it was, removes the temporary one, and becomes one BigTransferError naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from .errors import BigTransferError

RESUME_HINT = "the previous checkpoint is intact: free space and re-run the same command to resume"


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Files we write get the permissions the user's umask gives any new file. Writers such as
# safetensors' save_file replace the file with one of their own, owner-only (0600).
FILE_MODE = 0o666 & ~_current_umask()


def write_atomically(path: Path, write: Callable[[Path], None], *, what: str = "file", hint: str = "",
                     durable: bool = False) -> Path:
    """Call `write(tmp)` to fill a temporary file, then rename it to `path`.

    `durable`: fsync the file and its folder, so the rename survives a power cut (checkpoints)."""
    from safetensors import SafetensorError

    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE))
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        if durable:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
        if durable:
            _fsync_folder(path.parent)
    except (OSError, SafetensorError) as err:
        reason = getattr(err, "strerror", None) or str(err)
        raise BigTransferError(f"{path}: cannot write the {what} ({reason})" + (f"; {hint}" if hint else "")) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return path


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: Path, text: str, what: str = "file") -> Path:
    """`text` into `path`, atomically."""
    return write_atomically(path, lambda tmp: tmp.write_text(text), what=what)


def write_json(path: Path, data, what: str = "file") -> Path:
    """`data` as indented JSON into `path`, atomically."""
    return write_text(path, json.dumps(data, indent=2, default=str) + "\n", what)
