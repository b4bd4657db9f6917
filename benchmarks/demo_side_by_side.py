"""How much faster is the demo with its runs side by side, and are its figures unchanged?

Runs the whole demo (`bigtransfer demo`, as `make demo` does) twice in fresh folders, in one
session on the same machine: first one run at a time (`--jobs 1`), then side by side (`--jobs N`,
default: one per usable core). Both compute every run in one torch thread, so the figures must
agree to the last digit; the wall times give the speed-up.

    python benchmarks/demo_side_by_side.py --out /tmp/side --results benchmarks/results/demo_side_by_side

Writes OUT/jobsK/ (each demo's folder) and, with --results, NAME.json and NAME.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from bigtransfer import machine
from bigtransfer.demo.side_by_side import usable_cores


def run_demo(out: Path, jobs: int) -> dict:
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bigtransfer", "demo", "--out", str(out), "--jobs", str(jobs), "--quiet"],
                   check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    wall = time.perf_counter() - began
    summary = json.loads((out / "summary.json").read_text())
    return {"jobs": jobs, "wall_s": wall, "seconds": summary["seconds"],
            "top1": [r["top1"] for r in summary["runs"]], "machine": summary["machine"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--jobs", type=int, default=usable_cores(), help="runs at once in the side-by-side demo")
    parser.add_argument("--results", type=Path, default=None, help="write NAME.json and NAME.md here")
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"demo_side_by_side: --out {args.out} is not empty; name a new folder")
    alone, side = run_demo(args.out / "jobs1", 1), run_demo(args.out / f"jobs{args.jobs}", args.jobs)
    same = alone["top1"] == side["top1"]
    lines = [(f"`bigtransfer demo` on {machine.one_line({**side['machine'], 'runs_at_once': 1})}, "
             f"{time.strftime('%Y-%m-%d')}"),
             "", "    python benchmarks/demo_side_by_side.py --out /tmp/side", "",
             "| runs at once | wall time | pre-training | transfer runs (summed) | scratch runs (summed) |",
             "|---|---|---|---|---|"]
    for entry in (alone, side):
        s = entry["seconds"]
        lines.append(f"| {entry['jobs']} | {entry['wall_s']:.0f} s | {s['pretrain']:.0f} s | {s['transfer']:.0f} s | "
                     f"{s['scratch']:.0f} s |")
    lines += ["", (f"Side by side / one at a time: {side['wall_s'] / alone['wall_s']:.2f} of the wall time. "
              f"All {len(side['top1'])} runs' accuracies {'identical' if same else 'DIFFER'}.")]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.with_suffix(".json").write_text(json.dumps({"alone": alone, "side_by_side": side,
                                                                 "identical": same}, indent=1) + "\n")
        args.results.with_suffix(".md").write_text(text)
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
