"""One download's limits, and a bounded, resumable HTTP transfer into a `.part` file.

A mirror may be slow, broken or lying. What it can make us do is bounded here: the bytes taken
(a cap known before the first byte is read), the time without a byte (the stall timeout), the
time in all (the deadline, enforced by a watchdog that shuts the connection, so a server that
drips headers or body a byte at a time is cut off too), and headers that cannot be parsed or
contradict the request are refused. A transfer that breaks off, stalls or runs out of time keeps
its `.part` to resume from; a reply that lies (too long, malformed, a range we did not ask for)
has its `.part` removed.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import math
import os
import re
import socket
import ssl
import stat
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import BigTransferError

STALL_TIMEOUT_ENV = "BIGTRANSFER_DOWNLOAD_STALL_TIMEOUT"
DEADLINE_ENV = "BIGTRANSFER_DOWNLOAD_DEADLINE"
DEFAULT_STALL_TIMEOUT = 60.0  # seconds without a byte
DEFAULT_DEADLINE = 2 * 3600.0  # seconds for one file; what arrived is kept, and the next run resumes
CHUNK = 1 << 20


@dataclass(frozen=True)
class Limits:
    """How long one file's download may go without a byte, and in all (seconds)."""

    stall_timeout: float = DEFAULT_STALL_TIMEOUT
    deadline: float = DEFAULT_DEADLINE

    @classmethod
    def resolve(cls, stall_timeout: float | None = None, deadline: float | None = None) -> Limits:
        """The limits from flags when given, else from the environment, else the defaults."""
        return cls(
            stall_timeout if stall_timeout is not None else _seconds_from_env(STALL_TIMEOUT_ENV, DEFAULT_STALL_TIMEOUT),
            deadline if deadline is not None else _seconds_from_env(DEADLINE_ENV, DEFAULT_DEADLINE),
        )


def parse_seconds(text: str) -> float:
    """A positive, finite number of seconds, or ValueError saying what was wrong."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {text[:40]!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"expected a positive number of seconds, got {text[:40]!r}")
    return value


def _seconds_from_env(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return parse_seconds(text)
    except ValueError as err:
        raise BigTransferError(f"{name}: {err}") from None


_KEPT = "what arrived is kept: run the same command again to resume"


def deadline_error(label: str, seconds: float, again: str = _KEPT) -> BigTransferError:
    """A download ran past its deadline (`again`: what the next run does with what arrived)."""
    return BigTransferError(f"{label}: not finished within the {seconds:g} s deadline; {again}, or allow longer "
                            f"with --deadline (or {DEADLINE_ENV})")


def stall_error(label: str, where: str, seconds: float, again: str = _KEPT) -> BigTransferError:
    """A server sent nothing for the stall timeout."""
    return BigTransferError(f"{label}: no data from {where} for {seconds:g} s; {again}, or wait longer with "
                            f"--stall-timeout (or {STALL_TIMEOUT_ENV})")


# --------------------------------------------------------------------------- the deadline
class Deadline:
    """The moment a transfer must end. Sockets handed to `watch` are shut when it passes, which
    ends any read blocked on them; `check` raises once it has passed."""

    def __init__(self, seconds: float, label: str):
        self.seconds, self.label = seconds, label
        self._end = time.monotonic() + seconds
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.expired = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def start(self) -> None:
        self._timer.start()

    def stop(self) -> None:
        self._timer.cancel()

    def passed(self) -> bool:
        return self.expired or time.monotonic() >= self._end

    def check(self) -> None:
        if self.passed():
            raise self.error()

    def error(self) -> BigTransferError:
        return deadline_error(self.label, self.seconds)

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            expired = self.expired
        if expired:
            _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed, or detached into a TLS socket (watched too)
        sock.shutdown(socket.SHUT_RDWR)


class _WatchedHTTPConnection(http.client.HTTPConnection):
    """A connection whose socket the deadline can shut, from the TCP connect on."""

    def __init__(self, *args, deadline: Deadline, **kwargs):
        super().__init__(*args, **kwargs)
        self._deadline = deadline
        self._create_connection = self._watched_connection

    def _watched_connection(self, *args, **kwargs) -> socket.socket:
        sock = socket.create_connection(*args, **kwargs)
        self._deadline.watch(sock)
        return sock


class _WatchedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, deadline: Deadline, **kwargs):
        super().__init__(*args, **kwargs)
        self._deadline = deadline
        self._create_connection = self._watched_connection

    def _watched_connection(self, *args, **kwargs) -> socket.socket:
        sock = socket.create_connection(*args, **kwargs)
        self._deadline.watch(sock)  # the TLS handshake is bounded too
        return sock

    def connect(self) -> None:
        super().connect()
        self._deadline.watch(self.sock)  # the TLS socket that replaced the plain one


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: Deadline):
        super().__init__()
        self._deadline = deadline

    def http_open(self, req):
        return self.do_open(functools.partial(_WatchedHTTPConnection, deadline=self._deadline), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: Deadline):
        self._ssl = ssl.create_default_context()
        super().__init__(context=self._ssl)
        self._deadline = deadline

    def https_open(self, req):
        return self.do_open(functools.partial(_WatchedHTTPSConnection, deadline=self._deadline), req,
                            context=self._ssl)


# --------------------------------------------------------------------------- what a reply says
@dataclass(frozen=True)
class _Reply:
    """What a 200/206 reply's headers promise: the body starts at `start`, is `length` bytes long
    (None: until the connection closes), and the whole file is `total` bytes (None: not said)."""

    start: int
    length: int | None
    total: int | None


_DIGITS = re.compile(r"[0-9]{1,19}")
_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)")


def parse_size(name: str, values: list[str]) -> int | None:
    """A size header's value (Content-Length, X-Linked-Size), None if absent, ValueError if it cannot be believed."""
    found = {v.strip() for v in values}
    if not found:
        return None
    if len(found) > 1 or not _DIGITS.fullmatch(next(iter(found))):
        raise ValueError(f"malformed {name} {', '.join(sorted(found))[:60]!r}")
    return int(found.pop())


def parse_content_range(header: str, length: int | None) -> tuple[int, int, int | None]:
    """(first byte, bytes, whole file or None) of a 206 reply's Content-Range, checked against its Content-Length."""
    header = header.strip()
    match = _CONTENT_RANGE.fullmatch(header)
    if match is None:
        raise ValueError(f"malformed Content-Range {header[:60]!r} in a 206 reply")
    first, last = int(match.group(1)), int(match.group(2))
    total = None if match.group(3) == "*" else int(match.group(3))
    if last < first or (total is not None and last >= total):
        raise ValueError(f"impossible Content-Range {header[:60]!r}")
    if length is not None and length != last - first + 1:
        raise ValueError(f"Content-Range {header[:60]!r} disagrees with Content-Length {length}")
    return first, last - first + 1, total


def _parse_reply(response) -> _Reply:
    """The reply's promise, or ValueError naming the header that cannot be believed."""
    length = parse_size("Content-Length", response.headers.get_all("Content-Length") or [])
    if response.status == 200:
        return _Reply(0, length, length)
    return _Reply(*parse_content_range(response.headers.get("Content-Range") or "", length))


# --------------------------------------------------------------------------- the transfer
def fetch(url: str, part: Path, *, cap: int, limits: Limits, label: str, progress: bool = True) -> None:
    """Bring the file at `url` into `part`, resuming what `part` already holds: the whole file
    (as long as the server said, at most `cap` bytes), or a BigTransferError naming `label`."""
    deadline = Deadline(limits.deadline, label)
    transfer = _Transfer(url, part, cap, limits, label, deadline)
    deadline.start()
    try:
        transfer.run(progress)
    except (OSError, http.client.HTTPException, urllib.error.URLError) as err:
        if deadline.expired:
            raise deadline.error() from None
        raise transfer.broken(err) from None
    finally:
        deadline.stop()


@dataclass
class _Transfer:
    url: str
    part: Path
    cap: int
    limits: Limits
    label: str
    deadline: Deadline

    def run(self, progress: bool) -> None:
        offset = self._resumable_size()
        response, reply, offset = self._open_at(offset)
        with response:
            end = offset + reply.length if reply.length is not None else None
            declared = reply.total if reply.total is not None else end
            if declared is not None and declared > self.cap:
                self.refuse(f"declares a {declared}-byte file, more than the {self.cap} bytes it can take")
            self._stream(response, offset, end, reply.total, progress)

    def _resumable_size(self) -> int:
        """How much of an earlier attempt `part` holds (0: none, or nothing worth resuming)."""
        try:
            info = os.lstat(self.part)
        except FileNotFoundError:
            return 0
        if not stat.S_ISREG(info.st_mode):
            raise BigTransferError(f"{self.part}: not a regular file where the partial download goes; remove it")
        if info.st_size > self.cap:
            self.part.unlink()
            return 0
        return info.st_size

    def _open_at(self, offset: int):
        """A reply whose body starts where `part` ends, or at 0 (then `part` is started over)."""
        response = self._request(offset)
        if response.status == 416:  # (only to a ranged request) `part` is whole already, or stale
            response.close()
            offset, response = 0, self._request(0)
        reply = self._promise(response)
        if reply.start == offset:
            return response, reply, offset
        if response.status == 200:  # the server ignores Range: take the whole file from here
            return response, reply, 0
        response.close()
        if offset:  # a range from elsewhere than asked: ask for the whole file instead
            response = self._request(0)
            reply = self._promise(response)
            if reply.start == 0:
                return response, reply, 0
            response.close()
        self.refuse(f"answered with bytes from {reply.start} when asked from 0")

    def _promise(self, response) -> _Reply:
        try:
            return _parse_reply(response)
        except ValueError as err:
            response.close()
            self.refuse(str(err))

    def _request(self, offset: int):
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        request = urllib.request.Request(self.url, headers=headers)
        opener = urllib.request.build_opener(_HTTPHandler(self.deadline), _HTTPSHandler(self.deadline))
        try:
            response = opener.open(request, timeout=self.limits.stall_timeout)
        except urllib.error.HTTPError as err:
            if err.code == 416 and offset:  # the caller starts over
                return err
            err.close()
            raise BigTransferError(f"could not download {self.url}: HTTP {err.code} {_one_line(err.reason)}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            if self.deadline.expired:
                raise self.deadline.error() from None
            reason = getattr(err, "reason", err)
            raise BigTransferError(f"could not reach {self.url} ({_one_line(reason)}); check the network or set "
                                   f"BIGTRANSFER_BASE_URL to a mirror") from None
        if response.status not in (200, 206):
            response.close()
            self.refuse(f"answered HTTP {response.status}, not the file")
        return response

    def _stream(self, response, offset: int, end: int | None, total: int | None, progress: bool) -> None:
        """Append the body to `part` from `offset`, never past `end` (what the reply said, within the cap) or the cap."""
        from tqdm.auto import tqdm

        limit = end if end is not None else self.cap
        size = offset
        fd = os.open(self.part, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        with os.fdopen(fd, "wb") as out, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                              unit_divisor=1024, desc=self.label, disable=not progress) as bar:
            out.truncate(offset)
            out.seek(offset)
            while block := self._read(response):
                if size + len(block) > limit:
                    out.close()
                    self.refuse(f"sent more than the {limit} bytes " + (
                        "it declared" if end is not None else "a file of this model can take"))
                out.write(block)
                size += len(block)
                bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
        self.deadline.check()
        if end is not None and size != end:
            raise BigTransferError(f"{self.label}: download stopped at {size} of {end} bytes; run the same command "
                                   f"again to resume")

    def _read(self, response) -> bytes:
        """The next bytes as they arrive (one read: a slow sender cannot hold us past the deadline)."""
        self.deadline.check()
        try:
            return response.read1(CHUNK)
        except TimeoutError:
            raise stall_error(self.label, self.url, self.limits.stall_timeout) from None

    def refuse(self, what: str):
        """The server's reply cannot be believed: drop what it sent, and say so in one line."""
        with contextlib.suppress(FileNotFoundError):
            self.part.unlink()
        raise BigTransferError(f"{self.label}: {self.url} {what}; nothing was kept")

    def broken(self, err: BaseException) -> BigTransferError:
        return BigTransferError(f"download of {self.label} broke off ({_one_line(err)}); run the same command "
                                f"again to resume")


def _one_line(value) -> str:
    lines = str(value).strip().splitlines()
    return lines[0][:200] if lines else type(value).__name__
