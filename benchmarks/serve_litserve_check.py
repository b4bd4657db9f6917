"""Why `bigtransfer serve` is not built on LitServe: three behaviours of LitServe, shown on loopback.

LitServe was the expected light default. With the LitServe installed here (version printed), a
minimal LitAPI that batches (max_batch_size=8, batch_timeout=0.3) and answers 400 for a bad input:
1. one bad input in a dynamic batch fails every request of that batch with the bad one's 400;
2. a body that is not JSON (and not a form) is answered 500 "Internal server error";
3. SIGTERM to the server's main process ends it (exit -15) while its HTTP and inference processes
   keep running and answering /health: orphans holding the port.
Our server answers each request for itself, every bad body with a 4xx, and exits 0 on SIGTERM after
the requests in flight (tests/serving/test_serve.py). Working around all three in LitServe meant replacing
its request path (a custom LitSpec), its signal handling and its shutdown, so little was left of it.

    pip install litserve httpx && python benchmarks/serve_litserve_check.py
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

try:  # optional: only this check needs LitServe
    import litserve
except ImportError:
    litserve = None

if litserve is not None:
    class API(litserve.LitAPI):
        """Batches; a bad input is a 400, as a careful LitServe user would write it."""

        def decode_request(self, request):
            from fastapi import HTTPException

            if request.get("image") == "bad":
                raise HTTPException(400, "not an image")
            return 1

        def predict(self, x):
            return x

        def encode_response(self, output):
            return {"ok": output}


def serve(port: int) -> None:
    litserve.LitServer(API(max_batch_size=8, batch_timeout=0.3), accelerator="cpu").run(
        host="127.0.0.1", port=port, generate_client_file=False, log_level="error", num_api_servers=1)


def children(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc)."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for task in Path(f"/proc/{parent}/task").iterdir():
            kids = [int(k) for k in (task / "children").read_text().split()]
            found += kids
            frontier += kids
    return found


async def probe(url: str) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        mixed = await asyncio.gather(*(client.post("/predict", json={"image": "bad" if i == 0 else "good"})
                                       for i in range(4)))
        print("1. one bad and three good requests, batched:", [(r.status_code, r.json()) for r in mixed])
        text = await client.post("/predict", content=b"not json", headers={"content-type": "text/plain"})
        print("2. a body that is not JSON:", text.status_code, text.text)


def main() -> None:
    import httpx

    from bigtransfer.serving.server import bind

    if litserve is None:
        raise SystemExit("this check needs LitServe: pip install litserve")

    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    print(f"LitServe {litserve.__version__}")
    server = subprocess.Popen([sys.executable, __file__, "serve", str(port)], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    family = children(server.pid)
    try:
        asyncio.run(probe(url))
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=30)
        time.sleep(2)
        alive = [pid for pid in family if Path(f"/proc/{pid}").exists()]
        health = httpx.get(f"{url}/health").status_code if alive else None
        print(f"3. SIGTERM to the main process: exit {code}; {len(alive)} of its {len(family)} child processes "
              f"still running; GET /health then: {health}")
    finally:
        for pid in children(server.pid) if server.poll() is None else []:
            family.append(pid)
        for pid in family:
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)
        if server.poll() is None:
            server.kill()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    if sys.argv[1:2] == ["serve"]:
        serve(int(sys.argv[2]))
    else:
        main()
