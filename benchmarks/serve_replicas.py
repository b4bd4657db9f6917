"""Beyond one machine: `bigtransfer serve` holds no state, so replicas behind any load balancer answer alike.

This example starts two replicas (`bigtransfer serve MODEL --port 0`, two processes) and a tiny
round-robin proxy in front of them, all on 127.0.0.1; sends requests through the proxy; shows from
each replica's /metrics that both served, and that the answers do not depend on which one did;
then stops one replica with SIGTERM and shows the proxy keeps answering from the other. A real
deployment puts nginx, HAProxy or a Kubernetes Service where the proxy is, probing GET /health.

    python benchmarks/serve_replicas.py                     # a random-weight tiny model
    python benchmarks/serve_replicas.py runs/flowers --requests 40

Needs the serve extras (`pip install -e '.[serve]'`) and httpx.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve_load import photo_jpeg, save_model, start_server, stop_server

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host",
              "content-length", "proxy-authorization", "proxy-authenticate"}


def round_robin_proxy(replicas: list[str]):
    """An ASGI app sending each request to the next replica, and to the one after if that one is down."""
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    turn = itertools.cycle(range(len(replicas)))
    client = httpx.AsyncClient(timeout=60)

    async def forward(request: Request) -> Response:
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        first = next(turn)
        for i in range(len(replicas)):
            replica = replicas[(first + i) % len(replicas)]
            try:
                answer = await client.request(request.method, replica + request.url.path,
                                              params=request.query_params, content=body, headers=headers)
            except httpx.TransportError:
                continue  # that replica is gone: try the next one
            passed = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP | {"content-encoding"}}
            return Response(answer.content, status_code=answer.status_code, headers={**passed, "x-replica": replica})
        return JSONResponse({"error": "no replica is answering"}, status_code=502)

    return Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST"])])


def start_proxy(app) -> tuple[str, object, threading.Thread]:
    import uvicorn

    from bigtransfer.serving.server import bind, url_of

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return url_of(sock), server, thread


async def send(url: str, image: bytes, count: int) -> list[dict]:
    import httpx

    async with httpx.AsyncClient(timeout=60) as client:
        answers = await asyncio.gather(*(client.post(f"{url}/predict", files={"image": ("photo.jpg", image)})
                                         for _ in range(count)))
    return [{"status": a.status_code, "replica": a.headers.get("x-replica"),
             "top": a.json()["results"][0]["predictions"][0] if a.status_code == 200 else a.json()} for a in answers]


def predict_count(url: str) -> int:
    import httpx

    text = httpx.get(f"{url}/metrics").text
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith('bigtransfer_requests_total{route="/predict",status="200"}'))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="run directory or weights (default: a random tiny "
                                                               "model)")
    parser.add_argument("--requests", type=int, default=20)
    args = parser.parse_args()
    image = photo_jpeg()
    with tempfile.TemporaryDirectory() as folder:
        model = args.model or save_model(Path(folder), "R[1,1,1,1]x0.5", 64)
        replicas = [start_server(Path(model), []) for _ in range(2)]
        urls = [url for _, url in replicas]
        proxy_url, proxy, proxy_thread = start_proxy(round_robin_proxy(urls))
        print(f"replicas {urls[0]} and {urls[1]} behind the round-robin proxy {proxy_url}")
        try:
            answers = asyncio.run(send(proxy_url, image, args.requests))
            served = {url: predict_count(url) for url in urls}
            tops = {(a["top"]["label"], a["top"]["probability"]) for a in answers}
            assert all(a["status"] == 200 for a in answers), answers
            assert all(served.values()), f"a replica served nothing: {served}"
            assert len(tops) == 1, f"the answer depended on the replica: {tops}"
            print(f"{args.requests} requests through the proxy: all 200; served per replica {served}; "
                  f"one answer whichever served it: {tops.pop()}")
            gone, _ = replicas[0]
            print(f"SIGTERM to the replica at {urls[0]}: exit code {stop_server(gone)}")
            after = asyncio.run(send(proxy_url, image, args.requests))
            assert all(a["status"] == 200 and a["replica"] == urls[1] for a in after), after
            print(f"{args.requests} more requests: all 200, all from {urls[1]}")
        finally:
            proxy.should_exit = True
            proxy_thread.join(30)
            for process, _ in replicas:
                if process.poll() is None:
                    stop_server(process)


if __name__ == "__main__":
    main()
