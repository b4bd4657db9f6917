"""Distillation at demo scale: does a student distilled from a larger teacher beat the same student
fine-tuned directly with the HyperRule, on the same compute budget?

1. Upstream: the demo's recipe (glyphs, 3 epochs) pre-trains the student architecture R14x0.5 and a
   larger teacher architecture (R14x1 by default: twice the width, 8.0M parameters against
   2.0M), each once (kept under --work).
2. Teacher: the larger model fine-tuned on the digits' training split (the demo's scaled rule, more
   steps: it may take its time, it is trained once).
3. For each seed: the student (from its pre-trained weights, a new head) distilled from the teacher
   with the authors' recipe, scaled to the budget; then the same pre-trained student fine-tuned
   directly with the demo's scaled HyperRule, its steps set so that it uses as many CPU seconds as
   the distillation did (a teacher forward makes a distillation step dearer).
Everything is scored on the digits' test split, which no choice here looked at.

    python benchmarks/distill_digits.py --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from bigtransfer.demo.story import DemoConfig
from bigtransfer.recipes.distill import DistillOptions, run_distill
from bigtransfer.recipes.finetune import FinetuneOptions, run_finetune
from bigtransfer.recipes.pretrain import PretrainOptions, run_pretrain

HERE = Path(__file__).resolve().parent
DEMO = DemoConfig()


def pretrain(work: Path, arch: str) -> Path:
    out = work / f"pretrain-{arch}"
    run_pretrain(PretrainOptions(
        data=DEMO.upstream_data, model=arch, out=out, recipe=DEMO.recipe, resolution=DEMO.upstream_resolution,
        seed=DEMO.pretrain_seed, flip=DEMO.pretrain_flip,
        batch=DEMO.pretrain_batch, epochs=DEMO.pretrain_epochs, base_lr=DEMO.pretrain_base_lr,
        min_crop_area=DEMO.min_crop_area, workers=1, progress=False, log_every=50))
    return out


def finetune(model: Path, out: Path, steps: int, seed: int) -> tuple[dict, float]:
    start = time.process_time()
    summary = run_finetune(FinetuneOptions(
        data="digits", model=str(model), out=out, batch=DEMO.finetune_batch, steps=steps,
        base_lr=DEMO.finetune_lr, resolution=DEMO.finetune_resolution, flip=False, seed=seed, workers=0,
        progress=False))
    return summary["final"], time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/distill-digits"))
    parser.add_argument("--teacher-arch", default="R14x1")
    parser.add_argument("--teacher-steps", type=int, default=400)
    parser.add_argument("--distill-steps", type=int, default=400)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "distill_digits.json")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.perf_counter()
    student_init, teacher_init = pretrain(args.work, DEMO.arch), pretrain(args.work, args.teacher_arch)
    teacher_final, teacher_seconds = finetune(teacher_init, args.work / "teacher", args.teacher_steps, seed=0)
    print(f"teacher {args.teacher_arch}: test top-1 {teacher_final['top1']:.2%} ({teacher_seconds:.0f}s)", flush=True)
    runs = []
    for seed in seeds:
        start = time.process_time()
        distilled = run_distill(DistillOptions(
            data="digits", teacher=str(args.work / "teacher"), student=str(student_init), new_head=True,
            out=args.work / f"distilled-seed{seed}", batch=DEMO.finetune_batch, steps=args.distill_steps,
            resolution=DEMO.finetune_resolution[1], seed=seed, workers=0, progress=False))["final"]
        budget = time.process_time() - start
        # The direct fine-tune gets the same compute: its step count from a short timing run. Budgets
        # are CPU seconds of this process (no loader processes: workers=0), which other work on the
        # machine does not inflate the way it inflates wall time.
        _, probe_seconds = finetune(student_init, args.work / f"timing-seed{seed}", 40, seed)
        steps = max(40, round(40 * budget / probe_seconds))
        direct, direct_seconds = finetune(student_init, args.work / f"direct-seed{seed}", steps, seed)
        runs.append({"seed": seed, "distilled_top1": distilled["top1"], "distill_seconds": budget,
                     "direct_top1": direct["top1"], "direct_steps": steps, "direct_seconds": direct_seconds})
        print(f"seed {seed}: distilled {distilled['top1']:.2%} ({budget:.0f}s, {args.distill_steps} steps), "
              f"fine-tuned directly {direct['top1']:.2%} ({direct_seconds:.0f}s, {steps} steps)", flush=True)

    def spread(key):
        values = [r[key] for r in runs]
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    result = {"teacher": {"arch": args.teacher_arch, "steps": args.teacher_steps, **teacher_final},
              "student_arch": DEMO.arch, "distill_steps": args.distill_steps, "runs": runs,
              "distilled": spread("distilled_top1"), "direct": spread("direct_top1"),
              "seconds": time.perf_counter() - started}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    d, f = result["distilled"], result["direct"]
    print(f"student {DEMO.arch}: distilled {d['median']:.2%} ({d['min']:.2%}-{d['max']:.2%}) vs fine-tuned directly "
          f"{f['median']:.2%} ({f['min']:.2%}-{f['max']:.2%}); teacher {teacher_final['top1']:.2%}")


if __name__ == "__main__":
    main()
