"""A stand-in for the Hugging Face hub on 127.0.0.1: enough of its HTTP API for huggingface_hub's
own `hf_hub_download` (file resolution) and `upload_folder` (repository creation, pre-upload,
commit), so tests exercise the real client without a network."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import threading
import urllib.parse

import pytest

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    # ------------------------------------------------------------------ downloads
    def _resolve(self, head: bool) -> None:
        server = self.server
        path = urllib.parse.unquote(urllib.parse.urlparse(self.path).path).lstrip("/")
        server.requests.append((self.command, path, self.headers.get("Authorization")))
        repo, sep, rest = path.partition("/resolve/")
        if not sep:
            return self._error(404, "EntryNotFound")
        _revision, _, filename = rest.partition("/")
        if repo not in server.repos:
            return self._error(404, "RepoNotFound")
        data = server.repos[repo].get(filename)
        if data is None:
            return self._error(404, "EntryNotFound")
        if (self.command, repo, filename) in server.lies:
            return server.lies[(self.command, repo, filename)](self)
        digest = hashlib.sha256(data).hexdigest()
        start = 0
        ranged = self.headers.get("Range")
        if ranged and not head:
            start = int(ranged.removeprefix("bytes=").split("-")[0])
        headers = {
            "X-Repo-Commit": server.commit,
            # LFS files: the hub's ETag is the content's SHA-256 (huggingface_hub names the blob after it)
            "ETag": f'"{server.etags.get((repo, filename), digest)}"',
            "Content-Length": str(len(data) - start),
        }
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if head:  # what a test makes the metadata say (X-Linked-Size, X-Linked-Etag, ...)
            headers.update(server.head_headers.get((repo, filename), {}))
        self.send_response(206 if start else 200)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(data[start:])

    def do_HEAD(self):
        self._resolve(head=True)

    def do_GET(self):
        self._resolve(head=False)

    # ------------------------------------------------------------------ uploads
    def do_POST(self):
        server = self.server
        path = urllib.parse.urlparse(self.path).path
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        server.requests.append(("POST", path, self.headers.get("Authorization")))
        if not self.headers.get("Authorization"):
            return self._error(401, "Unauthorized")
        if path == "/api/repos/create":
            request = json.loads(body)
            repo = f"{request.get('organization') or 'user'}/{request['name']}" if "/" not in request["name"] \
                else request["name"]
            server.repos.setdefault(repo, {})
            server.created.append(request)
            return self._json({"url": f"{self._base()}/{repo}", "name": repo})
        if path == "/api/validate-yaml":  # the model card's front matter
            return self._json({"errors": [], "warnings": []})
        if path.startswith("/api/models/") and "/preupload/" in path:
            files = json.loads(body)["files"]
            return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                         for f in files]})
        if path.startswith("/api/models/") and "/commit/" in path:
            repo = path.removeprefix("/api/models/").split("/commit/")[0]
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    server.repos.setdefault(repo, {})[item["value"]["path"]] = base64.b64decode(
                        item["value"]["content"])
                elif item["key"] == "header":
                    server.commits.append(item["value"])
            return self._json({"commitUrl": f"{self._base()}/{repo}/commit/{COMMIT}", "commitOid": COMMIT,
                               "commitMessage": "upload", "success": True, "pullRequestUrl": None})
        return self._error(404, "EntryNotFound")

    # ------------------------------------------------------------------ helpers
    def _base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def _json(self, data) -> None:
        payload = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _error(self, code: int, kind: str) -> None:
        payload = json.dumps({"error": kind}).encode()
        self.send_response(code)
        self.send_header("X-Error-Code", kind)
        if kind == "EntryNotFound":  # the repository exists: the hub names its commit
            self.send_header("X-Repo-Commit", self.server.commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def log_message(self, *args):
        pass


def online(monkeypatch, on: bool) -> None:
    """huggingface_hub reads HF_HUB_OFFLINE once, at import: set its copy too (a fresh process reads the env)."""
    try:
        import huggingface_hub.constants
    except ImportError:
        return
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", not on)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A loopback hub; HF_ENDPOINT points at it, HF_HOME is the test's own. Put files in
    `.repos[repo_id][filename]` (bytes); `.requests` records what the client asked. A lying hub:
    `.commit` (every reply's X-Repo-Commit), `.etags[(repo, filename)]`, `.head_headers[(repo, filename)]`
    (headers the metadata reply adds or replaces), `.lies[("HEAD" or "GET", repo, filename)]` (a reply
    function instead of the file, see lying_http.py)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    server.repos, server.requests, server.etags, server.created, server.commits = {}, [], {}, [], []
    server.commit, server.head_headers, server.lies, server.stopping = COMMIT, {}, {}, False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    online(monkeypatch, True)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_loopback_test_token")
    yield server
    server.stopping = True
    server.shutdown()
    server.server_close()
