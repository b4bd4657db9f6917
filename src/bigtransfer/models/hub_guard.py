"""huggingface_hub's HTTP traffic for one download, held to the limits our own transfers keep.

huggingface_hub names cache files after what the server says (the ETag names the blob, the
commit hash a snapshot folder) and streams the body without a cap. While one of our downloads
runs, hooks on its HTTP client check every reply before huggingface_hub uses it: the commit hash
must be 40 hex digits and the ETag a git or SHA-256 hash (so no name can leave the cache), the
declared size must fit the model, the body is cut off past that size, and reads get our stall
timeout. The call runs in a worker thread so the deadline holds even while a read is blocked.
The hooks act only on the worker's requests; other threads' traffic is left alone.
"""

from __future__ import annotations

import functools
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import BigTransferError
from .transfer import Limits, deadline_error, parse_content_range, parse_size, stall_error

_COMMIT = re.compile(r"[0-9a-f]{40}")
_ETAG = re.compile(r'(?:W/)?"?([0-9a-f]{40}|[0-9a-f]{64})"?')  # a git blob hash, or an LFS file's SHA-256
_XET_HASH = "X-Xet-Hash"  # without it, huggingface_hub fetches over plain HTTP, where these hooks apply
_POLL = 0.1  # seconds between the waiting thread's looks at the worker
_AGAIN = "run the same command again (huggingface_hub resumes where its version can)"


class HubGuard:
    """Run one huggingface_hub download under a size cap, a stall timeout and a deadline."""

    def __init__(self, label: str, cap: int, limits: Limits):
        self.label, self.cap, self.limits = label, cap, limits
        self.etag: str | None = None  # the validated ETag: the blob's name in huggingface_hub's cache
        self.declared_size: int | None = None
        self.refused = False  # the server's reply could not be believed (not a transient failure)
        self._worker: int | None = None
        self._active = False
        self._cancelled = False
        self._clients: list[Any] = []

    def run(self, call: Callable[[], Any]) -> Any:
        """`call()` in a worker thread, its HTTP traffic checked; its result, or its error, or the deadline's."""
        outcome: dict[str, Any] = {}

        def work() -> None:
            self._worker, self._active = threading.get_ident(), True
            try:
                outcome["value"] = call()
            except BaseException as err:  # noqa: BLE001  (every outcome goes to the waiting thread, which raises it)
                outcome["error"] = err
            finally:
                self._active = False
                self._detach()

        end = time.monotonic() + self.limits.deadline
        worker = threading.Thread(target=work, name=f"download {self.label}", daemon=True)
        self._attach()
        worker.start()
        try:
            while worker.is_alive():
                worker.join(_POLL)
                self._attach()  # huggingface_hub replaces its client after a connection error
                if worker.is_alive() and time.monotonic() > end:
                    raise deadline_error(self.label, self.limits.deadline, _AGAIN)
        finally:
            self._cancelled = worker.is_alive()  # a worker left behind stops at its next request or read
            if not worker.is_alive():
                self._detach()
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("value")

    # ------------------------------------------------------------------ hooks on the client
    def _attach(self) -> None:
        from huggingface_hub.utils import get_session

        client = get_session()
        hooks = getattr(client, "event_hooks", None)
        if hooks is None:
            raise BigTransferError("--source hub needs huggingface_hub 1.0 or later: pip install -U huggingface_hub")
        if self._on_request not in hooks["request"]:  # new lists, so a request being sent keeps its own
            client.event_hooks = {"request": [*hooks["request"], self._on_request],
                                  "response": [*hooks["response"], self._on_response]}
            self._clients.append(client)

    def _detach(self) -> None:
        for client in self._clients:
            hooks = client.event_hooks
            client.event_hooks = {"request": [h for h in hooks["request"] if h != self._on_request],
                                  "response": [h for h in hooks["response"] if h != self._on_response]}
        self._clients = []

    def _mine(self) -> bool:
        return self._active and threading.get_ident() == self._worker

    def _on_request(self, request) -> None:
        if not self._mine():
            return
        if self._cancelled:
            raise BigTransferError(f"{self.label}: download abandoned after its deadline")
        stall = self.limits.stall_timeout
        request.extensions["timeout"] = {"connect": stall, "read": stall, "write": stall, "pool": stall}

    def _on_response(self, response) -> None:
        if not self._mine():
            return
        self._check_commit(response)
        method, status = response.request.method, response.status_code
        if method == "HEAD" and status < 400:
            self._check_metadata(response)
        elif method == "GET" and status in (200, 206):
            limit = self._check_body_headers(response)
            response.stream = _bounded_stream_type(type(response))(response.stream, self, limit)

    # ------------------------------------------------------------------ what a reply may say
    def _check_commit(self, response) -> None:
        """huggingface_hub names folders after the commit hash of any reply, a 404's included."""
        commit = response.headers.get("X-Repo-Commit")
        if commit is not None and not _COMMIT.fullmatch(commit):
            self.refuse(f"the hub's commit hash {commit[:80]!r} is not 40 hex digits")

    def _check_metadata(self, response) -> None:
        """The ETag (the blob's file name) and the declared size, before huggingface_hub uses them."""
        headers = response.headers
        etag = headers.get("X-Linked-Etag") or headers.get("ETag")
        if etag is not None:
            match = _ETAG.fullmatch(etag.strip())
            if match is None:
                self.refuse(f"the hub's ETag {etag[:80]!r} is not a git or SHA-256 hash")
            self.etag = match.group(1)
        linked = headers.get_list("X-Linked-Size")
        is_redirect = 300 <= response.status_code < 400
        size = self._size("X-Linked-Size", linked) if linked else (
            None if is_redirect else self._size("Content-Length", headers.get_list("Content-Length")))
        if size is not None:
            if size > self.cap:
                self.refuse(f"the hub declares a {size}-byte file, more than the {self.cap} bytes it can take")
            self.declared_size = size
        if _XET_HASH in headers:
            del headers[_XET_HASH]

    def _check_body_headers(self, response) -> int:
        """The most bytes this body may hold; its Content-Length and Content-Range must parse."""
        limit = self.declared_size if self.declared_size is not None else self.cap
        length = self._size("Content-Length", response.headers.get_list("Content-Length"))
        if response.status_code == 206:
            try:
                length = parse_content_range(response.headers.get("Content-Range") or "", length)[1]
            except ValueError as err:
                self.refuse(str(err))
        if length is not None and length > limit:
            self.refuse(f"sent a {length}-byte body, more than the {limit} bytes of the file")
        return limit

    def _size(self, name: str, values: list[str]) -> int | None:
        try:
            return parse_size(name, values)
        except ValueError as err:
            self.refuse(str(err))

    def refuse(self, what: str):
        """The hub's reply cannot be believed: stop, and say so in one line."""
        self.refused = True
        raise BigTransferError(f"{self.label}: {what}; nothing was kept")

    def stalled(self, where: str) -> BigTransferError:
        return stall_error(self.label, where, self.limits.stall_timeout, _AGAIN)

    def check_running(self) -> None:
        if self._cancelled:
            raise BigTransferError(f"{self.label}: download abandoned after its deadline")


@functools.cache
def _bounded_stream_type(response_type: type) -> type:
    """A body stream for the HTTP library `response_type` comes from (httpx, or httpx2), cut off past a limit."""
    library = sys.modules[response_type.__module__.split(".")[0]]

    class BoundedStream(library.SyncByteStream):
        def __init__(self, inner, guard: HubGuard, limit: int):
            self.inner, self.guard, self.limit = inner, guard, limit

        def __iter__(self):
            received = 0
            try:
                for piece in self.inner:
                    received += len(piece)
                    if received > self.limit:
                        self.guard.refuse(f"sent more than the {self.limit} bytes of the file")
                    self.guard.check_running()
                    yield piece
            except library.TimeoutException:
                raise self.guard.stalled("the hub") from None

        def close(self) -> None:
            self.inner.close()

    return BoundedStream
