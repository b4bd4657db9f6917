"""A stand-in for the authors' bucket on 127.0.0.1 (no network exists in tests)."""

import http.server
import threading

import pytest


class BucketHandler(http.server.BaseHTTPRequestHandler):
    """Serves `server.files` under /bit_models/, honouring Range, optionally dropping mid-file."""

    def do_GET(self):
        server = self.server
        server.requests.append({"path": self.path, "range": self.headers.get("Range")})
        data = server.files.get(self.path.removeprefix("/bit_models/"))
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


@pytest.fixture
def bucket(monkeypatch):
    """A loopback HTTP server; BIGTRANSFER_BASE_URL points at it. Put bytes in `.files`."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), BucketHandler)
    server.files, server.requests, server.drop_after, server.honour_range = {}, [], None, True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("BIGTRANSFER_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}/bit_models")
    yield server
    server.shutdown()
    server.server_close()
