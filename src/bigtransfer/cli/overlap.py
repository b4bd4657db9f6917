"""A command's outputs never overlap what it reads.

Checked before anything is read or written, for every verb that has both:
- an input at or below an output (`distill --teacher D --out D --restart` would replace the
  teacher's weights with the student's; `finetune --model OUT/final.safetensors --out OUT`):
  the run may overwrite, or with --restart delete, what it reads;
- an output at or below a data folder the command reads whole (`--out DATA/run`): the folder
  would be claimed, read back as a class of the data, and left behind to break every later
  command on that data.
An output inside a model's folder is fine (`detect-eval --model RUN --out RUN/eval`): a model is
read by name, not scanned. Paths are compared after following links, so a link cannot hide it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import BigTransferError
from ..safe_text import path_text


@dataclass(frozen=True)
class Named:
    """A path a command was given, and the flag (or argument name) that gave it."""

    flag: str
    path: Path


def _real(path: Path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def existing_paths(flag: str, value: str | os.PathLike | None, *, listed: bool = False) -> list[Named]:
    """The existing paths a flag's value names (each part of a comma-separated list when `listed`,
    as `--downstream a,b`); names that are not paths (`digits`, `BiT-M-R50x1`) give none."""
    if value is None:
        return []
    values = value if isinstance(value, (list, tuple)) else [value]
    texts = [os.fspath(v) for v in values]
    if listed:
        texts = [part for text in texts for part in (text.split(",") if not _exists(text) else [text])]
    return [Named(flag, Path(text)) for text in texts if text and _exists(text)]


def _exists(text: str) -> bool:
    return os.path.lexists(Path(text).expanduser())


def check_apart(outputs: Iterable[Named], scanned: Iterable[Named], read: Iterable[Named]) -> None:
    """Refuse (one line naming both flags) an input at or below an output, or an output at or below
    a folder that is read whole (`scanned`)."""
    outputs, scanned, read = list(outputs), list(scanned), list(read)
    for out in outputs:
        target = _real(out.path)
        for given in scanned + read:
            source = _real(given.path)
            if _within(source, target):
                relation = "is" if source == target else "holds"
                raise BigTransferError(
                    f"{out.flag} {path_text(out.path)}: {relation} {given.flag} {path_text(given.path)}, which this "
                    f"command reads; writing there could overwrite or delete it. Choose an output apart from the inputs")
        for data in scanned:
            source = _real(data.path)
            if source.is_dir() and _within(target, source):
                raise BigTransferError(
                    f"{out.flag} {path_text(out.path)}: inside {data.flag} {path_text(data.path)}, which this command "
                    f"reads whole; the output would be read back as part of the data. Choose a folder outside it")
