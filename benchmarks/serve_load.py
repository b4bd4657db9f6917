"""Load test of `bigtransfer serve` over loopback HTTP: throughput and latency with and without batching,
and the server's memory over a soak.

Two servers run side by side on 127.0.0.1, one batching (--max-batch 16 --batch-timeout-ms 10) and
one not (--max-batch 1), both serving the same random-weight model (R50x1 at 128 px by default,
saved with class names by this script). For 1, 8 and 64 concurrent clients each server is driven in
turn (batching, then not) for --duration seconds by httpx async clients posting one JPEG per request
to /predict; every answer must be 200. Then the batching server is soaked for --soak seconds at
the largest client count while its resident memory is sampled. Requests are bounded by time and
by --max-requests; nothing leaves loopback. The clients share the machine's cores with the server,
as they would on one small box.

    python benchmarks/serve_load.py                                   # ~10 minutes
    python benchmarks/serve_load.py --duration 5 --soak 30 --arch 'R[1,1,1,1]x0.5' --resolution 32  # a look

Needs the serve extras (`pip install -e '.[serve]'`) and httpx. Writes JSON + Markdown under
benchmarks/results/ (--results).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

RESULTS = ROOT / "benchmarks" / "results" / "serve_load"
SETTINGS = {"batching": ["--max-batch", "16", "--batch-timeout-ms", "10"], "max-batch 1": ["--max-batch", "1"]}


def save_model(folder: Path, arch: str, resolution: int, classes: int = 10) -> Path:
    """Random weights with class names, as a fine-tuned run would leave them."""
    import torch

    from bigtransfer.models import create_model, save_checkpoint

    torch.manual_seed(0)
    model = create_model(arch, num_classes=classes, zero_head=False)
    return save_checkpoint(model, folder / "model.safetensors", class_names=[f"class{i}" for i in range(classes)],
                           resolution=resolution)


def photo_jpeg(width: int = 320, height: int = 240) -> bytes:
    """A smooth synthetic photo (gradients and waves), JPEG-encoded as a camera would send it."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    pixels = np.stack([np.sin(9 * x) * 0.5 + 0.5, y, np.cos(7 * (x + y)) * 0.5 + 0.5], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray((pixels * 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# --------------------------------------------------------------------------- the servers
def start_server(model: Path, extra: list[str], threads: int | None = None) -> tuple[subprocess.Popen, str]:
    """`bigtransfer serve MODEL --port 0 ...` as a process; returns it once /health says ready."""
    import httpx

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in the server
    process = subprocess.Popen([sys.executable, "-m", "bigtransfer", "serve", str(model), "--port", "0", *extra],
                               stdout=subprocess.PIPE, text=True, env=env)
    line = process.stdout.readline()
    match = re.search(r"listening on (http://\S+)", line)
    if not match:
        process.kill()
        raise RuntimeError(f"the server did not start: {line!r}")
    url = match.group(1)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not become ready in 300 s")


def stop_server(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=120)


def rss_mb(pid: int) -> float:
    """Resident memory of a process (Linux /proc), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# --------------------------------------------------------------------------- the clients
async def drive(url: str, clients: int, duration_s: float, image: bytes, max_requests: int,
                on_tick=None) -> dict:
    """`clients` loops posting the image to /predict until the time or the request budget is spent."""
    import httpx

    latencies: list[float] = []
    failures: dict[str, int] = {}
    sent = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as http:
        started = time.perf_counter()
        end = started + duration_s

        async def client() -> None:
            nonlocal sent
            while time.perf_counter() < end and sent < max_requests:
                sent += 1
                t0 = time.perf_counter()
                try:
                    answer = await http.post("/predict", files={"image": ("photo.jpg", image, "image/jpeg")})
                    outcome = "ok" if answer.status_code == 200 else f"HTTP {answer.status_code}"
                except httpx.HTTPError as err:
                    outcome = type(err).__name__
                if outcome == "ok":
                    latencies.append(time.perf_counter() - t0)
                else:
                    failures[outcome] = failures.get(outcome, 0) + 1

        async def ticker() -> None:
            while on_tick is not None and time.perf_counter() < end:
                on_tick(time.perf_counter() - started)
                await asyncio.sleep(5)

        await asyncio.gather(ticker(), *(client() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"clients": clients, "seconds": round(elapsed, 2), "answered": len(latencies),
            "failed": sum(failures.values()), "failures": failures,
            "requests_per_s": round(len(latencies) / elapsed, 2),
            **{f"p{q}_ms": round(float(np.percentile(ms, q)), 1) if len(ms) else None for q in (50, 95, 99)}}


def batch_sizes(url: str) -> dict:
    """Mean images per batch so far, from the server's own /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        if family.name == "bigtransfer_batch_size":
            values = {s.name: s.value for s in family.samples if not s.labels or "le" not in s.labels}
            return {"batches": values["bigtransfer_batch_size_count"], "images": values["bigtransfer_batch_size_sum"]}
    raise RuntimeError("no bigtransfer_batch_size in /metrics")


def soak(url: str, pid: int, clients: int, duration_s: float, warmup_s: float, image: bytes,
         max_requests: int) -> dict:
    samples: list[tuple[float, float]] = []
    load = asyncio.run(drive(url, clients, duration_s, image, max_requests,
                             on_tick=lambda t: samples.append((round(t, 1), round(rss_mb(pid), 1)))))
    samples.append((round(duration_s, 1), round(rss_mb(pid), 1)))
    after = [rss for t, rss in samples if t >= warmup_s]
    at_warm = after[0]
    return {"clients": clients, "seconds": duration_s, "warmup_s": warmup_s, "rss_mb_samples": samples,
            "rss_mb_after_warmup": at_warm, "rss_mb_max_after_warmup": max(after), "rss_mb_last": after[-1],
            "growth_after_warmup_pct": round(100 * (max(after) / at_warm - 1), 2), "load": load}


# --------------------------------------------------------------------------- the run
def run(args) -> dict:
    import torch

    image = photo_jpeg()
    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        model = save_model(Path(folder), args.arch, args.resolution)
        servers = {name: start_server(model, extra, args.server_threads) for name, extra in SETTINGS.items()}
        try:
            rows = []
            for clients in args.clients:
                for name, (_, url) in servers.items():  # interleaved: drift hits both settings alike
                    before = batch_sizes(url)
                    row = asyncio.run(drive(url, clients, args.duration, image, args.max_requests))
                    after = batch_sizes(url)
                    batches = after["batches"] - before["batches"]
                    row = {"setting": name, **row, "mean_batch": round((after["images"] - before["images"])
                                                                       / batches, 2) if batches else None}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            process, url = servers["batching"]
            soaked = soak(url, process.pid, max(args.clients), args.soak, args.soak_warmup, image,
                          args.max_requests)
            print(json.dumps({k: v for k, v in soaked.items() if k != "rss_mb_samples"}), flush=True)
        finally:
            exits = {name: stop_server(process) for name, (process, _) in servers.items()}
    top = max(args.clients)
    rate = {r["setting"]: r["requests_per_s"] for r in rows if r["clients"] == top}
    return {"machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                        "torch": torch.__version__,  # other work on the machine shows here
                        "load_average_1min": {"start": load_at_start, "end": os.getloadavg()[0]}},
            "server_threads": args.server_threads or "default",
            "model": {"arch": args.arch, "resolution": args.resolution, "weights": "random (seed 0)"},
            "image": {"format": "JPEG", "size": "320x240", "bytes": len(image)},
            "settings": SETTINGS, "duration_s": args.duration, "rows": rows, "soak": soaked,
            "speedup_at_max_clients": round(rate["batching"] / rate["max-batch 1"], 2),
            "failed_requests": sum(r["failed"] for r in rows) + soaked["load"]["failed"],
            "server_exit_codes": exits, "command": reproduce_command(sys.argv[1:])}


def reproduce_command(argv: list[str]) -> str:
    """The command that measures this again (where the results were written does not change them)."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--results="):
            skip = False
            continue
        if arg == "--results":
            skip = True
            continue
        kept.append(arg)
    return " ".join(["python", "benchmarks/serve_load.py", *kept])


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def write(results: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    m, s = results["model"], results["soak"]
    lines = [(f"`bigtransfer serve` under load on {results['machine']['cpu']} ({results['machine']['cores']} cores, "
             f"shared with the client; server torch threads: {results['server_threads']}), {m['arch']} at {m['resolution']} px ({m['weights']}), one "
             f"{results['image']['size']} JPEG ({results['image']['bytes']} bytes) per request to /predict, "
             f"{results['duration_s']:g} s per row, loopback HTTP (httpx async clients)"), "",
             f"    {results['command']}", "",
             "| setting | clients | requests/s | p50 ms | p95 ms | p99 ms | mean batch | failed |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['setting']} | {r['clients']} | {r['requests_per_s']:.1f} | {r['p50_ms']} | {r['p95_ms']} "
                     f"| {r['p99_ms']} | {r['mean_batch']} | {r['failed']} |")
    lines += ["", (f"At {max(r['clients'] for r in results['rows'])} clients batching answers "
                  f"{results['speedup_at_max_clients']:.2f}x the requests/s of --max-batch 1; "
                  f"{results['failed_requests']} requests failed in all."), "",
              (f"Soak: {s['seconds']:g} s at {s['clients']} clients with batching "
              f"({s['load']['requests_per_s']:.1f} requests/s, p99 {s['load']['p99_ms']} ms, "
              f"{s['load']['failed']} failed). Server RSS {s['rss_mb_after_warmup']:.0f} MiB after "
              f"{s['warmup_s']:g} s of warm-up, at most {s['rss_mb_max_after_warmup']:.0f} MiB after it, "
              f"{s['rss_mb_last']:.0f} MiB at the end: growth {s['growth_after_warmup_pct']:+.1f}%."), ""]
    busy = results["machine"].get("load_average_1min")
    if busy:
        lines.append(f"Load average (1 min) of the machine: {busy['start']:.1f} at the start, {busy['end']:.1f} at "
                     f"the end, on {results['machine']['cores']} cores.")
    if results.get("note"):
        lines.append(results["note"])
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="R50x1")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--clients", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8, 64])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per setting and client count")
    parser.add_argument("--soak", type=float, default=300.0, help="seconds of the memory soak")
    parser.add_argument("--soak-warmup", type=float, default=60.0, help="seconds of the soak counted as warm-up")
    parser.add_argument("--max-requests", type=int, default=200_000, help="cap on requests in any one phase")
    parser.add_argument("--server-threads", type=int, default=None,
                        help="torch threads in each server (default: torch's own choice, one per core)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="output stem (.json and .md)")
    args = parser.parse_args()
    results = run(args)
    write(results, args.results)
    print(args.results.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
