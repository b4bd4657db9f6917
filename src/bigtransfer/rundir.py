"""Output folders the project owns: claimed before anything is written, one writer at a time.

Every verb that writes a folder (`--out`) first *claims* it: a new folder, an empty one, or one
that already holds our output of the same kind. Anything else (a folder with the user's own
files, a file, a run of another kind) is refused before a byte is written. A claimed folder
carries a marker (`.bigtransfer.json`); folders written before markers existed are recognised
by their contents (every entry a name we write, the main file in our format) and adopted.

While a verb writes a folder it holds an exclusive lock on `.bigtransfer.lock`: a second
process on the same folder stops at once with an error naming the holder (pid, host, start
time). The kernel drops the lock when its holder dies, however it dies, so a lock left by a dead
process is simply taken over, and the temporary files the dead one left are removed.

A folder is not ours if a symbolic link stands where we write a file or folder (or anywhere in
a folder of ours): it is refused before anything is written (`atomic` refuses such links again
at every write). A folder claimed new keeps a record of everything created in it
(`.bigtransfer.written`); `clear` (--restart) deletes what is recorded and nothing else. Folders
from before records were kept are cleared by name, conservatively: files we write and folders
of ours, never a plain folder (it may be the user's).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from . import atomic
from .atomic import HIDDEN, LOCK, MARKER, RECORD, NotOurs, write_json
from .errors import BigTransferError
from .safe_text import load_json

__all__ = ["KINDS", "LOCK", "MARKER", "RECORD", "RunInUse", "check_claim", "check_new_file", "claim", "clear",
           "exclusive", "maybe_owned", "owned"]
MARKER_FORMAT = "bigtransfer-output-1"

# What each kind of output folder may hold: entries written by the project (a trailing "/"
# marks a folder of ours, with the patterns of the files we write in it).
_RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "final.safetensors", "skipped_images.txt")
_RUN_FOLDERS = {"checkpoints": ("latest.safetensors", ".latest.safetensors.*"),
                "tensorboard": ("events.out.tfevents.*",)}
_PROTOCOL_FILES = ("protocol.json", "results.json", "results.csv", "report.html")


def _json_has(path: Path, *keys: str) -> bool:
    try:
        data = load_json(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and all(k in data for k in keys)


def _is_run(folder: Path) -> bool:
    return _json_has(folder / "config.json", "fingerprint")


def _is_protocol(kind: str) -> Callable[[Path], bool]:
    def check(folder: Path) -> bool:
        try:
            return load_json((folder / "protocol.json").read_text()).get("protocol") == kind
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
        data = load_json(path.read_text())
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
    if out.is_symlink() and not out.exists():
        raise BigTransferError(f"{flag} {out}: is a symbolic link to nothing; name a new or empty folder")
    if out.exists() and not out.is_dir():
        raise BigTransferError(f"{flag} {out}: exists and is not a folder; name a new or empty folder")
    if not out.is_dir():
        return False
    _check_hidden(out, flag)
    marker = _marker(out)
    if marker is not None:
        if marker["kind"] != kind:
            raise BigTransferError(f"{flag} {out}: holds a bigtransfer {marker['kind']} output, not a {kind} "
                                   f"one; choose another folder")
        _refuse_planted_links(out, kind, flag)
        return True
    # Another process claiming the same folder this instant (workers of one sweep) shows as the
    # temporary of its marker: a write of ours in flight, not a file of the user's.
    entries = sorted(e.name for e in out.iterdir() if e.name not in HIDDEN and not atomic.is_temporary(e.name))
    if not entries:
        return False
    if _legacy(out, kind, entries):
        _refuse_planted_links(out, kind, flag)
        return True
    foreign = [e for e in entries if not _ours(out, kind, e)] or entries
    raise BigTransferError(
        f"{flag} {out}: the folder holds files bigtransfer did not write ({foreign[0]!r}"
        f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); name a new or empty folder")


def _check_hidden(out: Path, flag: str) -> None:
    """Our marker, record and lock: plain files of ours, or absent (never a link, a FIFO, a device,
    a folder, or a hard link to a file that has other names)."""
    for name in HIDDEN:
        try:
            st = os.lstat(out / name)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
            raise NotOurs(f"{flag} {out}: {name!r} there is a symbolic link or not a plain file of ours; "
                          "bigtransfer keeps its own marker, record and lock there, so the folder is not ours to "
                          "write (remove it or choose another folder)")


def _refuse_planted_links(out: Path, kind: str, flag: str) -> None:
    """A symbolic link where a `kind` folder's verb writes, or anywhere inside a folder of ours
    there, makes `out` not ours: refused before anything is written or deleted. What the folder's
    record names counts as a name we write, whatever the kind."""
    recorded = {e.split("/")[0] for e in atomic.read_record(out) or ()}
    for entry in os.scandir(out):
        if entry.name in HIDDEN:
            continue
        ours = entry.name in recorded or _ours(out, kind, entry.name)
        if entry.is_symlink():
            if ours:
                raise NotOurs(f"{flag} {out}: {entry.name!r} there is a symbolic link where bigtransfer writes its "
                              "own file or folder; the folder is not ours to write (remove the link or choose "
                              "another folder)")
        elif entry.is_dir(follow_symlinks=False) and ours:
            link = _first_link(Path(entry.path))
            if link is not None:
                raise NotOurs(f"{flag} {out}: {str(link.relative_to(out))!r} there is a symbolic link inside a "
                              "folder bigtransfer writes; the folder is not ours to write (remove the link or "
                              "choose another folder)")


def _first_link(folder: Path) -> Path | None:
    for root, dirs, files in os.walk(folder):  # os.walk does not descend into links
        for name in sorted(dirs + files):
            if os.path.islink(os.path.join(root, name)):
                return Path(root, name)
    return None


def claim(out: Path, kind: str, flag: str = "--out", *, clean: bool = True) -> Path:
    """Create or adopt `out` as a `kind` output folder (see `check_claim`) and mark it as ours.

    A folder marked here (new or empty) keeps a record of what is created in it. `clean`: remove
    the temporary files dead writers left (`owned` does it once it holds the lock)."""
    out = Path(out)
    check_claim(out, kind, flag)
    try:
        atomic.make_folder(out)
        if not (out / MARKER).is_file():
            if not any(e.name not in HIDDEN for e in out.iterdir()):
                atomic.create_empty(out / RECORD)  # before the marker: a marked folder without one is from before
            write_json(out / MARKER, {"format": MARKER_FORMAT, "kind": kind, "created": _now()})
    except NotOurs:
        raise
    except OSError as err:
        raise BigTransferError(f"{flag} {out}: cannot create the folder ({err.strerror})") from None
    if clean:
        atomic.remove_orphans(out)
    return out


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


# --------------------------------------------------------------------------- one writer
@contextlib.contextmanager
def exclusive(out: Path, flag: str = "--out") -> Iterator[None]:
    """Hold `out`'s lock for the block; raises RunInUse naming the holder if another process has it."""
    try:
        fd = atomic.open_lock(Path(out) / LOCK)
    except NotOurs:
        raise
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
            claim(out, kind, flag, clean=False)
            stack.enter_context(exclusive(out, flag))
        except BigTransferError:
            agree(False)
            raise
        agree(True)
        atomic.remove_orphans(out, locked_since=time.time())  # one writer at a time: older temporaries are dead
        yield Path(out)


# --------------------------------------------------------------------------- --restart
_RUN_KINDS = ("finetune", "pretrain", "distill", "detect-train")


def clear(out: Path, kind: str) -> list[Path]:
    """Delete what bigtransfer recorded as created in the `kind` folder `out`, nothing else;
    returns what was kept (the user's files and folders).

    `out` keeps its marker, record and lock; nested output folders of ours (the demo's
    pre-training and fine-tuning runs) are cleared by their own records and removed once empty.
    A folder from before records were kept is cleared by name (see the module's docstring)."""
    out = Path(out)
    if not check_claim(out, kind):
        return []
    _clear(out, kind)
    return _left_over(out)


def _clear(folder: Path, kind: str) -> None:
    record = atomic.read_record(folder)
    if record is None:
        _clear_by_name(folder, kind)
        atomic.create_empty(folder / RECORD)  # from now on, what is created here is recorded
        return
    for entry in sorted(record, key=lambda e: (-len(e.rstrip("/").split("/")), e)):  # contents before folders
        path = folder / entry
        if not entry.endswith("/"):
            with contextlib.suppress(NotOurs):  # a link or a folder at a recorded name: the user's now
                atomic.remove_file(path)
        elif not path.is_symlink() and _has_marker(path):
            _clear_nested_output(path)
        else:
            atomic.remove_empty_folder(path)
    left = sorted(e for e in record if os.path.lexists(folder / e))
    atomic.write_text(folder / RECORD, "".join(json.dumps(e) + "\n" for e in left), what="record")


def _has_marker(folder: Path) -> bool:
    return (folder / MARKER).is_file() and not (folder / MARKER).is_symlink()


def _clear_by_name(folder: Path, kind: str) -> None:
    """A folder from before records were kept: the files a `kind` verb writes, by name, and the
    runs of ours below it; a plain folder stays (it may be the user's)."""
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name in HIDDEN or entry.is_symlink() or not _ours(folder, kind, entry.name):
            continue
        path = Path(entry.path)
        if not entry.is_dir(follow_symlinks=False):
            atomic.remove_file(path)
        elif entry.name in _RUN_FOLDERS and kind in _RUN_KINDS:
            for sub in os.scandir(path):
                if sub.is_file(follow_symlinks=False) and any(Path(sub.name).match(p) for p in _RUN_FOLDERS[entry.name]):
                    atomic.remove_file(Path(sub.path))
            atomic.remove_empty_folder(path)
        else:
            _clear_runs_below(path)


def _clear_runs_below(folder: Path) -> None:
    if _has_marker(folder) or _is_run(folder):
        _clear_nested_output(folder)
        return
    for entry in os.scandir(folder):
        if entry.is_dir(follow_symlinks=False):
            _clear_runs_below(Path(entry.path))


def _clear_nested_output(folder: Path) -> None:
    """An output folder of ours inside the one being cleared: cleared under its own lock (a
    process writing it stops the restart) and removed if nothing of the user's is left in it."""
    try:
        marker = _marker(folder)
    except BigTransferError:
        marker = None
    kind = marker["kind"] if marker and marker["kind"] in KINDS else "finetune"
    with exclusive(folder):
        _clear(folder, kind)
        if any(e.name not in HIDDEN for e in os.scandir(folder)):
            return
        for name in HIDDEN:
            atomic.remove_file(folder / name)
    atomic.remove_empty_folder(folder)


def _left_over(out: Path) -> list[Path]:
    """What is left in `out` besides our marker, record and lock: files, links and empty folders."""
    left = []
    for root, dirs, files in os.walk(out):
        names = [n for n in files if n not in HIDDEN] + [d for d in dirs if os.path.islink(os.path.join(root, d))]
        left.extend(Path(root, n) for n in names)
        if root != str(out) and not dirs and not os.listdir(root):
            left.append(Path(root))
    return sorted(left)


# --------------------------------------------------------------------------- single files
def check_new_file(path: Path, flag: str = "--out", overwrite: bool = False) -> Path:
    """An output file: refuse to replace an existing file unless `overwrite` (and never a folder)."""
    path = Path(path)
    if path.is_symlink():
        raise NotOurs(f"{flag} {path}: is a symbolic link{'' if path.exists() else ' to nothing'}; bigtransfer "
                      "writes no file through a link: name the file itself")
    if path.is_dir():
        raise BigTransferError(f"{flag} {path}: is a folder; name the output file")
    if path.exists() and not path.is_file():
        raise BigTransferError(f"{flag} {path}: is not a plain file; name a new file")
    if path.exists() and not overwrite:
        raise BigTransferError(f"{flag} {path}: the file exists; pass --overwrite to replace it")
    atomic.remove_dead_temps(path)  # of a writer killed while writing this file
    return path


def maybe_owned(out: Path | None, kind: str, flag: str = "--out") -> contextlib.AbstractContextManager:
    """`owned(out, kind)` when an output folder is given, else nothing."""
    return contextlib.nullcontext() if out is None else owned(Path(out), kind, flag=flag)
