"""Verbs that train: plan and finetune (BiT-HyperRule), pretrain (the upstream recipe), the demo."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ..errors import BigTransferError
from .common import (
    add_data_args,
    add_device_args,
    add_execution_args,
    add_hyperrule_args,
    execution_options,
    finetune_options,
    parse_resolution,
    verb,
)


def _add_plan(sub) -> None:
    p = verb(sub, "plan", "Print the BiT-HyperRule plan for a dataset, without training.",
              "  bigtransfer plan --data ~/data/flowers        # BiT-M-R50x1; no download needed for a plan\n"
              "  bigtransfer plan --data digits --model R50x1 -k 5\n"
              "  bigtransfer plan --data labels.csv --model BiT-M-R101x3 --steps 2000 --json\n")
    add_data_args(p, training=True)
    add_hyperrule_args(p)
    p.add_argument("--memory-for", type=float, default=None, metavar="GIB",
                   help="also suggest --batch-split for a device with this much memory")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(run=_run_plan)


def _run_plan(args) -> int:
    from ..models.factory import model_source, resolve_arch_name
    from ..models.resnetv2 import ModelConfig, parse_arch
    from ..recipes import hyperrule
    from ..recipes.finetune import check_options, make_plan, prepare_data
    from ..train import memory

    opts = finetune_options(args, progress=not args.json)
    check_options(opts, check_out=False, need_weights=False)  # a plan is arithmetic on the data
    splits = prepare_data(opts)
    plan = make_plan(opts, splits)
    name, _ = model_source(args.model, args.weights)  # --model may be a run directory or a weights file
    config = ModelConfig(parse_arch(resolve_arch_name(name)), len(splits.classes))
    estimate = memory.report(config, plan.crop, plan.batch, args.memory_for)
    download = _download_still_needed(name, args.weights)
    if args.json:
        print(json.dumps({"plan": plan.to_dict(), "classes": splits.classes, "memory": estimate,
                          "download": download}, indent=2))
        return 0
    print(hyperrule.describe(plan))
    if download:
        print(f"weights        {name} not downloaded yet: {download} (finetune needs it; the plan does not)")
    print(f"memory         weights+grads+momentum {estimate['weights_grads_momentum_gib']:.2f} GiB; "
          f"activations {estimate['activations_per_image_gib_fp32'] * 1024:.0f} MiB/image fp32, "
          f"{estimate['activations_per_image_gib_bf16'] * 1024:.0f} MiB/image bf16 "
          f"(batch {plan.batch} in one pass: {estimate['full_batch_one_pass_gib_fp32']:.1f} GiB fp32)")
    if args.memory_for:
        split = estimate["suggested_batch_split_fp32"]
        print(f"               for {args.memory_for:g} GiB: "
              + (f"--batch-split {split}" if split else "does not fit even one image per micro-batch"))
    return 0


def _download_still_needed(name: str, weights: str | None) -> str | None:
    """The command that fetches a released model's weights, if fine-tuning would need it and the cache lacks it."""
    from ..models import zoo

    entry = zoo.lookup(name)
    if weights is not None or entry is None or zoo.cached_file(entry) is not None:
        return None
    return f"bigtransfer download {entry.name}"


def _add_finetune(sub) -> None:
    p = verb(sub, "finetune", "Fine-tune a BiT model on your images with BiT-HyperRule.",
              "  bigtransfer download BiT-M-R50x1\n"
              "  bigtransfer finetune --data ~/data/flowers --model BiT-M-R50x1 --out runs/flowers\n"
              "  bigtransfer finetune --data cifar-10-python.tar.gz --model BiT-M-R50x1 --batch 128 \\\n"
              "      --base-lr 0.001 --batch-split auto --out runs/cifar10\n"
              "  bigtransfer finetune --data digits --model R26x0.5 -k 5 --steps 100 --out runs/digits5\n"
              "  torchrun --nproc_per_node 8 -m bigtransfer finetune --data ... --out runs/x   # 8 GPUs\n"
              "Re-running the same command with the same --out resumes an interrupted run.\n")
    add_data_args(p, training=True)
    add_hyperrule_args(p)
    g = add_execution_args(p, out_help="run directory (created; resumed if it holds a run)", auto_split=True)
    g.add_argument("--freeze-until", choices=("root", "stage1", "stage2", "stage3", "stage4"), default=None,
                   help="train only the layers after this one")
    g.add_argument("--linear-probe", action="store_true", help="freeze the body; fit only a linear head on its features")
    p.set_defaults(run=_run_finetune)


def _run_finetune(args) -> int:
    from ..recipes.finetune import run_finetune

    opts = finetune_options(args, out=args.out, freeze_until=args.freeze_until, linear_probe=args.linear_probe,
                            **execution_options(args, auto_split=True))
    summary = run_finetune(opts)
    final = summary["final"]
    if final:
        print(f"final: top-1 {final['top1']:.2%}, top-5 {final['top5']:.2%}, loss {final['loss']:.4f} "
              f"on {final['examples']} test images; model: {summary['model']}")
    return 0


def _add_pretrain(sub) -> None:
    p = verb(sub, "pretrain", "Pre-train a BiT model upstream with the paper's recipe.",
              "  bigtransfer pretrain --data ~/data/imagenet --model R50x1 --recipe bit-s --out runs/bit-s\n"
              "  bigtransfer pretrain --data tags.csv --model R101x3 --batch 4096 --batch-split 8 --out runs/m\n"
              "      (tags.csv: path,labels with ';'-separated labels -> sigmoid loss, head bias -10)\n"
              "  bigtransfer pretrain --data shards/ --model R50x1 --probe-data digits --eval-every 2000 ...\n"
              "  torchrun --nproc_per_node 8 -m bigtransfer pretrain --data shards/ --out runs/x\n"
              "  bigtransfer pretrain --data glyphs --model 'R[1,1,1,1]x0.5' --resolution 32 --batch 128 \\\n"
              "      --epochs 3 --out runs/glyphs     # the offline procedural dataset\n"
              "Then: bigtransfer finetune --model runs/bit-s --data ... (the run directory is a model).\n")
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True,
                   help="image folder, CSV manifest (path,label or path,labels), shard folder (bigtransfer pack), "
                        "or 'glyphs' (procedural)")
    g.add_argument("--val-fraction", type=float, default=None, help="hold out this fraction for validation")
    g.add_argument("--strict", action="store_true", help="unreadable images are an error instead of skipped")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="R50x1", help="architecture, e.g. R50x1, R152x4, R26x0.5 (default: %(default)s)")
    g.add_argument("--norm", choices=("gn_ws", "gn", "bn_ws", "bn"), default="gn_ws")
    g.add_argument("--groups", type=int, default=32, help="GroupNorm groups (default 32)")
    g = p.add_argument_group("recipe overrides (default: the paper's upstream recipe)")
    g.add_argument("--recipe", choices=("bit-s", "bit-m", "bit-l"), default="bit-m",
                   help="bit-s/bit-m: 90 epochs, decays at 30/60/80; bit-l: 40 epochs, decays at 10/23/30/37")
    g.add_argument("--loss", choices=("softmax", "sigmoid"), default=None,
                   help="recipe: bit-s softmax; bit-m, bit-l sigmoid with head bias -10 (as for ImageNet-21k), "
                        "whatever the data's layout")
    g.add_argument("--decay", choices=("kernels", "all"), default="kernels",
                   help="weight decay on convolution and head kernels only (default, as the authors' successor "
                        "code) or on every parameter")
    g.add_argument("--batch", type=int, default=None, help="global batch (recipe: 4096)")
    g.add_argument("--base-lr", type=float, default=None, help="lr at batch 256, scaled linearly (recipe: 0.03)")
    g.add_argument("--epochs", type=float, default=None, help="decays stay at the same fractions of training")
    g.add_argument("--warmup-steps", type=int, default=None, help="recipe: 5000, scaled down for short runs")
    g.add_argument("--weight-decay", type=float, default=None, help="recipe: 1e-4")
    g.add_argument("--resolution", type=int, default=None, help="recipe: 224")
    g.add_argument("--min-crop-area", type=float, default=0.08, help="random-resized crop's smallest area fraction")
    g.add_argument("--no-flip", action="store_true",
                   help="no random horizontal flips, for classes that a mirror changes (glyphs, text, digits)")
    g.add_argument("--plan", action="store_true", help="print the plan (schedule, loss, decayed parameters) and stop")
    g = p.add_argument_group("transfer probe")
    g.add_argument("--probe-data", default=None, help="downstream data for few-shot ridge probes at each evaluation")
    g.add_argument("--probe-shots", default="1,5,10", help="examples per class (default: 1,5,10)")
    g.add_argument("--probe-resolution", type=int, default=None)
    add_execution_args(p, out_help="run directory (resumed if it holds a run); required unless --plan",
                       out_required=False)
    p.set_defaults(run=_run_pretrain)


def _run_pretrain(args) -> int:
    from ..recipes.pretrain import PretrainOptions, plan_only, run_pretrain
    from ..recipes.upstream import describe

    try:
        shots = tuple(int(k) for k in args.probe_shots.split(","))
    except ValueError:
        raise BigTransferError(f"--probe-shots must be comma-separated whole numbers, got {args.probe_shots!r}") from None
    if args.out is None and not args.plan:
        raise BigTransferError("pretrain: --out is required (the run directory), unless --plan")
    opts = PretrainOptions(
        data=args.data, model=args.model, out=args.out or Path("."), norm=args.norm, groups=args.groups,
        val_fraction=args.val_fraction, strict=args.strict, seed=args.seed, recipe=args.recipe, loss=args.loss,
        decayed=args.decay, batch=args.batch, base_lr=args.base_lr, epochs=args.epochs,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, resolution=args.resolution,
        min_crop_area=args.min_crop_area, flip=not args.no_flip, probe_data=args.probe_data, probe_shots=shots,
        probe_resolution=args.probe_resolution, **execution_options(args))
    if args.plan:
        print(describe(plan_only(opts)))
        return 0
    summary = run_pretrain(opts)
    final = summary["final"]
    if final:
        score = ", ".join(f"{k} {v:.2%}" for k, v in final.items() if k in ("top1", "top5", "precision_at_1"))
        print(f"final validation: {score}; model: {summary['model']}")
    if summary["fewshot"]:
        print("few-shot probe: " + ", ".join(f"{k} {v:.2%}" for k, v in summary["fewshot"].items()))
    return 0


def _add_demo(sub) -> None:
    p = verb(sub, "demo", "The BiT story offline: pre-train on procedural glyphs, transfer to real digits, "
                           "compare with training from scratch.",
              "  bigtransfer demo                 # writes runs/demo/summary.json and accuracy_vs_examples.png\n"
              "  bigtransfer demo --out /tmp/demo --seeds 3\n"
              "  bigtransfer demo --precision bf16 --out runs/demo-bf16\n"
              "  bigtransfer demo --jobs 1       # one run at a time (leaves the other cores free)\n"
              "Re-running continues where an interrupted demo stopped; --restart starts over.\n")
    g = p.add_argument_group("run")
    g.add_argument("--out", type=Path, default=Path("runs/demo"))
    g.add_argument("--seeds", type=int, default=None,
                   help="fine-tuning draws per shot count (default 5, as in the paper's few-shot runs)")
    g.add_argument("--jobs", type=int, default=0,
                   help="fine-tuning runs trained at once on a CPU, one torch thread each, the pre-training "
                        "beside them (default 0: one per usable core; on a GPU, one at a time)")
    add_device_args(g)
    g.add_argument("--restart", action="store_true",
                   help="start over: delete what an earlier demo wrote in OUT (only that)")
    g.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from ..demo import DemoConfig, run_demo

    if args.seeds is not None and args.seeds < 1:
        raise BigTransferError(f"--seeds must be at least 1, got {args.seeds}")
    config = DemoConfig(precision=args.precision, device=args.device, jobs=args.jobs)
    if args.seeds is not None:
        config = replace(config, seeds=tuple(range(args.seeds)))
    run_demo(args.out, config, progress=not args.quiet, restart=args.restart)
    print(f"wrote {args.out / 'summary.json'} and {args.out / 'accuracy_vs_examples.png'}")
    return 0


def _add_distill(sub) -> None:
    p = verb(sub, "distill", "Distill a fine-tuned BiT (the teacher) into a small, fast student: function matching.",
             "  bigtransfer finetune --data ~/data/flowers --model BiT-M-R152x2 --out runs/teacher\n"
             "  bigtransfer distill --teacher runs/teacher --student R50x1 --data ~/data/flowers --out runs/student\n"
             "  bigtransfer distill --teacher runs/teacher --student BiT-M-R50x1 --new-head --data ~/unlabelled/ \\\n"
             "      --steps 20000 --out runs/student     # a folder of images without classes: the teacher labels them\n"
             "  bigtransfer evaluate --model runs/student --data ~/data/flowers   # the student is a run like any other\n"
             "Defaults are the authors' (big_vision's distillation configs). Re-running resumes.\n")
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True,
                   help="labelled source (its training images are distilled; its labels only score the student) or "
                        "a folder of unlabelled images")
    g.add_argument("--unlabelled", action="store_true", help="ignore --data's labels")
    g.add_argument("--val-fraction", type=float, default=None,
                   help="hold out this fraction of every class to score on, when the source has no val/test split")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the --val-fraction split (default 0)")
    g.add_argument("--strict", action="store_true", help="unreadable images are an error instead of skipped")
    g.add_argument("--seed", type=int, default=0, help="seed of the student's init, data order, augmentation")
    g = p.add_argument_group("teacher and student")
    g.add_argument("--teacher", required=True, help="a fine-tuning run directory, weights file or released name")
    g.add_argument("--student", default="R50x1",
                   help="an architecture (random init, as the authors) or weights/run to start from (default R50x1)")
    g.add_argument("--new-head", action="store_true",
                   help="give a student file whose head has other classes a new all-zero head")
    g.add_argument("--compare", default=None, metavar="RUN",
                   help="a fine-tuning run of the same student, shown beside it in report.html")
    g = p.add_argument_group("recipe overrides (default: the authors')")
    g.add_argument("--batch", type=int, default=None, help="global batch (512)")
    g.add_argument("--base-lr", type=float, default=None, help="peak learning rate (0.003)")
    g.add_argument("--steps", type=int, default=None, help="total steps (default: --epochs x images / batch)")
    g.add_argument("--epochs", type=float, default=None, help="passes over the data when --steps is not given (1000)")
    g.add_argument("--resolution", type=parse_resolution, default=None, metavar="[RESIZE/]CROP",
                   help="the crop both networks see (default: the teacher's resolution)")
    g.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the KL loss (1)")
    g.add_argument("--mixup", type=float, default=1.0, help="MixUp alpha; 0 disables (1: every batch mixed)")
    g.add_argument("--weight-decay", type=float, default=3e-4, help="decoupled, on kernels (3e-4)")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up (1500, at most a tenth of the run)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip (1; 0 disables)")
    g.add_argument("--optimizer", choices=("adam", "sgd"), default="adam", help="adam (the authors') or sgd")
    g.add_argument("--min-crop-area", type=float, default=0.08, help="Inception crop's smallest area fraction")
    g.add_argument("--cache-teacher", action="store_true",
                   help="fixed views (resize only, no MixUp): the teacher's logits computed once and kept")
    add_execution_args(p, out_help="run directory (created; resumed if it holds a run)")
    p.set_defaults(run=_run_distill)


def _run_distill(args) -> int:
    from ..recipes.distill import DistillOptions, run_distill

    opts = DistillOptions(
        data=args.data, teacher=args.teacher, student=args.student, out=args.out, unlabelled=args.unlabelled,
        val_fraction=args.val_fraction, split_seed=args.split_seed, strict=args.strict, seed=args.seed,
        new_head=args.new_head, compare=args.compare, batch=args.batch, base_lr=args.base_lr, steps=args.steps,
        epochs=args.epochs, resolution=args.resolution[1] if args.resolution else None,
        temperature=args.temperature, mixup=args.mixup, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, grad_clip=args.grad_clip or None, optimizer=args.optimizer,
        min_crop_area=args.min_crop_area, cache_teacher=args.cache_teacher, **execution_options(args))
    summary = run_distill(opts)
    final, teacher = summary["final"], summary["teacher"]
    if final:
        print(f"student: top-1 {final['top1']:.2%} (teacher {teacher['top1']:.2%}) on {final['examples']} test "
              f"images; model: {summary['model']}")
    else:
        print(f"student: {summary['model']} (unlabelled data: no test accuracy)")
    return 0


VERBS = (_add_plan, _add_finetune, _add_pretrain, _add_distill, _add_demo,)
