"""The paper's evaluation protocols: few-shot, VTAB-1k, ObjectNet, the normalisation ablation,
hyper-parameter search, and rebuilding their reports."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import BigTransferError
from .common import (
    add_data_args,
    add_execution_args,
    add_hyperrule_args,
    parse_floats,
    parse_ints,
    parse_resolution,
    protocol_finetune_options,
    verb,
)


def _add_fewshot(sub) -> None:
    p = verb(sub, "fewshot", "The paper's few-shot protocol: fine-tune at K examples per class over random draws.",
              "  bigtransfer fewshot --model BiT-M-R50x1 --data ~/data/cifar10 --out runs/fs-cifar10\n"
              "  bigtransfer fewshot --model runs/bit-s --data digits --shots 1,5,10,full --repeats 3 --out runs/fs\n"
              "  # two GPUs share one sweep; then either command (or `bigtransfer report`) collects it\n"
              "  CUDA_VISIBLE_DEVICES=0 bigtransfer fewshot ... --shard 0/2 &\n"
              "  CUDA_VISIBLE_DEVICES=1 bigtransfer fewshot ... --shard 1/2\n"
              "Finished runs are never repeated: re-run the same command to resume or to rebuild the report.\n")
    add_data_args(p, training=False)
    g = p.add_argument_group("protocol")
    g.add_argument("--shots", default="1,5,10,25,100", help="K values, comma-separated; 'full' = all (default %(default)s)")
    g.add_argument("--repeats", type=int, default=5, help="random draws per K (seeds 0..R-1; default %(default)s)")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the --val-fraction split (default 0)")
    g.add_argument("--strict", action="store_true", help="unreadable images are an error instead of skipped")
    g.add_argument("--no-linear-probe", action="store_true", help="skip the linear-probe baseline")
    add_hyperrule_args(p)
    add_execution_args(p, out_help="output directory (re-run the command to resume)", protocol=True)
    p.set_defaults(run=_run_fewshot, examples_per_class=None, seed=0)


def _run_fewshot(args) -> int:
    from ..evaluate.fewshot_sweep import SweepOptions, parse_shots, run_sweep
    from ..report.protocols.fewshot import fewshot_table

    opts = SweepOptions(finetune=protocol_finetune_options(args), out=args.out, shots=parse_shots(args.shots),
                        repeats=args.repeats, linear_probe=not args.no_linear_probe, cache=not args.no_cache,
                        shard=args.shard)
    results = run_sweep(opts)
    header, rows = fewshot_table(results)
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(row))
    print(f"{results['finished']}/{results['expected']} runs finished; report: {args.out / 'report.html'}")
    return 0


def _add_vtab(sub) -> None:
    from ..data.vtab_tasks import TASKS

    p = verb(sub, "vtab", "VTAB-1k: fine-tune on 1000 images of each of the 19 tasks with BiT-HyperRule; score table.",
              "  bigtransfer vtab --model BiT-M-R50x1 --root ~/data/vtab --out runs/vtab\n"
              "  bigtransfer vtab --model BiT-M-R50x1 --root ~/data/vtab --tasks dtd,svhn --runs 3 --validate --out runs/v\n"
              "  bigtransfer vtab-import --hf ~/hf/dtd --root ~/data/vtab --task dtd   # from a saved HF dataset\n"
              "Layout: ROOT/<task>/train/<class>/* and ROOT/<task>/test/<class>/* (or ROOT/<task>/manifest.csv).\n"
              f"Tasks: {', '.join(TASKS)}.\n")
    g = p.add_argument_group("protocol")
    g.add_argument("--root", type=Path, required=True, help="folder holding one sub-folder per task")
    g.add_argument("--tasks", default=None, help="comma-separated subset of the 19 tasks (default: all)")
    g.add_argument("--runs", type=int, default=1, help="fine-tunes per task, seeds 0..N-1 (default 1)")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the 800/200 draw (default 0)")
    g.add_argument("--validate", action="store_true", help="also train on train800 and score val200")
    g.add_argument("--strict", action="store_true", help="unreadable images are an error instead of skipped")
    add_hyperrule_args(p)
    add_execution_args(p, out_help="output directory (re-run the command to resume)", protocol=True)
    p.set_defaults(run=_run_vtab, data=None, val_fraction=None, examples_per_class=None, seed=0)


def _run_vtab(args) -> int:
    from ..data.vtab_tasks import TASKS
    from ..evaluate.vtab import VtabOptions, run_vtab

    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip()) if args.tasks else TASKS
    if args.runs < 1:
        raise BigTransferError(f"--runs must be at least 1, got {args.runs}")
    opts = VtabOptions(finetune=protocol_finetune_options(args), root=args.root, out=args.out, tasks=tasks,
                       runs=args.runs, split_seed=args.split_seed, validate=args.validate, cache=not args.no_cache,
                       shard=args.shard)
    results = run_vtab(opts)
    test = results["test"]
    for task, score in test["tasks"].items():
        print(f"{task:<22}{score:8.2%}")
    for group, score in test["groups"].items():
        print(f"{group + ' (mean)':<22}{score:8.2%}")
    if test["mean"] is not None:
        print(f"{'mean':<22}{test['mean']:8.2%}" + ("" if test["complete"] else "   (not all 19 tasks)"))
    print(f"{results['finished']}/{results['expected']} runs finished; report: {args.out / 'report.html'}")
    return 0


def _add_objectnet(sub) -> None:
    p = verb(sub, "objectnet", "ObjectNet-style top-1/top-5 of an ILSVRC-2012 model on the classes it shares "
                                "with ImageNet (shorter side 512, central 480 crop).",
              "  bigtransfer objectnet --model BiT-M-R50x1-ILSVRC2012 --data ~/data/objectnet/images \\\n"
              "      --mapping objectnet_to_ilsvrc.json --out runs/objectnet\n"
              "  bigtransfer objectnet --model r152x4.npz --data objectnet.csv --mapping mapping.csv \\\n"
              "      --boxes boxes.csv --skip-unmapped\n"
              "Mapping: JSON {\"objectnet class\": [\"ilsvrc class name\" or index, ...]} or CSV "
              "objectnet_class,ilsvrc_class.\n"
              "Boxes: CSV path,x0,y0,x1,y1 in pixels, path relative to --data's folder.\n")
    p.add_argument("--model", required=True,
                   help="run directory, .safetensors file, released name or authors' .npz (an ILSVRC-2012 head)")
    p.add_argument("--data", required=True,
                   help="image folder (DIR/<objectnet class>/*) or CSV manifest (path,label) named by ObjectNet class")
    p.add_argument("--mapping", type=Path, required=True,
                   help="ObjectNet class -> ILSVRC classes (names or head indices), .json or .csv")
    p.add_argument("--boxes", type=Path, default=None, help="crop images to these boxes first (CSV path,x0,y0,x1,y1)")
    p.add_argument("--no-restrict", action="store_true",
                   help="score all logits, not only the mapped ILSVRC classes (unmapped predictions count as wrong)")
    p.add_argument("--skip-unmapped", action="store_true",
                   help="drop images of data classes missing from the mapping instead of failing")
    p.add_argument("--resize", type=int, default=512, help="shorter side is resized to this (default 512)")
    p.add_argument("--crop", type=int, default=480, help="central crop size (default 480)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=None, help="write objectnet.json and per_class_accuracy.csv here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_objectnet)


def _run_objectnet(args) -> int:
    from ..evaluate.objectnet import evaluate_objectnet

    result = evaluate_objectnet(args.model, args.data, args.mapping, boxes=args.boxes, restrict=not args.no_restrict,
                                skip_unmapped=args.skip_unmapped, resize=args.resize, crop=args.crop,
                                batch=args.batch, workers=args.workers, device=args.device, out=args.out,
                                progress=not args.quiet)
    cropped = result["settings"]["cropped_images"]
    print(f"ObjectNet top-1 {result['top1']:.2%}  top-5 {result['top5']:.2%}  "
          f"({result['images']} images, {len(result['per_class_accuracy'])} classes"
          + (f", {cropped} cropped to boxes" if args.boxes else "")
          + (", all logits (--no-restrict)" if args.no_restrict else "") + ")")
    if args.out:
        print(f"reports in {args.out}")
    return 0


def _add_ablation(sub) -> None:
    p = verb(sub, "ablation", "Normalisation ablation (paper Tables 4/5): pre-train with BN, BN+WS, GN, GN+WS; transfer each.",
              "  bigtransfer ablation --out runs/ablation              # demo scale: glyphs -> digits, ~15 min on 2 CPU cores\n"
              "  bigtransfer ablation --upstream ~/data/imagenet --arch R50x1 --upstream-resolution 224 \\\n"
              "      --upstream-batch 4096 --upstream-epochs 90 --upstream-lr 0.03 --downstream ~/data/flowers --out runs/abl\n"
              "Re-running the same command resumes; finished models and runs are kept.\n")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--upstream", default="glyphs", help="pre-training data (default: the procedural glyphs)")
    p.add_argument("--downstream", default="digits", help="comma-separated transfer tasks (default: digits)")
    p.add_argument("--arch", default="R14x0.5", help="architecture (default: the demo's R14x0.5)")
    p.add_argument("--norms", default="bn,bn_ws,gn,gn_ws", help="normalisations to compare (default: all four)")
    g = p.add_argument_group("scale (default: the demo's, see `bigtransfer demo`)")
    g.add_argument("--upstream-resolution", type=int, default=None)
    g.add_argument("--upstream-batch", type=int, default=None)
    g.add_argument("--upstream-epochs", type=float, default=None)
    g.add_argument("--upstream-lr", type=float, default=None, help="base lr at batch 256")
    p.add_argument("--shots", default="1,5,10,full", help="transfer K values (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="random draws per K (default 3)")
    g.add_argument("--steps", type=int, default=None, help="fine-tuning steps")
    g.add_argument("--batch", type=int, default=None, help="fine-tuning batch")
    g.add_argument("--base-lr", type=float, default=None, help="fine-tuning lr")
    g.add_argument("--resolution", type=parse_resolution, default=None, metavar="RESIZE[/CROP]", help="fine-tuning resolution")
    p.add_argument("--flip", action="store_true", help="random flips when fine-tuning (off: digits change under a mirror)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_ablation)


def _run_ablation(args) -> int:
    from ..evaluate.ablation import AblationOptions, run_ablation
    from ..evaluate.fewshot_sweep import parse_shots
    from ..report.protocols.ablation import norm_grid

    scale = {"upstream_resolution": args.upstream_resolution, "upstream_batch": args.upstream_batch,
             "upstream_epochs": args.upstream_epochs, "upstream_base_lr": args.upstream_lr,
             "finetune_batch": args.batch, "finetune_steps": args.steps, "finetune_lr": args.base_lr,
             "finetune_resolution": args.resolution}
    opts = AblationOptions(
        out=args.out, upstream=args.upstream, downstream=tuple(t for t in args.downstream.split(",") if t),
        arch=args.arch, norms=tuple(n.strip() for n in args.norms.split(",") if n.strip()),
        shots=parse_shots(args.shots), repeats=args.repeats, flip=args.flip, workers=args.workers,
        precision=args.precision, device=args.device, progress=not args.quiet,
        **{k: v for k, v in scale.items() if v is not None})
    results = run_ablation(opts)

    def show(title, values, ranges=None):
        header, rows = norm_grid(values, ranges)
        print(title)
        for row in [header, *rows]:
            print(f"  {row[0]:<11}{row[1]:>22}{row[2]:>28}")

    show("upstream validation top-1 (Table 4)", results["upstream_top1"])
    for task, by_norm in results["transfer_top1"].items():
        ranges = results["transfer_range"][task]
        for k in opts.shots:
            show(f"transfer to {task}, {k} per class: median (min-max) test top-1 (Table 5)",
                 {n: m.get(str(k)) for n, m in by_norm.items()}, {n: r[str(k)] for n, r in ranges.items()})
    print(f"report: {args.out / 'report.html'}")
    return 0


def _add_search(sub) -> None:
    p = verb(sub, "search", "Random hyper-parameter search (paper Supp. A), compared with BiT-HyperRule.",
              "  bigtransfer search --model BiT-M-R50x1 --data ~/data/vtab/dtd --train-size 800 --val-size 200 \\\n"
              "      --trials 40 --out runs/search-dtd\n"
              "  # workers on several machines share one study through a database URL (give each its own --seed)\n"
              "  bigtransfer search ... --storage postgresql://user:pw@db/bit --seed 1 --no-final\n"
              "  # demo scale: the digits with the demo's pre-trained model and a space shrunk to its budget\n"
              "  bigtransfer search --model runs/demo/pretrain --data digits --steps 40 --batch 64 --base-lr 0.03 \\\n"
              "      --resolution 36/32 --no-flip --space-steps 10,20,40,80,160 --space-resolution 16,24,32,40 \\\n"
              "      --trials 12 --out runs/search-digits\n"
              "Re-running resumes the study; a dead worker's trial is retried and resumes from its checkpoint.\n")
    add_data_args(p, training=False)
    g = p.add_argument_group("search")
    g.add_argument("--trials", type=int, default=40, help="completed trials wanted, over all workers (default 40)")
    g.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite:///OUT/study.sqlite3)")
    g.add_argument("--study-name", default="search")
    g.add_argument("--seed", type=int, default=0, help="the sampler's seed (each worker of a shared study its own)")
    g.add_argument("--search-val-fraction", type=float, default=0.2,
                   help="hold out this fraction of the training split for validation (default 0.2)")
    g.add_argument("--train-size", type=int, default=None, help="with --val-size: a fixed draw, e.g. 800 (VTAB-1k)")
    g.add_argument("--val-size", type=int, default=None, help="with --train-size: e.g. 200 (VTAB-1k)")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the train/validation split (default 0)")
    g.add_argument("--strict", action="store_true", help="unreadable images are an error instead of skipped")
    g.add_argument("--no-final", action="store_true", help="skip retraining the winner and the HyperRule on train+val")
    g.add_argument("--heartbeat", type=int, default=60,
                   help="seconds between a worker's heartbeats; silent for twice this, its trial is retried")
    sp = p.add_argument_group("search space (default: the paper's)")
    sp.add_argument("--space-lr", type=parse_floats, default=None, metavar="MIN,MAX", help="log-uniform (1e-4,1e-1)")
    sp.add_argument("--space-steps", type=parse_ints, default=None, metavar="N,...", help="(500,...,16000)")
    sp.add_argument("--space-dropout", type=parse_floats, default=None, metavar="MIN,MAX", help="uniform (0,0.7)")
    sp.add_argument("--space-l2-to-init", type=parse_floats, default=None, metavar="MIN,MAX", help="log-uniform (1e-6,1e-1)")
    sp.add_argument("--space-mixup", type=parse_floats, default=None, metavar="A,...", help="0 = none (0,0.05,0.1,0.2,0.4)")
    sp.add_argument("--space-resolution", type=parse_ints, default=None, metavar="PX,...", help="crop (64,...,384)")
    add_hyperrule_args(p)
    add_execution_args(p, out_help="output directory (re-run the command to resume)", protocol=True, shard=False)
    p.set_defaults(run=_run_search, examples_per_class=None)


def _run_search(args) -> int:
    from ..evaluate.search import SearchOptions, SearchSpace, run_search

    if args.trials < 1:
        raise BigTransferError(f"--trials must be at least 1, got {args.trials}")
    bounds = {"lr": args.space_lr, "steps": args.space_steps, "dropout": args.space_dropout,
              "l2_to_init": args.space_l2_to_init, "mixup": args.space_mixup, "resolution": args.space_resolution}
    for name in ("lr", "dropout", "l2_to_init"):
        if bounds[name] is not None and len(bounds[name]) != 2:
            raise BigTransferError(f"--space-{name.replace('_', '-')} takes MIN,MAX")
    space = SearchSpace(**{k: v for k, v in bounds.items() if v is not None})
    # --seed is the sampler's; every trial fine-tunes with seed 0, so a trial retried by another worker
    # (another --seed) resumes its own run.
    finetune = dataclasses.replace(protocol_finetune_options(args), seed=0)
    opts = SearchOptions(finetune=finetune, out=args.out, trials=args.trials, space=space,
                         storage=args.storage, study_name=args.study_name, seed=args.seed,
                         val_fraction=args.search_val_fraction, train_size=args.train_size, val_size=args.val_size,
                         split_seed=args.split_seed, final=not args.no_final, cache=not args.no_cache,
                         heartbeat=args.heartbeat)
    results = run_search(opts)
    final = results["final"]
    print(f"{results['complete']} completed trials; report: {args.out / 'report.html'}")
    if final:
        print(f"{'':<28}{'val top-1':>10}{'test top-1':>12}")
        print(f"{'BiT-HyperRule':<28}{final['hyperrule/val']:>10.2%}{final['hyperrule/test']:>12.2%}")
        name = f"random search (trial {final['best_trial']})"
        print(f"{name:<28}{final['best_val_top1']:>10.2%}{final['searched/test']:>12.2%}")
        print("best: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in final["best_params"].items()))
    return 0


def _add_report(sub) -> None:
    p = verb(sub, "report", "Rebuild results files and the HTML report of protocol runs from what has finished.",
              "  bigtransfer report runs/fs-cifar10\n  bigtransfer report runs/vtab runs/ablation\n")
    p.add_argument("dirs", nargs="+", type=Path, metavar="RUN_DIR", help="output directories of fewshot/vtab/ablation")
    p.set_defaults(run=_run_report)


def _run_report(args) -> int:
    from ..report.protocols import rebuild

    for out in args.dirs:
        print(f"{out}: {rebuild(out)}")
    return 0


VERBS = (_add_fewshot, _add_vtab, _add_objectnet, _add_ablation, _add_search, _add_report,)
