"""Forward-pass throughput and peak memory: bigtransfer's R50x1 vs timm's resnetv2_50x1_bit.

Both models get the same weights (copied from ours into timm's names) and must give the same
logits before anything is timed. Without --channels-last the input is a plain NCHW tensor, as a
user would pass it: our model switches CPU inference to channels_last internally, timm does not.
With --channels-last both models and the input are channels_last (a kernel-for-kernel comparison). Throughput is measured in one process with the two models
interleaved (A B A B ...), so machine drift hits both equally; peak memory is measured in a
fresh subprocess per model and resolution (peak RSS on CPU, peak allocated on CUDA).

    python benchmarks/forward_throughput.py                       # CPU, fp32, 128 and 224 px
    python benchmarks/forward_throughput.py --device cuda --dtype bf16 --channels-last --batch 128

Needs timm (`pip install -e '.[bench]'`). Writes JSON + Markdown under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bigtransfer import create_model

RESULTS = Path(__file__).parent / "results"


def build(impl: str, device: str, dtype: torch.dtype, channels_last: bool, same_weights: bool = True):
    """Our R50x1 (seeded init) or timm's; with `same_weights`, timm's holds exactly our weights."""
    torch.manual_seed(0)
    ours = create_model("R50x1", num_classes=1000, zero_head=False) if impl == "ours" or same_weights else None
    if impl == "ours":
        model = ours
    else:
        import timm

        model = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=1000)
        if same_weights:
            from bigtransfer.models import interop

            model.load_state_dict(interop.from_ours(ours.state_dict(), interop.Layout(interop.TIMM)), strict=True)
            del ours
    model = model.eval().to(device=device, dtype=dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def make_input(batch: int, size: int, device: str, dtype: torch.dtype, channels_last: bool):
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x = x.to(device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def timed(model, x, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        model(x)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def speed(args) -> dict:
    dtype = getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[args.dtype])
    ours = build("ours", args.device, dtype, args.channels_last)
    theirs = build("timm", args.device, dtype, args.channels_last)
    results = {}
    for size in args.sizes:
        x = make_input(args.batch, size, args.device, dtype, args.channels_last)
        with torch.inference_mode():
            a, b = ours(x).float(), theirs(x).float()
        tol = 1e-3 if dtype == torch.float32 else 5e-2
        if not torch.allclose(a, b, rtol=tol, atol=tol * a.abs().max().item()):
            raise SystemExit(f"outputs differ at {size}px: max abs diff {(a - b).abs().max().item():.3g}")
        for _ in range(args.warmup):
            timed(ours, x, args.device), timed(theirs, x, args.device)
        times = {"ours": [], "timm": []}
        for _ in range(args.iters):
            times["ours"].append(timed(ours, x, args.device))
            times["timm"].append(timed(theirs, x, args.device))
        ratios = [t / o for o, t in zip(times["ours"], times["timm"])]
        results[size] = {
            impl: {"images_per_s": args.batch / statistics.median(ts), "median_s": statistics.median(ts)}
            for impl, ts in times.items()
        }
        results[size]["speedup_ours_over_timm"] = {"median": statistics.median(ratios), "min": min(ratios),
                                                   "max": max(ratios)}
        print(f"{size}px: ours {results[size]['ours']['images_per_s']:.1f} img/s, "
              f"timm {results[size]['timm']['images_per_s']:.1f} img/s, "
              f"ours/timm speed ratio median {statistics.median(ratios):.3f} "
              f"[{min(ratios):.3f}, {max(ratios):.3f}]", flush=True)
    return results


def memory_child(args) -> None:
    """Runs in a fresh process: peak memory of one model at one size."""
    dtype = getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[args.dtype])
    model = build(args.impl, args.device, dtype, args.channels_last, same_weights=False)
    x = make_input(args.batch, args.sizes[0], args.device, dtype, args.channels_last)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_peak_bytes()
    for _ in range(2):
        timed(model, x, args.device)
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else _rss_peak_bytes()
    print(json.dumps({"peak_bytes": peak, "before_forward_bytes": base}))


def _rss_peak_bytes() -> int:
    # VmHWM is this process's own high-water mark; getrusage's ru_maxrss would inherit the
    # parent's peak across fork + exec and report the same number for every child.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def memory(args) -> dict:
    results = {}
    for size in args.sizes:
        for impl in ("ours", "timm"):
            cmd = [sys.executable, __file__, "--child-memory", impl, "--sizes", str(size), "--batch", str(args.batch),
                   "--device", args.device, "--dtype", args.dtype] + (["--channels-last"] if args.channels_last else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results.setdefault(size, {})[impl] = json.loads(out.strip().splitlines()[-1])
        mib = {impl: results[size][impl]["peak_bytes"] / 2**20 for impl in ("ours", "timm")}
        act = {impl: (r["peak_bytes"] - r["before_forward_bytes"]) / 2**20 for impl, r in results[size].items()}
        print(f"{size}px: peak memory ours {mib['ours']:.0f} MiB (+{act['ours']:.0f} in forward), "
              f"timm {mib['timm']:.0f} MiB (+{act['timm']:.0f} in forward)", flush=True)
    return results


def _mib(record: dict) -> str:
    peak, before = record["peak_bytes"] / 2**20, record["before_forward_bytes"] / 2**20
    return f"{peak:.0f} (+{peak - before:.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=None, help="result file stem (default: forward_<device>_<dtype>)")
    parser.add_argument("--child-memory", dest="impl", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl:
        memory_child(args)
        return
    import timm

    report = {
        "benchmark": "R50x1 forward pass, eval mode, inference_mode",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "timm": timm.__version__, "dtype": args.dtype,
        "channels_last": args.channels_last, "batch": args.batch, "iters": args.iters,
        "speed": speed(args), "memory": memory(args),
    }
    RESULTS.mkdir(exist_ok=True)
    stem = args.out or f"forward_{args.device}_{args.dtype}{'_cl' if args.channels_last else ''}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = [("| size | ours img/s | timm img/s | ours/timm speed (median [min, max]) "
             "| ours peak MiB (forward's share) | timm peak MiB (forward's share) |"),
            "|---|---|---|---|---|---|"]
    for size in args.sizes:
        s, m = report["speed"][size], report["memory"][size]
        r = s["speedup_ours_over_timm"]
        rows.append(f"| {size} | {s['ours']['images_per_s']:.1f} | {s['timm']['images_per_s']:.1f} | "
                    f"{r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}] | "
                    f"{_mib(m['ours'])} | {_mib(m['timm'])} |")
    header = (f"R50x1 forward, batch {args.batch}, {args.dtype}, {report['device']} ({report['threads']} threads), "
              f"torch {torch.__version__}, timm {timm.__version__}\n\n`{report['command']}`\n\n")
    (RESULTS / f"{stem}.md").write_text(header + "\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
