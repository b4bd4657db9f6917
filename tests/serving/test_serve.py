"""`bigtransfer serve` from outside, as a careless or hostile client would use it: real HTTP on loopback."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from serve_server import CLASSES, png_bytes, running_server, save_tiny_model

from bigtransfer.cli import main
from bigtransfer.errors import BigTransferError
from bigtransfer.inference.images import embed, predict
from bigtransfer.inference.predictor import Predictor
from bigtransfer.serving.app import build_predictor
from bigtransfer.serving.options import ServeOptions, read_api_key

MAX_UPLOAD_MB = 0.05  # 52 KB: the tests' images are a few KB, the refused bodies a few dozen
SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"), provenance={"fingerprint": "f00dcafe"})


@pytest.fixture(scope="module")
def server(model_path):
    options = ServeOptions(str(model_path), max_batch=8, batch_timeout_ms=20, max_upload_mb=MAX_UPLOAD_MB,
                           max_images=4)
    with running_server(options) as (url, _):
        yield url


def _files(*images):
    return [("image", (f"img{i}.png", data, "image/png")) for i, data in enumerate(images)]


def _error_line(answer: httpx.Response) -> str:
    """The answer is JSON holding one key, `error`, whose value is one line (never a traceback)."""
    assert answer.headers["content-type"].startswith("application/json"), answer.text
    body = answer.json()
    assert list(body) == ["error"] and "\n" not in body["error"] and "Traceback" not in body["error"], body
    return body["error"]


# --------------------------------------------------------------------------- answers
def test_predict_names_the_top_k_classes_the_model_and_its_fingerprint(server):
    answer = httpx.post(f"{server}/predict?top_k=3", files=_files(png_bytes(1), png_bytes(2)))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["model"], body["fingerprint"], body["multi_label"]) == ("model.safetensors", "f00dcafe", False)
    assert [r["image"] for r in body["results"]] == ["img0.png", "img1.png"]
    for result in body["results"]:
        ranked = result["predictions"]
        assert len(ranked) == 3 and {r["label"] for r in ranked} <= set(CLASSES)
        probabilities = [r["probability"] for r in ranked]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1.0001
    default = httpx.post(f"{server}/predict", files=_files(png_bytes(1))).json()
    assert len(default["results"][0]["predictions"]) == 5


def test_serve_and_predict_give_the_same_answer_for_the_same_image(server, model_path, tmp_path):
    images = [png_bytes(seed, size=(37 + 9 * seed, 41)) for seed in range(3)]
    paths = []
    for i, data in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(data)
    offline, unreadable = predict(str(model_path), [str(p) for p in paths], top_k=6, device="cpu", progress=False)
    assert not unreadable
    encoded = [base64.b64encode(data).decode() for data in images]
    served = httpx.post(f"{server}/predict?top_k=6", json={"images": encoded}).json()["results"]
    for here, there in zip(offline, served):
        assert [p["label"] for p in here["predictions"]] == [p["label"] for p in there["predictions"]]
        np.testing.assert_allclose([p["probability"] for p in here["predictions"]],
                                   [p["probability"] for p in there["predictions"]], atol=2e-6)


def test_embed_answers_the_pre_logits_that_bigtransfer_embed_writes(server, model_path, tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes(3))
    written = embed(str(model_path), [str(image)], tmp_path / "features", device="cpu", progress=False)
    answer = httpx.post(f"{server}/embed", files=_files(image.read_bytes())).json()
    assert answer["dimension"] == written["shape"][1] == len(answer["results"][0]["embedding"])
    np.testing.assert_allclose(answer["results"][0]["embedding"], np.load(written["features"])[0], rtol=1e-5,
                               atol=1e-6)


def test_a_model_without_a_head_embeds_and_says_why_it_cannot_predict(tmp_path):
    from bit_files import authors_arrays

    np.savez(tmp_path / "headless.npz", **authors_arrays((1, 1, 1, 1), 0.5))
    with running_server(ServeOptions(str(tmp_path / "headless.npz"), resolution=32)) as (url, _):
        assert httpx.get(f"{url}/health").json()["classes"] is None
        refused = httpx.post(f"{url}/predict", files=_files(png_bytes()))
        assert refused.status_code == 400 and "no classification head; POST /embed" in _error_line(refused)
        assert httpx.post(f"{url}/embed", files=_files(png_bytes())).json()["dimension"] == 1024


# --------------------------------------------------------------------------- bad input
def _truncated_png() -> bytes:
    return png_bytes(4, size=(60, 60))[:300]


def _pixel_bomb() -> bytes:
    """A PNG whose header declares 30000 x 30000 pixels: refused before a pixel is decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def _chunks(total: int, size: int = 8192):
    for start in range(0, total, size):
        yield b"\0" * min(size, total - start)


BAD_REQUESTS = {
    "not an image": ({"files": _files(b"%PDF-1.4 definitely not pixels")}, 400, "not a readable image"),
    "a truncated image": ({"files": _files(_truncated_png())}, 400, "not a readable image"),
    "an empty file": ({"files": _files(b"")}, 400, "empty"),
    "an image over the pixel limit": ({"files": _files(_pixel_bomb())}, 413, "pixels"),
    "an empty body": ({"headers": {"content-type": "application/json"}, "content": b""}, 400, "empty"),
    "no content type": ({"content": b"abc"}, 415, "Content-Type"),
    "a wrong content type": ({"content": png_bytes(), "headers": {"content-type": "image/png"}}, 415,
                             "Content-Type 'image/png'"),
    "bad base64": ({"json": {"images": ["not base64 at all!"]}}, 400, "not valid base64"),
    "JSON that is not an object of images": ({"json": ["a", "b"]}, 400, "expected a JSON object"),
    "JSON images that are not strings": ({"json": {"images": [1, 2]}}, 400, "expected a JSON object"),
    "broken JSON": ({"content": b'{"images": [', "headers": {"content-type": "application/json"}}, 400,
                    "not valid JSON"),
    "no image field": ({"files": [("picture", ("a.png", png_bytes(), "image/png"))]}, 400, "no image"),
    "text where a file belongs": ({"data": {"image": "cat.png"}, "files": [("other", ("x", b"1", "text/plain"))]},
                                  400, "is text, not a file"),
    "too many images": ({"json": {"images": [base64.b64encode(png_bytes()).decode()] * 5}}, 400, "at most 4"),
    "a body over the upload limit (Content-Length)": ({"files": _files(os.urandom(80_000))}, 413,
                                                      "larger than the limit"),
    "a body over the upload limit (chunked)": ({"content": _chunks(200_000),
                                                    "headers": {"content-type": "application/json"}}, 413,
                                               "larger than the limit"),
    "a malformed multipart body": ({"content": b"--xyz\r\nnonsense", "headers": {
        "content-type": "multipart/form-data; boundary=xyz"}}, 400, "multipart"),
}


@pytest.mark.parametrize("what", list(BAD_REQUESTS))
def test_every_bad_input_is_a_4xx_with_one_json_line_and_the_server_keeps_serving(server, what):
    request, status, says = BAD_REQUESTS[what]
    answer = httpx.post(f"{server}/predict", **request)
    assert answer.status_code == status, (what, answer.status_code, answer.text)
    assert says in _error_line(answer), what
    assert httpx.post(f"{server}/predict", files=_files(png_bytes())).status_code == 200


@pytest.mark.parametrize("top_k", ["0", "-1", "abc", "7", "2.5", "99999999999999999999", "²"])
def test_a_bad_top_k_is_a_400_naming_the_range(server, top_k):
    answer = httpx.post(f"{server}/predict", params={"top_k": top_k}, files=_files(png_bytes()))
    assert answer.status_code == 400 and "from 1 to 6" in _error_line(answer)


@pytest.mark.parametrize(("method", "path", "status"), [("GET", "/nothing-here", 404), ("POST", "/", 405),
                                                        ("DELETE", "/predict", 405), ("GET", "/docs", 404),
                                                        ("GET", "/static/../options.py", 404)])
def test_unknown_routes_and_methods_are_json_errors(server, method, path, status):
    answer = httpx.request(method, f"{server}{path}")
    assert answer.status_code == status
    _error_line(answer)


# --------------------------------------------------------------------------- operations
def test_metrics_parse_with_prometheus_own_parser_and_count_what_happened(server):
    httpx.post(f"{server}/predict", files=_files(png_bytes()))
    httpx.post(f"{server}/predict", files=_files(b"junk"))
    text = httpx.get(f"{server}/metrics").text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    requests = {(s.labels["route"], s.labels["status"]): s.value for s in families["bigtransfer_requests"].samples
                if s.name == "bigtransfer_requests_total"}
    assert requests[("/predict", "200")] >= 1 and requests[("/predict", "400")] >= 1
    errors = {s.labels["kind"]: s.value for s in families["bigtransfer_errors"].samples
              if s.name == "bigtransfer_errors_total"}
    assert errors["not_an_image"] >= 1
    assert families["bigtransfer_request_seconds"].type == "histogram"
    batches = {s.name: s.value for s in families["bigtransfer_batch_size"].samples if not s.labels}
    assert families["bigtransfer_batch_size"].type == "histogram" and batches["bigtransfer_batch_size_count"] >= 1
    assert [s.value for s in families["bigtransfer_ready"].samples] == [1.0]


def test_openapi_describes_both_endpoints_and_the_page_is_served(server):
    spec = httpx.get(f"{server}/openapi.json").json()
    for path in ("/predict", "/embed"):
        assert set(spec["paths"][path]["post"]["requestBody"]["content"]) == {"multipart/form-data",
                                                                               "application/json"}
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and "<input id=\"file\" type=\"file\"" in page.text
    assert "http" not in re.sub(r'(src|href)="/static/[a-z.]+"', "", page.text).replace("http-equiv", "")


def _trickle(body: bytes, pieces: int = 4, pause_s: float = 0.4):
    """A request body sent slowly, so that the request stays in flight for a while."""
    step = len(body) // pieces + 1
    for start in range(0, len(body), step):
        time.sleep(pause_s)
        yield body[start:start + step]


def _slow_json(seed: int) -> dict:
    body = json.dumps({"images": [base64.b64encode(png_bytes(seed)).decode()]}).encode()
    return {"content": _trickle(body), "headers": {"content-type": "application/json"}, "timeout": 30}


def test_a_full_queue_answers_503_with_retry_after_and_the_admitted_requests_finish(model_path):
    options = ServeOptions(str(model_path), max_queue=2)
    with running_server(options) as (url, _), ThreadPoolExecutor(2) as pool:
        slow = [pool.submit(httpx.post, f"{url}/predict", **_slow_json(i)) for i in (1, 2)]  # still uploading
        _wait_for_metric(url, "bigtransfer_requests_in_progress", 2)
        refused = httpx.post(f"{url}/predict", files=_files(png_bytes(3)))
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "busy" in _error_line(refused)
        assert [f.result().status_code for f in slow] == [200, 200]
        assert httpx.post(f"{url}/predict", files=_files(png_bytes(3))).status_code == 200


def test_a_body_that_arrives_too_slowly_is_refused_408_and_frees_its_place(model_path):
    with running_server(ServeOptions(str(model_path), read_timeout_s=0.5, max_queue=1)) as (url, _):
        answer = httpx.post(f"{url}/predict", **_slow_json(0))  # 1.6 s to send
        assert answer.status_code == 408 and "--read-timeout" in _error_line(answer)
        assert httpx.post(f"{url}/predict", files=_files(png_bytes())).status_code == 200


class _Slow(Predictor):
    """The tiny model made to take a while per batch, as a big one would."""

    def probabilities(self, images):
        time.sleep(0.5)
        return super().probabilities(images)


def test_requests_arriving_while_the_model_is_busy_run_as_one_batch(model_path):
    options = ServeOptions(str(model_path), max_batch=4, batch_timeout_ms=0)
    with running_server(options, load=lambda o: _Slow(**vars(build_predictor(o)))) as (url, _), \
            ThreadPoolExecutor(4) as pool:
        first = pool.submit(httpx.post, f"{url}/predict", files=_files(png_bytes(0)), timeout=30)
        _wait_for_metric(url, "bigtransfer_requests_in_progress", 1)
        time.sleep(0.1)  # the first batch is running
        later = [pool.submit(httpx.post, f"{url}/predict", files=_files(png_bytes(i)), timeout=30) for i in (1, 2, 3)]
        assert [f.result().status_code for f in [first, *later]] == [200] * 4
        text = httpx.get(f"{url}/metrics").text
        assert "bigtransfer_batch_size_count 2.0" in text and "bigtransfer_batch_size_sum 4.0" in text


def test_two_workers_compute_batches_side_by_side_and_answer_alike(model_path, server):
    threads = torch.get_num_threads()  # the server shares the cores between its workers, process-wide
    try:
        with running_server(ServeOptions(str(model_path), workers=2, max_batch=2)) as (url, _), \
                ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda i: httpx.post(f"{url}/predict", files=_files(png_bytes(i % 3)),
                                                         timeout=30), range(6)))
    finally:
        torch.set_num_threads(threads)
    alone = [httpx.post(f"{server}/predict", files=_files(png_bytes(i))).json()["results"] for i in range(3)]
    for i, answer in enumerate(answers):
        assert answer.status_code == 200
        got, want = answer.json()["results"][0]["predictions"], alone[i % 3][0]["predictions"]
        assert [p["label"] for p in got] == [p["label"] for p in want]
        np.testing.assert_allclose([p["probability"] for p in got], [p["probability"] for p in want], atol=2e-6)


def test_the_batcher_keeps_kinds_apart_fills_up_to_max_batch_and_runs_an_oversized_request_alone():
    import asyncio

    from bigtransfer.serving.batcher import Batcher

    batches = []

    def compute(kind, images):
        batches.append((kind, len(images)))
        return images.flatten(1)[:, :1] + (100 if kind == "embed" else 0)

    batcher = Batcher(compute, max_batch=4, timeout_s=0.2, en_route=lambda: 1)
    jobs = [("predict", 1), ("embed", 2), ("predict", 2), ("predict", 6), ("embed", 1), ("predict", 1)]
    inputs = [torch.full((n, 3, 2, 2), float(i)) for i, (_, n) in enumerate(jobs)]

    async def submit_all():
        waiting = [asyncio.ensure_future(batcher.submit(kind, x)) for (kind, _), x in zip(jobs, inputs)]
        await asyncio.sleep(0)  # every job is queued before the worker starts
        batcher.start()
        return await asyncio.gather(*waiting)

    try:
        rows = asyncio.run(submit_all())
    finally:
        batcher.stop()
    assert batches == [("predict", 4), ("embed", 3), ("predict", 6)]
    for i, ((kind, n), got) in enumerate(zip(jobs, rows)):
        assert got.tolist() == [[i + (100 if kind == "embed" else 0)]] * n


def test_a_lone_request_does_not_wait_out_the_batch_timeout(model_path):
    with running_server(ServeOptions(str(model_path), max_batch=16, batch_timeout_ms=20_000)) as (url, _):
        started = time.monotonic()
        assert httpx.post(f"{url}/predict", files=_files(png_bytes()), timeout=30).status_code == 200
        assert time.monotonic() - started < 10


def _wait_for_metric(url: str, name: str, value: float, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
            if family.name == name and family.samples[0].value == value:
                return
        time.sleep(0.02)
    raise AssertionError(f"{name} never reached {value}")


class _Recording(Predictor):
    """A predictor that notes the batch sizes it runs (to see the warm-up happen before readiness)."""

    def probabilities(self, images):
        self.calls.append(("predict", len(images)))
        return super().probabilities(images)

    def features(self, images):
        self.calls.append(("embed", len(images)))
        return super().features(images)


def test_health_says_ready_only_once_the_model_is_loaded_and_warmed_up(model_path, tmp_path):
    release, calls = threading.Event(), []
    run = tmp_path / "flowers"  # a run directory, named by its folder
    run.mkdir()
    (run / "final.safetensors").write_bytes(model_path.read_bytes())

    def slow_load(options):
        release.wait(30)
        predictor = _Recording(**vars(build_predictor(options)))
        predictor.calls = calls
        return predictor

    options = ServeOptions(str(run), max_batch=3)
    with running_server(options, load=slow_load, wait_ready=False) as (url, _):
        loading = httpx.get(f"{url}/health")
        assert loading.status_code == 503 and loading.json() == {"status": "loading"}
        early = httpx.post(f"{url}/predict", files=_files(png_bytes()))
        assert early.status_code == 503 and early.headers["retry-after"] == "1" and "loading" in _error_line(early)
        assert calls == []
        release.set()
        deadline = time.monotonic() + 30
        while (health := httpx.get(f"{url}/health")).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (health.json()["status"], health.json()["model"]) == ("ready", "flowers")
        assert sorted(calls) == [("embed", 1), ("embed", 3), ("predict", 1), ("predict", 3)]
        assert httpx.post(f"{url}/predict", files=_files(png_bytes())).status_code == 200


def test_an_api_key_guards_predict_embed_and_metrics_compared_in_constant_time(model_path, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-key\n")
    options = ServeOptions(str(model_path), api_key_file=key_file)
    with running_server(options) as (url, _):
        for path in ("/predict", "/embed"):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "s3cret-ke"},
                            {"Authorization": "Basic s3cret-key"}):
                answer = httpx.post(f"{url}{path}", files=_files(png_bytes()), headers=headers)
                assert answer.status_code == 401 and "API key" in _error_line(answer)
                assert answer.headers["www-authenticate"] == "Bearer"
            for headers in ({"Authorization": "Bearer s3cret-key"}, {"X-API-Key": "s3cret-key"}):
                assert httpx.post(f"{url}{path}", files=_files(png_bytes()), headers=headers).status_code == 200
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/metrics", headers={"X-API-Key": "s3cret-key"}).status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200  # load balancers probe without a key


def test_the_key_file_is_read_safely(tmp_path):
    good = tmp_path / "key"
    good.write_text("abc\n")
    assert read_api_key(good) == b"abc"
    link = tmp_path / "link"
    link.symlink_to(good)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "two").write_text("a\nb\n")
    (tmp_path / "big").write_text("x" * 5000)
    (tmp_path / "space").write_text("a b")
    for name, says in (("link", "symbolic link"), ("fifo", "not a regular file"), ("empty", "empty"),
                       ("two", "single line"), ("big", "too long"), ("space", "printable ASCII"),
                       ("missing", "cannot open")):
        with pytest.raises(BigTransferError, match=says):
            read_api_key(tmp_path / name)


def test_serve_refuses_bad_flags_with_exit_2_before_loading_anything(model_path, tmp_path, capsys):
    cases = [([str(tmp_path / "nothing.safetensors")], "nothing.safetensors"),
             ([str(model_path), "--port", "70000"], "--port"),
             ([str(model_path), "--api-key-file", str(tmp_path / "nokey")], "--api-key-file"),
             ([str(model_path), "--max-upload-mb", "0"], "--max-upload-mb"),
             ([str(model_path), "--host", "no-such-host.invalid"], "--host")]
    for args, names in cases:
        assert main(["serve", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("bigtransfer: error:") and names in err[0], err
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        assert main(["serve", str(model_path), "--port", str(taken.getsockname()[1])]) == 2
        assert "cannot listen there" in capsys.readouterr().err
    finally:
        taken.close()


def test_without_the_serving_packages_the_error_says_what_to_install(model_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m.startswith("bigtransfer.serving.") and m != "bigtransfer.serving.options"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "fastapi", None)  # an environment that lost a dependency
    assert main(["serve", str(model_path)]) == 2
    assert "needs fastapi" in capsys.readouterr().err


# --------------------------------------------------------------------------- the real command
def test_sigterm_answers_the_request_in_flight_and_exits_0(model_path):
    """`bigtransfer serve` as a process: port 0 is printed, --max-pixels holds, SIGTERM drains, exit code 0."""
    process = subprocess.Popen([sys.executable, "-m", "bigtransfer", "serve", str(model_path), "--port", "0",
                                "--max-pixels", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONPATH": SRC})
    try:
        url = _read_until(process, r"listening on (http://127\.0\.0\.1:\d+)")
        _read_until(process, r"ready: model\.safetensors")
        too_big = httpx.post(f"{url}/predict", files=_files(png_bytes(size=(400, 300))))
        assert too_big.status_code == 413 and "--max-pixels" in _error_line(too_big)
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(httpx.post, f"{url}/predict", **_slow_json(0))
            _wait_for_metric(url, "bigtransfer_requests_in_progress", 1)  # its body is still arriving
            process.send_signal(signal.SIGTERM)
            answer = in_flight.result()
        assert answer.status_code == 200 and answer.json()["results"][0]["predictions"]
        assert process.wait(timeout=30) == 0
        assert "stopped on SIGTERM" in process.stdout.read()
        assert "Traceback" not in process.stderr.read()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _read_until(process: subprocess.Popen, pattern: str, timeout: float = 90.0) -> str:
    """The first group of `pattern` in the server's stdout (read line by line)."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise AssertionError(f"the server ended: {''.join(seen)}{process.stderr.read()}")
        seen.append(line)
        if match := re.search(pattern, line):
            return match.group(1) if match.groups() else match.group(0)
    raise AssertionError(f"no {pattern!r} in {''.join(seen)}")


def test_json_numbers_in_the_answer_are_plain_json(server):
    # float32 values that JSON cannot hold (NaN, inf) must never appear; the body parses strictly.
    answer = httpx.post(f"{server}/embed", files=_files(png_bytes(5)))
    json.loads(answer.text, parse_constant=lambda name: pytest.fail(f"{name} in the answer"))
    assert torch.tensor(answer.json()["results"][0]["embedding"]).isfinite().all()


@pytest.mark.slow
def test_the_replicas_example_balances_two_servers_and_survives_losing_one(tmp_path):
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_replicas.py"
    done = subprocess.run([sys.executable, str(script), "--requests", "6"], check=False, capture_output=True,
                          text=True, timeout=600, cwd=tmp_path, env={**os.environ, "PYTHONPATH": SRC})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "6 requests through the proxy: all 200" in done.stdout and "exit code 0" in done.stdout
    assert re.search(r"6 more requests: all 200, all from http://127\.0\.0\.1:\d+", done.stdout)
