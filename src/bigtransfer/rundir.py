"""Output folders the project owns: claimed before anything is written, one writer at a time.

Every verb that writes a folder (`--out`) first *claims* it: a new folder, an empty one, or one
that already holds our output of the same kind. Anything else (a folder with the user's own
files, a file, a run of another kind) is refused before a byte is written. A claimed folder
carries a marker (`.bigtransfer.json`); folders written before markers existed are recognised
by their contents (every entry a name we write, the main file in our format) and adopted.

While a verb writes a folder it holds an exclusive lock on `.bigtransfer.lock`: a second
process on the same folder stops at once with an error naming the holder (pid, host, start
time). The kernel drops the lock when its holder dies, however it dies, so a lock left by a dead
process is simply taken over. `--restart` deletes only the files we write, by name.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .atomic import write_json
from .errors import BigTransferError

MARKER = ".bigtransfer.json"
LOCK = ".bigtransfer.lock"
MARKER_FORMAT = "bigtransfer-output-1"

# What each kind of output folder may hold: entries written by the project (a trailing "/"
# marks a folder of ours, with the patterns of the files we write in it).
_RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "final.safetensors", "skipped_images.txt")
_RUN_FOLDERS = {"checkpoints": ("latest.safetensors", ".latest.safetensors.*"),
                "tensorboard": ("events.out.tfevents.*",)}
_PROTOCOL_FILES = ("protocol.json", "results.json", "results.csv", "report.html")


def _json_has(path: Path, *keys: str) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and all(k in data for k in keys)


def _is_run(folder: Path) -> bool:
    return _json_has(folder / "config.json", "fingerprint")


def _is_protocol(kind: str) -> Callable[[Path], bool]:
    def check(folder: Path) -> bool:
        try:
            return json.loads((folder / "protocol.json").read_text()).get("protocol") == kind
        except (OSError, ValueError, AttributeError):
            return False
    return check


def _is_sqlite(path: Path) -> bool:
    """A search's study database (a worker may create it before the protocol file)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


# kind -> (names a legacy folder of that kind may hold, test of its main file)
KINDS: dict[str, tuple[tuple[str, ...], Callable[[Path], bool]]] = {
    "finetune": (_RUN_FILES + tuple(_RUN_FOLDERS), _is_run),
    "pretrain": (_RUN_FILES + tuple(_RUN_FOLDERS), _is_run),
    "distill": (_RUN_FILES + tuple(_RUN_FOLDERS) + _PROTOCOL_FILES + ("cache", "baseline"), _is_run),
    "detect-train": (_RUN_FILES + tuple(_RUN_FOLDERS) + ("detections.json",), _is_run),
    "demo": (("pretrain", "transfer", "scratch", "summary.json", "accuracy_vs_examples.png"),
             lambda f: _is_run(f / "pretrain")),
    # protocol folders hold one folder per job or task ("*/": any folder)
    "fewshot": (_PROTOCOL_FILES + ("linear_probe.json", "*/"), _is_protocol("fewshot")),
    "vtab": (_PROTOCOL_FILES + ("*/",), _is_protocol("vtab")),
    "ablation": (_PROTOCOL_FILES + ("*/",), _is_protocol("ablation")),
    "search": (_PROTOCOL_FILES + ("study.sqlite3", "final.json", "*/"),
               lambda f: _is_protocol("search")(f) or _is_sqlite(f / "study.sqlite3")),
    "objectnet": (_PROTOCOL_FILES + ("objectnet.json", "per_class_accuracy.csv"), _is_protocol("objectnet")),
    "evaluate": (("metrics.json", "confusion.csv", "per_class_accuracy.csv", "confusion.png"),
                 lambda f: _json_has(f / "metrics.json", "top1", "model")),
    "detect-eval": (("metrics.json", "detections.json"), lambda f: _json_has(f / "metrics.json", "AP")),
    "dedup": (("pairs.csv", "upstream_filtered.csv", "contact_sheet.png", "contact_sheet.html", "summary.json",
               "images"), lambda f: _json_has(f / "summary.json", "pairs", "upstream_images")),
    "pack": (("dataset.json",), lambda f: _json_has(f / "dataset.json", "format", "splits")),
    "push": (("README.md", "config.json", "model.safetensors", "preprocessor_config.json", "timm"), lambda f: False),
    "export-transformers": (("config.json", "model.safetensors", "preprocessor_config.json"), lambda f: False),
    "export-triton": (("*/",), lambda f: False),  # a Triton model repository: one folder per model
    "import": (("train", "test"), lambda f: False),  # a data folder: never adopt one without our marker
}


class RunInUse(BigTransferError):
    """Another live process holds the folder's lock."""


def _marker(folder: Path) -> dict | None:
    path = folder / MARKER
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        raise BigTransferError(f"{path}: damaged marker file (not JSON); delete it if the folder is ours") from None
    if not isinstance(data, dict) or data.get("format") != MARKER_FORMAT or not isinstance(data.get("kind"), str):
        raise BigTransferError(f"{path}: not a bigtransfer marker file")
    return data


def _ours(folder: Path, kind: str, name: str) -> bool:
    """Is `name` an entry a `kind` folder's verb writes?"""
    names = KINDS[kind][0]
    return name in names or ("*/" in names and (folder / name).is_dir())


def _legacy(folder: Path, kind: str, entries: list[str]) -> bool:
    """A folder written before markers existed: only names we write, and our main file."""
    return bool(entries) and all(_ours(folder, kind, e) for e in entries) and KINDS[kind][1](folder)


def describe_kind(kind: str) -> str:
    return f"a bigtransfer {kind} output"


def check_claim(out: Path, kind: str, flag: str = "--out") -> bool:
    """Can `out` be written as a `kind` folder? Raises if not; True if it already holds our output.

    Reads only: safe to call before any data is loaded (a wrong --out fails in a second)."""
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BigTransferError(f"{flag} {out}: exists and is not a folder; name a new or empty folder")
    if not out.is_dir():
        return False
    marker = _marker(out)
    if marker is not None:
        if marker["kind"] != kind:
            raise BigTransferError(f"{flag} {out}: holds a bigtransfer {marker['kind']} output, not a {kind} "
                                   f"one; choose another folder")
        return True
    entries = sorted(e.name for e in out.iterdir() if e.name != LOCK)
    if not entries:
        return False
    if _legacy(out, kind, entries):
        return True
    foreign = [e for e in entries if not _ours(out, kind, e)] or entries
    raise BigTransferError(
        f"{flag} {out}: the folder holds files bigtransfer did not write ({foreign[0]!r}"
        f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); name a new or empty folder")


def claim(out: Path, kind: str, flag: str = "--out") -> Path:
    """Create or adopt `out` as a `kind` output folder (see `check_claim`) and mark it as ours."""
    out = Path(out)
    check_claim(out, kind, flag)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / MARKER).is_file():
            write_json(out / MARKER, {"format": MARKER_FORMAT, "kind": kind, "created": _now()})
    except OSError as err:
        raise BigTransferError(f"{flag} {out}: cannot create the folder ({err.strerror})") from None
    return out


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


# --------------------------------------------------------------------------- one writer
@contextlib.contextmanager
def exclusive(out: Path, flag: str = "--out") -> Iterator[None]:
    """Hold `out`'s lock for the block; raises RunInUse naming the holder if another process has it."""
    path = Path(out) / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise BigTransferError(f"{flag} {out}: cannot create the lock file ({err.strerror})") from None
    try:
        if not _lock_soon(fd):
            holder = _read_holder(fd)
            raise RunInUse(
                f"{flag} {out}: another bigtransfer process is writing this folder (pid {holder.get('pid', '?')} "
                f"on {holder.get('host', '?')}, started {holder.get('started', '?')}: "
                f"{holder.get('command', '?')}); wait for it to finish or stop it first")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
              "command": " ".join(["bigtransfer", *sys.argv[1:]])[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


LOCK_PATIENCE = 5.0  # seconds: a holder killed a moment ago may still be exiting


def _lock_soon(fd: int) -> bool:
    """The lock, if it comes free within LOCK_PATIENCE (a live holder keeps it much longer)."""
    deadline = time.monotonic() + LOCK_PATIENCE
    while not _try_lock(fd):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _try_lock(fd: int) -> bool:
    """A POSIX record lock: held by this process alone (not by the loader processes it forks, as
    flock's would be), released by the kernel when the process dies, and honoured over NFS."""
    try:
        import fcntl
    except ImportError:  # no POSIX locks (Windows): a single writer is then the user's responsibility
        return True
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise
    return True


def _read_holder(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def owned(out: Path, kind: str, *, main: bool = True, agree: Callable[[bool], bool] | None = None,
          flag: str = "--out") -> Iterator[Path]:
    """Claim and lock `out` for the block (on the main process; other processes of a torchrun
    job are the same writer). `agree` shares the main process's success with the others, so a
    refused claim stops every process, not only the main one."""
    agree = agree or (lambda ok: ok)
    if not main:
        if not agree(True):
            raise BigTransferError(f"{flag} {out}: the main process could not claim this folder")
        yield Path(out)
        return
    with contextlib.ExitStack() as stack:
        try:
            claim(out, kind, flag)
            stack.enter_context(exclusive(out, flag))
        except BigTransferError:
            agree(False)
            raise
        agree(True)
        yield Path(out)


# --------------------------------------------------------------------------- --restart
def clear(out: Path, kind: str) -> list[Path]:
    """Delete the files a `kind` folder's verb writes (by name; nothing else); returns what was kept.

    `out` keeps its marker and lock; nested run folders of ours (the demo's pre-training and
    fine-tuning runs) are cleared the same way and removed once empty."""
    out = Path(out)
    kept: list[Path] = []
    if check_claim(out, kind):
        _clear_folder(out, kind, kept)
    return kept


def _clear_folder(folder: Path, kind: str, kept: list[Path]) -> None:
    for entry in sorted(folder.iterdir()):
        if entry.name in (MARKER, LOCK):
            continue
        if not _ours(folder, kind, entry.name) or entry.is_symlink():
            kept.append(entry)
        elif not entry.is_dir():
            entry.unlink()
        elif entry.name in _RUN_FOLDERS and kind in ("finetune", "pretrain", "distill", "detect-train"):
            _clear_patterns(entry, _RUN_FOLDERS[entry.name], kept)
            _remove_if_empty(entry)
        else:
            _clear_nested(entry, kept)


def _clear_patterns(folder: Path, patterns: tuple[str, ...], kept: list[Path]) -> None:
    for entry in folder.iterdir():
        if entry.is_file() and any(entry.match(p) for p in patterns):
            entry.unlink()
        else:
            kept.append(entry)


def _clear_nested(folder: Path, kept: list[Path]) -> None:
    """A folder below an output folder: a run of ours is cleared, a plain folder searched for runs."""
    try:
        marker = _marker(folder)
    except BigTransferError:
        marker = None
    kind = marker["kind"] if marker else "finetune" if _is_run(folder) else None
    if kind is not None:
        _clear_folder(folder, kind, kept)  # its marker stays while anything of the user's is left in it
    else:
        for entry in sorted(folder.iterdir()):
            if entry.is_dir() and not entry.is_symlink():
                _clear_nested(entry, kept)
            else:
                kept.append(entry)
    _remove_if_empty(folder)


def _remove_if_empty(folder: Path) -> None:
    """Remove `folder` if nothing but our marker and a released lock is left in it."""
    if any(e.name not in (MARKER, LOCK) for e in folder.iterdir()):
        return
    if (folder / LOCK).exists():
        with exclusive(folder):  # raises if another process is writing it: then it stays
            (folder / LOCK).unlink()
    (folder / MARKER).unlink(missing_ok=True)
    folder.rmdir()


# --------------------------------------------------------------------------- single files
def check_new_file(path: Path, flag: str = "--out", overwrite: bool = False) -> Path:
    """An output file: refuse to replace an existing file unless `overwrite` (and never a folder)."""
    path = Path(path)
    if path.is_dir():
        raise BigTransferError(f"{flag} {path}: is a folder; name the output file")
    if path.exists() and not overwrite:
        raise BigTransferError(f"{flag} {path}: the file exists; pass --overwrite to replace it")
    return path


def maybe_owned(out: Path | None, kind: str, flag: str = "--out") -> contextlib.AbstractContextManager:
    """`owned(out, kind)` when an output folder is given, else nothing."""
    return contextlib.nullcontext() if out is None else owned(Path(out), kind, flag=flag)
