"""Replies a hostile or broken server sends, for the loopback bucket and hub to serve in place of a file.

Each is a function of the request handler. Those that never end (an endless body, a drip, silence)
stop when the client hangs up or the test's server is shut down (`server.stopping`)."""

from __future__ import annotations

import time

BLOCK = b"\0" * 65536


def _stopping(handler) -> bool:
    return getattr(handler.server, "stopping", False)


def _pause(handler, seconds: float) -> bool:
    """Sleep up to `seconds`; False once the server is shutting down."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if _stopping(handler):
            return False
        time.sleep(min(0.05, left))
    return not _stopping(handler)


def _head(handler, status: int, headers: dict[str, str] | list[tuple[str, str]]) -> None:
    handler.close_connection = True
    handler.send_response(status)
    for key, value in headers.items() if isinstance(headers, dict) else headers:
        handler.send_header(key, value)
    handler.send_header("Connection", "close")
    handler.end_headers()
    handler.wfile.flush()


def endless(handler) -> None:
    """200 with no length: zeros until the client hangs up."""
    _head(handler, 200, {})
    try:
        while not _stopping(handler):
            handler.wfile.write(BLOCK)
    except OSError:
        pass


def drip(interval: float, declared: int = 10**6):
    """200 declaring `declared` bytes, then one byte every `interval` seconds."""
    def reply(handler) -> None:
        _head(handler, 200, {"Content-Length": str(declared)})
        try:
            while _pause(handler, interval):
                handler.wfile.write(b"\0")
                handler.wfile.flush()
        except OSError:
            pass
    return reply


def silent(declared: int = 10**6):
    """200 declaring `declared` bytes, then nothing at all."""
    def reply(handler) -> None:
        _head(handler, 200, {"Content-Length": str(declared)})
        _pause(handler, 3600)
    return reply


def header_drip(interval: float):
    """A status line, then a header one byte every `interval` seconds, never finished."""
    def reply(handler) -> None:
        handler.close_connection = True
        try:
            handler.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            handler.wfile.flush()
            while _pause(handler, interval):
                handler.wfile.write(b"a")
                handler.wfile.flush()
        except OSError:
            pass
    return reply


def reply_with(status: int, headers: dict[str, str] | list[tuple[str, str]], body: bytes = b""):
    """Exactly this status, these headers (malformed ones too) and this body."""
    def reply(handler) -> None:
        _head(handler, status, headers)
        try:
            handler.wfile.write(body)
        except OSError:
            pass
    return reply


def redirect(location: str):
    """302 to `location` (itself: a loop)."""
    return reply_with(302, {"Location": location, "Content-Length": "0"})


def range_from(data: bytes, start: int):
    """A ranged request is answered with the bytes from `start`, whatever was asked; others get the file."""
    def reply(handler) -> None:
        if handler.headers.get("Range"):
            body = data[start:]
            headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}", "Content-Length": str(len(body))}
            return reply_with(206, headers, body)(handler)
        return reply_with(200, {"Content-Length": str(len(data))}, data)(handler)
    return reply


def always_range_from(data: bytes, start: int):
    """Every request, ranged or not, is answered 206 with the bytes from `start`."""
    def reply(handler) -> None:
        body = data[start:]
        reply_with(206, {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}",
                         "Content-Length": str(len(body))}, body)(handler)
    return reply
