"""Does the demo's headline hold on other machines? Emulate what differs between CPUs here.

Another CPU runs other fp32 kernels (AVX2 instead of AVX-512, other blockings), so its sums are
added in another order and a run ends a few draws' worth of noise away from ours. On one machine
the same variation comes from the kernels' instruction set (`isa=avx2` runs oneDNN and ATen as on
an AVX2-only CPU, such as an older AMD EPYC, bf16 then in emulation), bf16 autocast, and,
for a fresh set of pseudo-random choices, another pre-training seed. (The thread count no longer
varies: the demo computes every run in one thread, several runs side by side.)
This script runs the whole demo once per setting, each in its own process, and tabulates
transfer vs scratch per shot count: median (min-max) over the draws, and whether the ranges
separate; beside them the frozen features' ridge probe on the same draws, and whether its range
is above scratch's.

    python benchmarks/demo_robustness.py --out /tmp/robust \\
        --setting fp32:precision=fp32 --setting bf16:precision=bf16 \\
        --setting avx2-fp32:precision=fp32,isa=avx2 --setting seed1:precision=fp32,pretrain_seed=1

Results: OUT/<setting>/summary.json, and benchmarks/results/demo_robustness.{json,md} (--results).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from bigtransfer import machine

CHILD = """
import json, sys
from dataclasses import replace
from pathlib import Path
from bigtransfer.demo import DemoConfig, run_demo
config = replace(DemoConfig(), **json.loads(sys.argv[1]))
run_demo(Path(sys.argv[2]), config, progress=False)
"""


def parse_setting(text: str) -> tuple[str, dict]:
    name, _, spec = text.partition(":")
    settings = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        settings[key] = int(value) if value.lstrip("-").isdigit() else value
    return name, settings


def spread(accuracies: list[float]) -> list[float] | None:
    """[median, min, max] of the draws (None for none)."""
    return [statistics.median(accuracies), min(accuracies), max(accuracies)] if accuracies else None


def spread_cell(triple: list[float] | None) -> str:
    return f"{triple[0]:.1%} ({triple[1]:.1%}-{triple[2]:.1%})" if triple else "-"


def separation(summary: dict) -> list[dict]:
    """Per shot count: both arms' median and range, and how the ranges relate."""
    rows = []
    for shots in summary["config"]["shots"]:
        accs = {arm: [r["top1"] for r in summary["runs"] if r["arm"] == arm and r["examples_per_class"] == shots]
                for arm in ("transfer", "scratch")}
        t, s = accs["transfer"], accs["scratch"]
        paired = [a - b for a, b in zip(t, s)]  # the same draw (seed) in both arms
        # the frozen features' ridge probe on the same draws (none for the full set)
        probe = list(summary.get("ridge_probe", {}).get(str(shots), {}).values())
        rows.append({"shots": shots, "transfer": spread(t), "scratch": spread(s),
                     "ranges_separate": min(t) > max(s), "draws_won": sum(d > 0 for d in paired),
                     "draws": len(paired), "median_gap": statistics.median(t) - statistics.median(s),
                     "probe": spread(probe),
                     "probe_separates": min(probe) > max(s) if probe else None})
    return rows


def markdown(results: dict) -> str:
    yes_no = {True: "yes", False: "no", None: "-"}
    lines = [("| setting | kernels | precision | threads | examples/class | transfer | scratch | gap (medians) | "
              "ranges separate | draws won | ridge probe, same draws | probe's range above scratch's |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, entry in results.items():
        for row in entry["rows"]:
            lines.append(f"| {name} | {entry['isa']} | {entry['precision']} | {entry['threads']} | {row['shots']} | "
                         f"{spread_cell(row['transfer'])} | {spread_cell(row['scratch'])} | "
                         f"{row['median_gap']:+.1%} | {yes_no[row['ranges_separate']]} | "
                         f"{row['draws_won']}/{row['draws']} | {spread_cell(row.get('probe'))} | {yes_no[row.get('probe_separates')]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="one demo folder per setting goes here")
    parser.add_argument("--setting", action="append", required=True,
                        help="NAME:key=value,... over DemoConfig fields (e.g. jobs=1), plus isa=avx2|avx512")
    parser.add_argument("--results", type=Path, default=None,
                        help="write NAME.json and NAME.md here (e.g. benchmarks/results/demo_robustness)")
    args = parser.parse_args()
    results = {}
    for name, settings in map(parse_setting, args.setting):
        out = args.out / name
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        isa = settings.pop("isa", None)
        if isa:  # the kernels an older CPU would run: oneDNN's (convolutions) and ATen's (the rest)
            env.update(ONEDNN_MAX_CPU_ISA=isa.upper(), ATEN_CPU_CAPABILITY=isa.lower())
        began = time.perf_counter()
        subprocess.run([sys.executable, "-c", CHILD, json.dumps(settings), str(out)], env=env, check=True)
        summary = json.loads((out / "summary.json").read_text())
        results[name] = {"settings": settings, "isa": isa or "native", "precision": summary["precision"],
                         "threads": summary["machine"]["threads"], "runs_at_once": summary["machine"].get("runs_at_once", 1),
                         "machine": summary["machine"], "wall_s": time.perf_counter() - began,
                         "seconds": summary["seconds"], "rows": separation(summary)}
        print(markdown({name: results[name]}), flush=True)
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
        args.results.with_suffix(".md").write_text(report(results, " ".join(sys.argv[1:])))


def report(results: dict, argv: str) -> str:
    first = next(iter(results.values()))["machine"]
    return (f"Demo headline under what varies between machines, on {machine.one_line(first)}\n\n"
            f"    python benchmarks/demo_robustness.py {argv}\n\n"
            + markdown(results) + "\n")


if __name__ == "__main__":
    main()
