"""Which memory layout trains faster on a CPU: channels_last or the default (NCHW)?

One SGD step (forward, loss, backward, update) of a ResNet-v2 on random images, one torch
thread, timed for both layouts of the model and its inputs, over a grid of models, micro-batch
sizes, image sides and precisions. Each setting runs in its own process; `--isa avx2` runs them
with the kernels of an AVX2-only CPU (`ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`).
The training loop's choice (`train/layout.py`) is the rule these figures support.

    python benchmarks/cpu_layout.py --results benchmarks/results/cpu_layout
    python benchmarks/cpu_layout.py --isa avx2 --precision fp32 --results benchmarks/results/cpu_layout_avx2
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

GRID = [("R14x0.5", 16, 32), ("R14x0.5", 32, 32), ("R14x0.5", 64, 32), ("R14x0.5", 128, 32),
        ("R14x0.5", 16, 64), ("R14x0.5", 16, 128), ("R50x1", 16, 32), ("R50x1", 64, 32), ("R50x1", 32, 128),
        ("R50x1", 32, 224)]
AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def time_step(arch: str, batch: int, side: int, layout: str, precision: str, seconds: float = 2.0) -> float:
    """Median seconds of one training step (3 rounds of about `seconds` each, after 3 warm-up steps)."""
    import contextlib

    import torch

    from bigtransfer import create_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    model = create_model(arch, num_classes=10).to(memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.003, momentum=0.9)
    images = torch.randn(batch, 3, side, side).contiguous(memory_format=memory_format)
    labels = torch.randint(0, 10, (batch,))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    start = time.perf_counter()
    step()
    repeats = max(1, round(seconds / (time.perf_counter() - start)))
    rounds = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        rounds.append((time.perf_counter() - start) / repeats)
    return statistics.median(rounds)


def measure(setting: dict, isa: str) -> float:
    """`time_step` in a fresh process (so each setting gets its own kernels and a cold allocator)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(AVX2 if isa == "avx2" else {})}
    code = (f"import sys; sys.path[:0] = {[str(Path(__file__).parent), str(Path(__file__).parents[1] / 'src')]!r}; "
            f"from cpu_layout import time_step; print(time_step(**{setting!r}))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--isa", choices=["native", "avx2"], default="native")
    parser.add_argument("--configs", nargs="+", default=[f"{a}:{b}:{s}" for a, b, s in GRID],
                        help="ARCH:MICRO_BATCH:SIDE (default: the grid)")
    parser.add_argument("--results", type=Path, help="write RESULTS.md and RESULTS.json")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from bigtransfer import machine

    rows = []
    for precision in args.precision.split(","):
        for arch, batch, side in (c.split(":") for c in args.configs):
            batch, side = int(batch), int(side)
            times = {layout: measure({"arch": arch, "batch": batch, "side": side, "layout": layout,
                                      "precision": precision}, args.isa)
                     for layout in ("channels_last", "nchw")}
            rows.append({"precision": precision, "arch": arch, "batch": batch, "side": side,
                         "pixels": batch * side * side, **times})
            print(f"{precision} {arch} batch {batch} at {side} px: channels_last {times['channels_last'] * 1e3:.1f} ms, "
                  f"NCHW {times['nchw'] * 1e3:.1f} ms", flush=True)
    header = ("| precision | model | micro-batch x side | pixels per step | channels_last ms/step | NCHW ms/step "
              "| NCHW / channels_last |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['precision']} | {r['arch']} | {r['batch']} x {r['side']} px | {r['pixels']} | "
              f"{r['channels_last'] * 1e3:.1f} | {r['nchw'] * 1e3:.1f} | {r['nchw'] / r['channels_last']:.2f} |"
              for r in rows]
    table = "\n".join(lines)
    print(table)
    if args.results:
        info = {**machine.describe("cpu"), "threads": 1, "isa": args.isa}
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.with_suffix(".json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1) + "\n")
        kernels = " (AVX2 kernels)" if args.isa == "avx2" else ""
        args.results.with_suffix(".md").write_text(
            f"Training-step time by memory layout on {machine.one_line(info)}{kernels}\n\n"
            f"    python benchmarks/cpu_layout.py {shlex.join(sys.argv[1:])}\n\n{table}\n")


if __name__ == "__main__":
    main()
