"""A stand-in for the authors' bucket on 127.0.0.1 (no network exists in tests)."""

import functools
import http.server
import io
import threading

import numpy as np
import pytest
from bit_files import UNITS, authors_arrays


class BucketHandler(http.server.BaseHTTPRequestHandler):
    """Serves `server.files` under /bit_models/, honouring Range, optionally dropping mid-file;
    a name in `server.lies` is answered by that function instead (see lying_http.py)."""

    def do_GET(self):
        server = self.server
        server.requests.append({"path": self.path, "range": self.headers.get("Range")})
        name = self.path.removeprefix("/bit_models/")
        if name in server.lies:
            server.lies[name](self)
            return
        data = server.files.get(name)
        if data is None:
            self.send_error(404)
            return
        start = 0
        range_header = self.headers.get("Range")
        if range_header and server.honour_range:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.drop_after is not None:  # simulate a connection that dies part-way
            self.wfile.write(body[: server.drop_after])
            server.drop_after = None
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@functools.cache
def released_npz(depth: int, width: float, num_classes: int) -> bytes:
    """A file that parses as a released model (the authors' layout, every weight zero, deflated to a
    few hundred kB): what a truthful bucket serves, without shipping 100 MB per test."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **authors_arrays(UNITS[depth], width, num_classes, zeros=True))
    return buffer.getvalue()


@pytest.fixture
def bucket(monkeypatch):
    """A loopback HTTP server; BIGTRANSFER_BASE_URL points at it. Put bytes in `.files`, or a reply
    function in `.lies[relpath]`."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), BucketHandler)
    server.files, server.requests, server.drop_after, server.honour_range = {}, [], None, True
    server.lies, server.stopping = {}, False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}/bit_models"
    monkeypatch.setenv("BIGTRANSFER_BASE_URL", server.url)
    yield server
    server.stopping = True
    server.shutdown()
    server.server_close()
