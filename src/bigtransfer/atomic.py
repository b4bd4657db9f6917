"""Everything bigtransfer puts on disk goes through this module: whole-file writes, folders,
append-only logs, the lock file, and deletions.

Whole files. A file is written under a temporary name in its own folder
(`.NAME.PID.HOSTRANDOM.tmp`), fsynced and renamed over NAME: a reader, or a run resumed after a
crash, sees the old file or the new one, never half of either. A write that fails (full disk,
quota, a file-size limit, a read-only folder) leaves the old file as it was, removes its
temporary file and becomes one BigTransferError naming the file. The temporaries of a writer
that died (kill -9, power cut) are removed by the next run in that folder (`remove_orphans`).

Links. Inside an output folder bigtransfer owns (one that carries our marker), nothing is
reached through a symbolic link: every folder from the topmost marked folder down is opened
with O_NOFOLLOW, and files are created, replaced and deleted relative to that open folder,
never by following a name. A link where our file or folder should be is refused ("not ours").
The marked folder itself, and the path above it, is what the user named and may be a link.

Records. A marked folder may keep `.bigtransfer.written`, one JSON string per line: every
file and folder (with a trailing "/") created in it, recorded before it is created. `rundir`
deletes on --restart only what is recorded there.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import socket
import stat
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import BinaryIO, TextIO

from .errors import BigTransferError
from .safe_text import spreadsheet_writer

RESUME_HINT = "the previous checkpoint is intact: free space and re-run the same command to resume"
MARKER = ".bigtransfer.json"  # an output folder bigtransfer claimed (see rundir)
RECORD = ".bigtransfer.written"  # what was created in it
LOCK = ".bigtransfer.lock"  # held by its one writer
HIDDEN = (MARKER, RECORD, LOCK)  # ours by name, never recorded


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_current_umask()  # what the user's umask gives any new file
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_FOLDER_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC


class NotOurs(BigTransferError):
    """A link (or something else we did not make) where bigtransfer writes its own file or folder."""


def _not_ours(path: Path, what: str) -> NotOurs:
    return NotOurs(f"{path}: {what} where bigtransfer writes its own; it is not ours, so nothing is written, "
                   "replaced or deleted through it (remove it, or choose another output)")


# --------------------------------------------------------------------------- folders opened without links
def _is_marked(folder: Path) -> bool:
    try:
        os.lstat(folder / MARKER)
    except OSError:
        return False
    return True


def _anchor(folder: Path) -> tuple[Path, list[str]]:
    """(the topmost marked folder among `folder` and its parents, the names from it down to
    `folder`); (`folder`, []) when none is marked. The topmost wins: a link lower down cannot
    make itself the anchor by pointing at a folder that carries a marker."""
    folder = Path(folder).absolute()
    chain = [folder, *folder.parents]
    marked = [p for p in chain if _is_marked(p)]
    if not marked:
        return folder, []
    top = marked[-1]
    return top, list(folder.parts[len(top.parts):])


class Folder:
    """An open folder; its entries are created, replaced and removed relative to it, never by
    following a link. Use as a context manager (it holds file descriptors)."""

    def __init__(self, path: Path, fds: list[int], names: list[str], marked: list[bool]):
        self.path = path
        self._fds, self._names, self._marked = fds, names, marked

    @property
    def fd(self) -> int:
        return self._fds[-1]

    def __enter__(self) -> Folder:  # noqa: PYI034  (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def lstat(self, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def open(self, name: str, flags: int, mode: int = 0o666) -> int:
        return os.open(name, flags | _NOFOLLOW | _CLOEXEC, mode, dir_fd=self.fd)

    def child(self, name: str, create: bool = False) -> Folder:
        """The folder `name` in this one (created, and recorded, if missing and `create`)."""
        try:
            fd = self.open(name, _FOLDER_FLAGS)
        except FileNotFoundError:
            if not create:
                raise
            self.record(name, folder=True)
            with contextlib.suppress(FileExistsError):  # another process made it a moment ago
                os.mkdir(name, 0o777, dir_fd=self.fd)
            fd = self.open(name, _FOLDER_FLAGS)
        except OSError as err:
            if _is_link_error(err):
                raise _not_ours(self.path / name, "a symbolic link (or a file) stands") from None
            raise
        fds = [os.dup(f) for f in self._fds] + [fd]
        return Folder(self.path / name, fds, [*self._names, name], [*self._marked, _has_marker(fd)])

    def record(self, name: str, folder: bool = False) -> None:
        """Note `name` (about to be created here) in the record of the nearest marked folder."""
        if name in HIDDEN or not any(self._marked):
            return
        level = max(i for i, m in enumerate(self._marked) if m)
        entry = "/".join([*self._names[level:], name]) + ("/" if folder else "")
        try:
            fd = os.open(RECORD, os.O_WRONLY | os.O_APPEND | _NOFOLLOW | _CLOEXEC, dir_fd=self._fds[level])
        except FileNotFoundError:
            return  # a folder from before records were kept: rundir treats it conservatively
        except OSError as err:
            if _is_link_error(err):
                raise _not_ours(self._record_path(level), "a symbolic link stands") from None
            raise
        try:
            _check_regular(os.fstat(fd), self._record_path(level))
            os.write(fd, (json.dumps(entry) + "\n").encode())
        finally:
            os.close(fd)

    def _record_path(self, level: int) -> Path:
        up = len(self._names) - level
        return (self.path.parents[up - 1] if up else self.path) / RECORD

    def sync(self) -> None:
        with contextlib.suppress(OSError):  # not every filesystem can fsync a folder
            os.fsync(self.fd)

    def entries(self) -> list[os.DirEntry]:
        with os.scandir(self.fd) as found:
            return list(found)


def _has_marker(fd: int) -> bool:
    try:
        os.stat(MARKER, dir_fd=fd, follow_symlinks=False)
    except OSError:
        return False
    return True


def _is_link_error(err: OSError) -> bool:
    return err.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK)  # O_NOFOLLOW met a link (EMLINK: FreeBSD)


def open_folder(path: Path, create: bool = False) -> Folder:
    """`path` as an open Folder: reached from the topmost marked folder down without following
    a link (see the module's docstring); missing folders are created (and recorded) if `create`."""
    top, names = _anchor(Path(path))
    if create and not names:
        os.makedirs(top, exist_ok=True)  # the path the user named: links there are theirs
    folder = Folder(top, [os.open(top, _FOLDER_FLAGS)], [], [_is_marked(top)])
    try:
        for name in names:
            with folder:
                folder = folder.child(name, create)
    except BaseException:
        folder.__exit__()
        raise
    folder.path = Path(path)
    return folder


def make_folder(path: Path, what: str = "folder") -> Path:
    """Create `path` (and its parents) unless it exists; none of it through a link inside an owned folder."""
    try:
        with open_folder(path, create=True):
            pass
    except NotOurs:
        raise
    except OSError as err:
        raise BigTransferError(f"{path}: cannot create the {what} ({err.strerror or err})") from None
    return Path(path)


def _check_regular(st: os.stat_result, path: Path) -> None:
    """A file we append to or lock in place: a plain file of ours, not a link, FIFO, device or hard link."""
    if not stat.S_ISREG(st.st_mode):
        raise _not_ours(path, "something other than a plain file stands")
    if st.st_nlink > 1:
        raise _not_ours(path, "a file with other names (a hard link) stands")


def _check_replaceable(path: Path, st: os.stat_result | None) -> None:
    """The entry at `path` may be replaced by a file of ours (absent, or a plain file)."""
    if st is None or stat.S_ISREG(st.st_mode):
        return
    if stat.S_ISLNK(st.st_mode):
        raise _not_ours(path, "a symbolic link stands")
    if stat.S_ISDIR(st.st_mode):
        raise BigTransferError(f"{path}: is a folder where bigtransfer writes a file; move it away or choose "
                               "another output")
    raise _not_ours(path, "something other than a plain file (a FIFO, socket or device) stands")


# --------------------------------------------------------------------------- the one atomic write
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<host>[0-9a-f]{6})[0-9a-f]{8}\.tmp$")
_OLD_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")  # earlier versions: no host
_LIBRARY_TEMP = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")  # safetensors' save_file, which earlier versions called


def is_temporary(name: str) -> bool:
    """Is `name` the temporary of one of our writes (in flight, or left by a writer that died)?"""
    return bool(_TEMP.match(name) or _OLD_TEMP.match(name))


def temp_name(name: str) -> str:
    """The temporary name a file called `name` is written under (it names this process and host)."""
    return f".{name[:180]}.{os.getpid()}.{_HOST}{secrets.token_hex(4)}.tmp"


def write_atomically(path: Path, write: Callable[[BinaryIO], object], *, what: str = "file",
                     hint: str = "", durable: bool = True) -> Path:
    """Call `write(fh)` to fill a new temporary file beside `path`, fsync it, rename it to `path`.

    The one way bigtransfer writes a file. Errors (a full disk, a file-size limit, a link where
    the file should be) become one BigTransferError naming `path`; the old file stays intact.
    `durable=False` skips the two fsyncs (still whole or absent after a crash of this process,
    not after a power cut): for bulk writers that call `flush_to_disk` once when done."""
    return write_together({Path(path): write}, what=what, hint=hint, durable=durable)[0]


def write_together(writers: dict[Path, Callable[[BinaryIO], object]], *, what: str = "file", hint: str = "",
                   durable: bool = True) -> list[Path]:
    """Several files as one output: each filled under a temporary name beside it, and only when all
    are whole are they renamed into place, so a failure leaves every one of them as it was (an
    output of two files is never half there to block a re-run)."""
    staged: list[tuple[Folder, Path, str | None, bool]] = []  # (folder, path, temporary, is new)
    current = None
    with contextlib.ExitStack() as stack:
        try:
            for path, write in writers.items():
                current = path = Path(path)
                folder = stack.enter_context(open_folder(path.parent, create=True))
                existing = folder.lstat(path.name)
                _check_replaceable(path, existing)
                tmp = temp_name(path.name)
                fd = folder.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
                staged.append((folder, path, tmp, existing is None))
                _fill(fd, write, durable)
            for i, (folder, path, tmp, new) in enumerate(staged):
                current = path
                if new:
                    folder.record(path.name)
                os.replace(tmp, path.name, src_dir_fd=folder.fd, dst_dir_fd=folder.fd)
                staged[i] = (folder, path, None, new)
            if durable:
                for folder, *_ in staged:
                    folder.sync()
        except NotOurs:
            raise
        except OSError as err:
            reason = err.strerror or str(err)
            untouched = "; nothing was written" if len(writers) > 1 else ""
            raise BigTransferError(f"{current}: cannot write the {what} ({reason}){untouched}"
                                   + (f"; {hint}" if hint else "")) from None
        finally:
            for folder, _, tmp, _ in staged:
                if tmp is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp, dir_fd=folder.fd)
    return [path for _, path, _, _ in staged]


def _fill(fd: int, write: Callable[[BinaryIO], object], durable: bool) -> None:
    """Run the writer on a file object of its own (it may close it), then fsync and close `fd`."""
    try:
        with os.fdopen(os.dup(fd), "w+b") as fh:
            write(fh)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def flush_to_disk() -> None:
    """Everything written so far onto the disk (after many `durable=False` writes)."""
    if hasattr(os, "sync"):
        os.sync()


def write_bytes(path: Path, data: bytes | bytearray | memoryview, what: str = "file", hint: str = "") -> Path:
    """`data` into `path`, atomically."""
    return write_atomically(path, lambda fh: fh.write(data), what=what, hint=hint)


def copy_file(source: Path, path: Path, what: str = "file", durable: bool = True) -> Path:
    """A finished file built elsewhere (a private temporary folder) copied into `path`, atomically."""
    def write(fh: BinaryIO) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, fh, 1 << 20)

    return write_atomically(path, write, what=what, durable=durable)


def write_text(path: Path, text: str, what: str = "file") -> Path:
    """`text` (UTF-8) into `path`, atomically."""
    return write_bytes(path, text.encode("utf-8"), what)


def write_json(path: Path, data, what: str = "file") -> Path:
    """`data` as indented JSON into `path`, atomically."""
    return write_text(path, json.dumps(data, indent=2, default=str) + "\n", what)


def csv_writer(header: Sequence, rows: Iterable[Sequence]) -> Callable[[BinaryIO], None]:
    """A writer of a CSV file (a header row, then `rows`) in UTF-8 whose text cells cannot start a
    spreadsheet formula (see safe_text.spreadsheet_cell)."""
    def write(fh: BinaryIO) -> None:
        with io.TextIOWrapper(fh, encoding="utf-8", newline="") as text:
            writer = spreadsheet_writer(text)
            writer.writerow(header)
            writer.writerows(rows)

    return write


def write_csv(path: Path, header: Sequence, rows: Iterable[Sequence], what: str = "file") -> Path:
    """A CSV file (a header row, then `rows`) into `path`, atomically; spreadsheet-safe cells."""
    return write_atomically(path, csv_writer(header, rows), what=what)


def write_figure(path: Path, fig, dpi: int = 100, what: str = "figure") -> Path:
    """A matplotlib figure as PNG into `path`, atomically."""
    return write_atomically(path, lambda fh: fig.savefig(fh, format="png", dpi=dpi), what=what)


def write_image(path: Path, image, what: str = "image", durable: bool = True, **options) -> Path:
    """A PIL image into `path` (format from the suffix), atomically."""
    from PIL import Image

    fmt = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    return write_atomically(path, lambda fh: image.save(fh, format=fmt, **options), what=what, durable=durable)


def write_npy(path: Path, array, what: str = "array") -> Path:
    """A numpy array as .npy into `path`, atomically."""
    import numpy as np

    return write_atomically(path, lambda fh: np.save(fh, array, allow_pickle=False), what=what)


# --------------------------------------------------------------------------- safetensors, streamed
_SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                       "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
                       "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


def write_safetensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None, *,
                      what: str = "weights file", hint: str = "") -> Path:
    """torch tensors as a .safetensors file, atomically, streamed tensor by tensor (no second copy
    of the model in memory, and no temporary file of the library's own)."""
    import torch

    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))  # each tensor aligned to its size
    offset = 0
    for name in order:
        tensor = tensors[name]
        dtype = _SAFETENSORS_DTYPES.get(str(tensor.dtype).removeprefix("torch."))
        if dtype is None:
            raise ValueError(f"{name}: safetensors cannot hold {tensor.dtype}")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)

    def write(fh: BinaryIO) -> None:
        fh.write(len(text).to_bytes(8, "little") + text)
        for name in order:
            tensor = tensors[name].detach()
            if tensor.numel():
                flat = tensor.to("cpu").contiguous().reshape(-1).view(torch.uint8)
                fh.write(memoryview(flat.numpy()))

    return write_atomically(path, write, what=what, hint=hint)


# --------------------------------------------------------------------------- appends, locks, deletions
def open_append(path: Path, what: str = "log") -> TextIO:
    """`path` opened for appending lines (created if missing): a plain file of ours, never a link."""
    path = Path(path)
    try:
        with open_folder(path.parent, create=True) as folder:
            existing = folder.lstat(path.name)
            _check_replaceable(path, existing)
            if existing is None:
                folder.record(path.name)
            fd = folder.open(path.name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
        try:
            _check_regular(os.fstat(fd), path)
        except BaseException:
            os.close(fd)
            raise
    except NotOurs:
        raise
    except OSError as err:
        raise BigTransferError(f"{path}: cannot open the {what} ({err.strerror or err})") from None
    return os.fdopen(fd, "a", buffering=1, encoding="utf-8")


def open_lock(path: Path) -> int:
    """A descriptor of the lock file `path` (created if missing), read-write: a plain file of
    ours, never a link, FIFO or device, so taking the lock truncates nothing of anyone else's."""
    path = Path(path)
    with open_folder(path.parent) as folder:
        _check_replaceable(path, folder.lstat(path.name))
        fd = folder.open(path.name, os.O_RDWR | os.O_CREAT | getattr(os, "O_NONBLOCK", 0), 0o644)
    try:
        _check_regular(os.fstat(fd), path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_empty(path: Path) -> None:
    """A new empty file `path` (nothing if it exists): for records of our own."""
    with open_folder(Path(path).parent) as folder, contextlib.suppress(FileExistsError):
        os.close(folder.open(Path(path).name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))


def remove_file(path: Path) -> bool:
    """Delete the file `path` if it is there (True if it was); never through or at a link."""
    path = Path(path)
    try:
        folder = open_folder(path.parent)
    except FileNotFoundError:
        return False
    with folder:
        st = folder.lstat(path.name)
        if st is None:
            return False
        if not stat.S_ISREG(st.st_mode):
            raise _not_ours(path, "a symbolic link or something other than a plain file stands")
        os.unlink(path.name, dir_fd=folder.fd)
    return True


def remove_empty_folder(path: Path) -> bool:
    """Remove the folder `path` if it is empty (True if it was removed); never through a link."""
    path = Path(path)
    try:
        folder = open_folder(path.parent)
    except FileNotFoundError:
        return False
    with folder:
        st = folder.lstat(path.name)
        if st is None or not stat.S_ISDIR(st.st_mode):
            return False
        try:
            os.rmdir(path.name, dir_fd=folder.fd)
        except OSError:
            return False  # not empty (or in use): it stays
    return True


def read_record(folder: Path) -> set[str] | None:
    """The entries recorded as created in `folder` (relative paths, folders ending in "/"), or
    None if it keeps no record. Lines that are not a complete, plain relative path are ignored."""
    try:
        with open_folder(folder) as opened:
            fd = opened.open(RECORD, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise _not_ours(Path(folder) / RECORD, "something other than a plain file stands")
        lines = fh.read().decode("utf-8", "replace").split("\n")[:-1]  # the last, unterminated one is half a line
    entries = set()
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        parts = entry.rstrip("/").split("/") if isinstance(entry, str) else []
        if parts and all(p not in ("", ".", "..") for p in parts) and not entry.startswith("/"):
            entries.add(entry)
    return entries


# --------------------------------------------------------------------------- orphans of dead writers
def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    except OverflowError:
        return False  # no process has such a pid
    return True


def _dead_temp(name: str, st: os.stat_result, locked_since: float | None) -> bool:
    """Is `name` a temporary file whose writer is gone? Ours name their pid and host: a pid that
    is not alive on this host is gone. Any temporary older than the lock we now hold is gone
    too (one writer at a time): that covers other hosts, reused pids and older formats."""
    older = locked_since is not None and st.st_mtime < locked_since
    match = _TEMP.match(name)
    if match:
        return older or (match["host"] == _HOST and not _alive(int(match["pid"])))
    return older and bool(_OLD_TEMP.match(name) or _LIBRARY_TEMP.match(name))


def remove_dead_temps(path: Path) -> None:
    """Delete the temporaries that dead writers on this host left for the file `path` (a single
    output file, such as an export, whose folder is the user's and keeps no lock)."""
    prefix = f".{Path(path).name[:180]}."
    try:
        folder = open_folder(Path(path).parent)
    except OSError:
        return
    with folder:
        for entry in folder.entries():
            if entry.name.startswith(prefix) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    if _dead_temp(entry.name, entry.stat(follow_symlinks=False), None):
                        os.unlink(entry.name, dir_fd=folder.fd)


def remove_orphans(path: Path, locked_since: float | None = None) -> list[Path]:
    """Delete the temporary files of dead writers in the owned folder `path` and its subfolders
    (not those of nested output folders, which their own writers clean); returns what went."""
    removed: list[Path] = []
    try:
        folder = open_folder(path)
    except (FileNotFoundError, NotOurs):
        return removed
    with folder:
        _remove_orphans_in(folder, locked_since, removed, top=True)
    return removed


def _remove_orphans_in(folder: Folder, locked_since: float | None, removed: list[Path], top: bool) -> None:
    if not top and _has_marker(folder.fd):
        return
    for entry in folder.entries():
        if entry.is_dir(follow_symlinks=False):
            with folder.child(entry.name) as sub:
                _remove_orphans_in(sub, locked_since, removed, top=False)
        elif entry.is_file(follow_symlinks=False) and entry.name.startswith("."):
            with contextlib.suppress(OSError):
                if _dead_temp(entry.name, entry.stat(follow_symlinks=False), locked_since):
                    os.unlink(entry.name, dir_fd=folder.fd)
                    removed.append(folder.path / entry.name)
