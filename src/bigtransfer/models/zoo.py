"""The authors' released model files: names, the local cache, and downloading.

Files come from the authors' public bucket (`https://storage.googleapis.com/bit_models/`,
override with BIGTRANSFER_BASE_URL for a mirror) into BIGTRANSFER_HOME
(default `~/.cache/bigtransfer`), keeping the bucket's relative paths. Many of them are on the
Hugging Face hub too (`hub.py`); a released name uses whichever copy has been downloaded.
A download is capped at what a file of its model can take, bounded in time (`transfer.py`), and
kept only if it parses as the released model (format, architecture, head).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..atomic import write_text
from ..errors import BigTransferError
from . import hub
from .released import (
    ILSVRC_CLASSES,
    IMAGENET21K_CLASSES,
    REGISTRY,
    VTAB_ARCHS,
    VTAB_RUNS,
    VTAB_TASK_CLASSES,
    ZooEntry,
    cache_dir,
    check_contents,
    known_models,
    lookup,
    sha256_of,
    size_ceiling,
)
from .transfer import Limits, fetch

__all__ = [
    "DEFAULT_BASE_URL", "ILSVRC_CLASSES", "IMAGENET21K_CLASSES", "REGISTRY", "VTAB_ARCHS", "VTAB_RUNS",
    "VTAB_TASK_CLASSES", "ZooEntry", "base_url", "cache_dir", "cached_file", "cached_path", "check_cached",
    "download", "known_models", "lookup", "recorded_sha256", "require_cached", "sha256_of", "verify",
]

DEFAULT_BASE_URL = "https://storage.googleapis.com/bit_models"
BUCKET_FORMATS = ("authors", "big_vision")  # the .npz layouts the bucket's files come in


def cached_path(entry: ZooEntry) -> Path:
    """Where the bucket's file for `entry` lives in our cache."""
    return cache_dir() / entry.relpath


def base_url() -> str:
    """The bucket's address: BIGTRANSFER_BASE_URL, or the authors' bucket."""
    return (os.environ.get("BIGTRANSFER_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")


def cached_file(entry: ZooEntry) -> tuple[Path, str] | None:
    """The downloaded file for `entry` and where it came from ('bucket' or 'hub'), if there is one."""
    path = cached_path(entry)
    if path.is_file():
        return path, "bucket"
    hub_file = hub.cached_file(entry.name)
    return (hub_file, "hub") if hub_file is not None else None


def require_cached(entry: ZooEntry) -> Path:
    """The cached file for `entry` (the bucket's or the hub's), or an error naming the command that fetches it."""
    found = cached_file(entry)
    if found is None:
        copy = hub.hub_copy(entry.name)
        also = f"; the Hugging Face hub has it too ({copy.repo_id}: add --source hub)" if copy else ""
        raise BigTransferError(
            f"{entry.name} is not in the cache ({cached_path(entry)}){also}; fetch it with: "
            f"bigtransfer download {entry.name}"
        )
    return found[0]


def recorded_sha256(entry: ZooEntry) -> str | None:
    """The SHA-256 recorded when `entry` was downloaded from the bucket, if it was."""
    sidecar = _sidecar(cached_path(entry))
    try:
        words = sidecar.read_text().split() if sidecar.is_file() else []
    except (OSError, UnicodeDecodeError):
        words = []
    return words[0] if words else None


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def download(entry: ZooEntry, *, force: bool = False, progress: bool = True, limits: Limits | None = None) -> Path:
    """Fetch `entry` from the bucket into the cache, resuming a `.part` file; accepted only if it is
    the released model (format, architecture, head), then renamed into place and its SHA-256 recorded."""
    dest = cached_path(entry)
    if dest.is_file() and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    fetch(f"{base_url()}/{entry.relpath}", part, cap=size_ceiling(entry), limits=limits or Limits.resolve(),
          label=entry.name, progress=progress)
    try:
        check_contents(entry, part, BUCKET_FORMATS, "bucket")
    except BigTransferError:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        raise
    digest = sha256_of(part)
    os.replace(part, dest)
    write_text(_sidecar(dest), f"{digest}  {dest.name}\n", what="SHA-256 record")
    return dest


def verify(entry: ZooEntry) -> bool:
    """True if the cached file still has the SHA-256 recorded when it was downloaded."""
    recorded = recorded_sha256(entry)
    return recorded is not None and sha256_of(cached_path(entry)) == recorded


def check_cached(entry: ZooEntry) -> None:
    """Refuse a cached bucket file that is not the released model (one saved before downloads were checked)."""
    check_contents(entry, cached_path(entry), BUCKET_FORMATS, "cached")
