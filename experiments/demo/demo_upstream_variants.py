"""Can the demo's upstream, at the same budget, give features that do better at 1 shot?

Each variant changes the demo's pre-training (its `DemoConfig` fields: the glyphs' classes and
images per class, shape jitter, crop area, lr, epochs, or only the seed), pre-trains with one
torch thread, and scores its frozen features with the ridge probe on the validation split carved
from the digits' training part (as `demo_features_vs_pixels.py`; the demo's test split is not
read), 5 draws per shot count. The pre-training seed alone shows how far the same recipe moves.

    python experiments/demo/demo_upstream_variants.py --out /tmp/upstream \\
        --variant demo --variant "seed1;pretrain_seed=1" \\
        --variant "classes200;upstream_data=glyphs:deform=3,classes=200,per_class=100"

A variant is NAME[;field=value;...] (";" because a glyphs spec has commas). Finished pre-trainings
are reused on a re-run, with the seconds they first took. Prints a Markdown table; --results
writes it with the JSON beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_features_vs_pixels import classifiers, draws, features
from demo_oneshot import validation_splits
from demo_upstream import configured

from bigtransfer import machine
from bigtransfer.demo import side_by_side
from bigtransfer.demo.story import DemoConfig, pretrain_upstream


def parse_variant(text: str) -> tuple[str, DemoConfig]:
    name, *assignments = text.split(";")
    return name, configured(assignments, where=f"--variant {text}")


def timed_pretrain(config: DemoConfig, out: Path) -> tuple[dict, float]:
    """The variant's pre-training and the seconds it took. A finished pre-training is reused
    and returns at once (a different one in its folder is refused), so its seconds come from
    the first time, kept beside its folder."""
    timing = out.with_name(out.name + ".seconds.json")
    reused = (out / "summary.json").exists() and timing.exists()
    summary, seconds = pretrain_upstream(config, out, progress=False)
    if reused:
        return summary, json.loads(timing.read_text())["seconds"]
    timing.write_text(json.dumps({"seconds": seconds}) + "\n")
    return summary, seconds


def pretrain_and_probe(config: DemoConfig, out: Path, shots: list[int], seeds: list[int]) -> dict:
    summary, seconds = timed_pretrain(config, out)
    splits = validation_splits()
    train_x, test_x = features(out, splits, config.finetune_resolution[1])
    train_y, test_y = torch.as_tensor(splits.train.labels), torch.as_tensor(splits.test.labels)
    ridge = {}
    for k in shots:
        ridge[str(k)] = [classifiers(train_x[i], train_y[i], test_x, test_y)["ridge"] for i in draws(train_y, k, seeds)]
    return {"upstream_validation_top1": summary["final"]["top1"], "seconds": seconds, "ridge": ridge}


def markdown(results: dict, shots: list[int]) -> str:
    lines = ["| variant | changes | upstream val top-1 | "
             + " | ".join(f"ridge {k}-shot, median (min-max)" for k in shots) + " | pre-training |",
             "|---" * (4 + len(shots)) + "|"]
    for name, r in results.items():
        cells = [f"{statistics.median(v):.1%} ({min(v):.1%}-{max(v):.1%})" for v in r["ridge"].values()]
        lines.append(f"| {name} | {r['changes'] or '(the demo)'} | {r['upstream_validation_top1']:.1%} | "
                     + " | ".join(cells) + f" | {r['seconds']:.0f} s |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the variants' pre-training runs")
    parser.add_argument("--variant", action="append", default=[], help="NAME[;field=value;...]")
    parser.add_argument("--shots", default="1,5")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="few-shot draws")
    parser.add_argument("--jobs", type=int, default=0, help="pre-trainings at once (0: one per core)")
    parser.add_argument("--results", type=Path, help="write RESULTS.md and RESULTS.json")
    args = parser.parse_args()
    variants = dict(parse_variant(v) for v in args.variant or ["demo"])
    shots, seeds = [int(k) for k in args.shots.split(",")], [int(s) for s in args.seeds.split(",")]
    default = dataclasses.asdict(DemoConfig())
    jobs = args.jobs or side_by_side.auto_jobs(len(variants))
    with side_by_side.pool(jobs, 1) as executor:
        futures = {name: executor.submit(pretrain_and_probe, config, args.out / name, shots, seeds)
                   for name, config in variants.items()}
        results = {}
        for name, future in futures.items():
            changed = {k: v for k, v in dataclasses.asdict(variants[name]).items() if v != default[k]}
            results[name] = {"changes": ", ".join(f"{k}={v}" for k, v in changed.items()), **future.result()}
    table = markdown(results, shots)
    print(table)
    if args.results:
        info = {**machine.describe("cpu"), "threads": 1, "runs_at_once": jobs}
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.with_suffix(".json").write_text(json.dumps({"machine": info, "results": results}, indent=1) + "\n")
        args.results.with_suffix(".md").write_text(
            f"The demo's upstream variants on {machine.one_line(info)}\n\n"
            f"    python experiments/demo/demo_upstream_variants.py {shlex.join(sys.argv[1:])}\n\n{table}\n")


if __name__ == "__main__":
    main()
