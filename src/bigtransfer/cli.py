"""`bigtransfer <verb>`: argument parsing and output only; the work lives in the library.

Exit codes: 0 success, 2 bad arguments or bad input (one line naming the file or flag),
1 internal failure (with a traceback, because that is a bug).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import BigTransferError

EXIT_USAGE = 2


READS_IMAGES = {"plan", "finetune", "evaluate", "predict", "embed", "pretrain", "pack", "fewshot", "vtab",
                "objectnet", "ablation", "search", "dedup", "detect-train", "detect-eval"}


def _verb(subparsers, name: str, summary: str, examples: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        help=summary,
        description=summary,
        epilog="examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if name in READS_IMAGES:
        p.add_argument("--max-pixels", type=_positive_int, default=None, metavar="N",
                       help="largest image decoded, width x height (default 100000000: twice a 50-megapixel "
                            "photo); larger files are skipped as unreadable (an error with --strict)")
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


# --------------------------------------------------------------------------- models
def _add_models(sub) -> None:
    p = _verb(sub, "models", "List the known BiT models and whether each is in the local cache.",
              "  bigtransfer models\n  bigtransfer models --all --json > zoo.json\n")
    p.add_argument("--all", action="store_true", help="also list the 285 VTAB-1k fine-tuned files")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_run_models)


def _run_models(args) -> int:
    from .models import zoo
    from .models.resnetv2 import parameter_count

    rows = []
    for entry in zoo.known_models(include_vtab=args.all):
        path = zoo.cached_path(entry)
        rows.append({
            "name": entry.name,
            "architecture": entry.arch_name,
            "parameters": parameter_count(entry.arch, entry.num_classes),
            "head": entry.num_classes,
            "cached": path.is_file(),
            "description": entry.description,
        })
    if args.json:
        print(json.dumps({"cache": str(zoo.cache_dir()), "models": rows}, indent=2))
        return 0
    print(f"cache: {zoo.cache_dir()}  (set BIGTRANSFER_HOME to move it)")
    header = f"{'name':<34} {'arch':<7} {'params':>9} {'head':>6}  {'cached':<6}  description"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['name']:<34} {row['architecture']:<7} {row['parameters'] / 1e6:>8.1f}M "
              f"{row['head']:>6}  {'yes' if row['cached'] else 'no':<6}  {row['description']}")
    if not args.all:
        print(f"\n(+ {len(zoo.known_models(True)) - len(rows)} VTAB-1k fine-tuned files: bigtransfer models --all)")
    return 0


# --------------------------------------------------------------------------- download
def _add_download(sub) -> None:
    p = _verb(sub, "download", "Fetch released BiT weights into the cache (resumable, SHA-256 recorded).",
              "  bigtransfer download BiT-M-R50x1\n"
              "  bigtransfer download BiT-S-R101x3 BiT-M-R50x1-run0-caltech101\n"
              "  BIGTRANSFER_BASE_URL=http://mirror.local/bit_models bigtransfer download BiT-M-R50x1\n")
    p.add_argument("names", nargs="+", metavar="NAME", help="released model names (see `bigtransfer models`)")
    p.add_argument("--force", action="store_true", help="download again even if the file is cached")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_download)


def _run_download(args) -> int:
    from .models import zoo

    entries = []
    for name in args.names:
        entry = zoo.lookup(name)
        if entry is None:
            raise BigTransferError(f"unknown model {name!r}; `bigtransfer models --all` lists the known names")
        entries.append(entry)
    for entry in entries:
        path = zoo.cached_path(entry)
        if path.is_file() and not args.force:
            if zoo.recorded_sha256(entry) is None:
                print(f"{entry.name}: already present at {path} (no recorded SHA-256)")
            elif zoo.verify(entry):
                print(f"{entry.name}: already present at {path} (SHA-256 verified)")
            else:
                raise BigTransferError(
                    f"{path}: SHA-256 differs from the one recorded at download; "
                    f"re-fetch with: bigtransfer download --force {entry.name}"
                )
            continue
        path = zoo.download(entry, force=args.force, progress=not args.quiet)
        print(f"{entry.name}: saved {path} (sha256 {zoo.recorded_sha256(entry)})")
    return 0


# --------------------------------------------------------------------------- convert / info
def _add_convert(sub) -> None:
    p = _verb(sub, "convert", "Convert an authors' .npz (file or cached released name) to .safetensors.",
              "  bigtransfer convert BiT-M-R50x1 bit_m_r50x1.safetensors\n"
              "  bigtransfer convert ~/Downloads/BiT-S-R101x1.npz r101.safetensors\n")
    p.add_argument("source", help="a released name (must be cached) or a path to a .npz/.safetensors")
    p.add_argument("dest", type=Path, help="output .safetensors path")
    p.add_argument("--overwrite", action="store_true", help="replace DEST if it exists")
    p.set_defaults(run=_run_convert)


def _run_convert(args) -> int:
    from .models import checkpoint, create_model, zoo
    from .rundir import check_new_file

    entry = zoo.lookup(args.source)
    source = zoo.require_cached(entry) if entry else Path(args.source)
    if args.dest.suffix != ".safetensors":
        raise BigTransferError(f"{args.dest}: the output must end in .safetensors")
    check_new_file(args.dest, "convert DEST", overwrite=args.overwrite)
    summary = checkpoint.summarize(source)
    if summary.num_classes is None:
        raise BigTransferError(f"{source}: the file has no head; nothing to convert it to a classifier with")
    model = create_model(summary.arch.name, weights=source)
    provenance = {"source": str(entry.relpath if entry else source.name), "sha256": zoo.sha256_of(source)}
    checkpoint.save_checkpoint(model, args.dest, provenance=provenance)
    print(f"wrote {args.dest} ({summary.describe()})")
    return 0


def _add_info(sub) -> None:
    p = _verb(sub, "info", "Show what a weights file holds: architecture, head, metadata.",
              "  bigtransfer info BiT-M-R50x1.npz\n  bigtransfer info runs/pets/final.safetensors\n")
    p.add_argument("path", type=Path)
    p.set_defaults(run=_run_info)


def _run_info(args) -> int:
    from .models import checkpoint

    print(json.dumps(checkpoint.read_metadata(args.path), indent=2))
    return 0


# --------------------------------------------------------------------------- fine-tuning
def _add_data_args(p, *, training: bool) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True,
                   help="image folder (DIR/train/<class>/*, DIR/val/<class>/*, or DIR/<class>/*), "
                        "CSV manifest (path,label[,split]), CIFAR-10/100 python archive or folder, or 'digits'")
    g.add_argument("--val-fraction", type=float, default=None,
                   help="hold out this fraction of every class when the source has no val/test split")
    if training:
        g.add_argument("--split-seed", type=int, default=0, help="seed of the --val-fraction split (default 0)")
        g.add_argument("--strict", action="store_true", help="unreadable images are an error instead of skipped")
        g.add_argument("--examples-per-class", "-k", type=int, default=None, metavar="K",
                       help="few-shot: train on K randomly drawn images of every class")
        g.add_argument("--seed", type=int, default=0, help="seed of the few-shot draw, data order, augmentation")


def _add_hyperrule_args(p) -> None:
    g = p.add_argument_group("BiT-HyperRule overrides (default: the rule decides)")
    g.add_argument("--model", default="BiT-M-R50x1",
                   help="released name (needs `bigtransfer download`) or architecture such as R50x1 (default: %(default)s)")
    g.add_argument("--weights", default=None, help="start from this .npz/.safetensors instead")
    g.add_argument("--batch", type=int, default=None, help="global batch size (rule: 512)")
    g.add_argument("--base-lr", type=float, default=None, help="peak learning rate (rule: 0.003)")
    g.add_argument("--steps", type=int, default=None, help="total steps; the schedule's boundaries scale with it")
    g.add_argument("--resolution", type=_resolution, default=None, metavar="RESIZE[/CROP]",
                   help="train resize and crop, e.g. 160/128 or 384 (= 384/384)")
    g.add_argument("--mixup", type=float, default=None, help="MixUp alpha; 0 disables (rule: 0.1 from 20k examples)")
    g.add_argument("--no-flip", action="store_true", help="no random horizontal flip (orientation tasks)")
    g.add_argument("--no-crop", action="store_true", help="no random crop (counting, distance, location tasks)")
    g.add_argument("--schedule", choices=("release", "paper"), default="release",
                   help="release: warm-up + the authors' step boundaries (default); paper: /10 at 30/60/90%%")
    g.add_argument("--keep-head", action="store_true",
                   help="keep the weights file's head instead of a new all-zero one (continuing on the same classes)")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout on the pre-logits (not in the rule; default 0)")
    g.add_argument("--l2-to-init", type=float, default=0.0,
                   help="weight decay towards the initial weights (not in the rule; default 0)")


def _resolution(text: str) -> tuple[int, int]:
    try:
        parts = [int(v) for v in text.split("/")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected RESIZE or RESIZE/CROP, e.g. 160/128, got {text!r}") from None
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected RESIZE or RESIZE/CROP, e.g. 160/128, got {text!r}")
    return (parts[0], parts[-1])


def _add_plan(sub) -> None:
    p = _verb(sub, "plan", "Print the BiT-HyperRule plan for a dataset, without training.",
              "  bigtransfer plan --data ~/data/flowers --model BiT-M-R50x1\n"
              "  bigtransfer plan --data digits --model R50x1 -k 5\n"
              "  bigtransfer plan --data labels.csv --model BiT-M-R101x3 --steps 2000 --json\n")
    _add_data_args(p, training=True)
    _add_hyperrule_args(p)
    p.add_argument("--memory-for", type=float, default=None, metavar="GIB",
                   help="also suggest --batch-split for a device with this much memory")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(run=_run_plan)


def _finetune_options(args, **extra):
    from .finetune import FinetuneOptions

    return FinetuneOptions(
        data=args.data, model=args.model, weights=args.weights, val_fraction=args.val_fraction,
        split_seed=args.split_seed, strict=args.strict, examples_per_class=args.examples_per_class, seed=args.seed,
        batch=args.batch, base_lr=args.base_lr, steps=args.steps, resolution=args.resolution, mixup=args.mixup,
        flip=not args.no_flip, random_crop=not args.no_crop, schedule=args.schedule, keep_head=args.keep_head,
        dropout=args.dropout,
        l2_to_init=args.l2_to_init, **extra)


def _run_plan(args) -> int:
    from . import hyperrule
    from .finetune import make_plan, prepare_data
    from .models.factory import model_source, resolve_arch_name
    from .models.resnetv2 import ModelConfig, parse_arch
    from .train import memory

    opts = _finetune_options(args, progress=not args.json)
    splits = prepare_data(opts)
    plan = make_plan(opts, splits)
    name, _ = model_source(args.model, args.weights)  # --model may be a run directory or a weights file
    config = ModelConfig(parse_arch(resolve_arch_name(name)), len(splits.classes))
    estimate = memory.report(config, plan.crop, plan.batch, args.memory_for)
    if args.json:
        print(json.dumps({"plan": plan.to_dict(), "classes": splits.classes, "memory": estimate}, indent=2))
        return 0
    print(hyperrule.describe(plan))
    print(f"memory         weights+grads+momentum {estimate['weights_grads_momentum_gib']:.2f} GiB; "
          f"activations {estimate['activations_per_image_gib_fp32'] * 1024:.0f} MiB/image fp32, "
          f"{estimate['activations_per_image_gib_bf16'] * 1024:.0f} MiB/image bf16 "
          f"(batch {plan.batch} in one pass: {estimate['full_batch_one_pass_gib_fp32']:.1f} GiB fp32)")
    if args.memory_for:
        split = estimate["suggested_batch_split_fp32"]
        print(f"               for {args.memory_for:g} GiB: "
              + (f"--batch-split {split}" if split else "does not fit even one image per micro-batch"))
    return 0


def _add_finetune(sub) -> None:
    p = _verb(sub, "finetune", "Fine-tune a BiT model on your images with BiT-HyperRule.",
              "  bigtransfer download BiT-M-R50x1\n"
              "  bigtransfer finetune --data ~/data/flowers --model BiT-M-R50x1 --out runs/flowers\n"
              "  bigtransfer finetune --data cifar-10-python.tar.gz --model BiT-M-R50x1 --batch 128 \\\n"
              "      --base-lr 0.001 --batch-split auto --out runs/cifar10\n"
              "  bigtransfer finetune --data digits --model R26x0.5 -k 5 --steps 100 --out runs/digits5\n"
              "  torchrun --nproc_per_node 8 -m bigtransfer finetune --data ... --out runs/x   # 8 GPUs\n"
              "Re-running the same command with the same --out resumes an interrupted run.\n")
    _add_data_args(p, training=True)
    _add_hyperrule_args(p)
    g = p.add_argument_group("run")
    g.add_argument("--out", type=Path, required=True, help="run directory (created; resumed if it holds a run)")
    g.add_argument("--batch-split", default="1", help="micro-batches per step (gradient accumulation), or 'auto'")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (always at the end)")
    g.add_argument("--checkpoint-every", type=int, default=0,
                   help="checkpoint every N steps (default: every 10 minutes, and at the end)")
    g.add_argument("--log-every", type=int, default=10, help="log training loss/lr/speed every N steps")
    g.add_argument("--workers", type=int, default=None, help="data-loading processes (default: cores - 1, at most 8)")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 autocast where the device does bf16 natively (GPUs, AMX/AVX512-BF16 CPUs), else fp32")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--fsdp", action="store_true",
                   help="with torchrun: shard weights, gradients and momentum over processes (FSDP)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda")
    g.add_argument("--freeze-until", choices=("root", "stage1", "stage2", "stage3", "stage4"), default=None,
                   help="train only the layers after this one")
    g.add_argument("--linear-probe", action="store_true", help="freeze the body; fit only a linear head on its features")
    g.add_argument("--restart", action="store_true", help="discard the run's checkpoint and start over")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_finetune)


def _run_finetune(args) -> int:
    from .finetune import run_finetune
    from .train.loop import default_workers

    split = args.batch_split
    if split != "auto":
        try:
            split = int(split)
        except ValueError:
            raise BigTransferError(f"--batch-split must be a whole number or 'auto', got {split!r}") from None
        if split < 1:
            raise BigTransferError(f"--batch-split must be at least 1, got {split}")
    opts = _finetune_options(
        args, out=args.out, batch_split=split, eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        workers=default_workers() if args.workers is None else args.workers, precision=args.precision,
        compile=args.compile, fsdp=args.fsdp, device=args.device, freeze_until=args.freeze_until,
        linear_probe=args.linear_probe,
        restart=args.restart, progress=not args.quiet)
    summary = run_finetune(opts)
    final = summary["final"]
    if final:
        print(f"final: top-1 {final['top1']:.2%}, top-5 {final['top5']:.2%}, loss {final['loss']:.4f} "
              f"on {final['examples']} test images; model: {summary['model']}")
    return 0


# --------------------------------------------------------------------------- pre-training
def _add_pretrain(sub) -> None:
    p = _verb(sub, "pretrain", "Pre-train a BiT model upstream with the paper's recipe.",
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
    g.add_argument("--plan", action="store_true", help="print the plan (schedule, loss, decayed parameters) and stop")
    g = p.add_argument_group("transfer probe")
    g.add_argument("--probe-data", default=None, help="downstream data for few-shot ridge probes at each evaluation")
    g.add_argument("--probe-shots", default="1,5,10", help="examples per class (default: 1,5,10)")
    g.add_argument("--probe-resolution", type=int, default=None)
    g = p.add_argument_group("run")
    g.add_argument("--out", type=Path, default=None, help="run directory (resumed if it holds a run); "
                                                           "required unless --plan")
    g.add_argument("--batch-split", type=int, default=1, help="micro-batches per step (gradient accumulation)")
    g.add_argument("--eval-every", type=int, default=0)
    g.add_argument("--checkpoint-every", type=int, default=0,
                   help="checkpoint every N steps (default: every 10 minutes, and at the end)")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--workers", type=int, default=None)
    g.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    g.add_argument("--compile", action="store_true")
    g.add_argument("--fsdp", action="store_true",
                   help="with torchrun: shard weights, gradients and momentum over processes (FSDP), "
                        "for models whose replicated optimizer state does not fit (R152x4)")
    g.add_argument("--device", default="auto")
    g.add_argument("--restart", action="store_true")
    g.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_run_pretrain)


def _run_pretrain(args) -> int:
    from .pretrain import PretrainOptions, run_pretrain
    from .train.loop import default_workers

    try:
        shots = tuple(int(k) for k in args.probe_shots.split(","))
    except ValueError:
        raise BigTransferError(f"--probe-shots must be comma-separated whole numbers, got {args.probe_shots!r}") from None
    if args.batch_split < 1:
        raise BigTransferError(f"--batch-split must be at least 1, got {args.batch_split}")
    opts = PretrainOptions(
        data=args.data, model=args.model, out=args.out or Path("."), norm=args.norm, groups=args.groups,
        val_fraction=args.val_fraction, strict=args.strict, seed=args.seed, recipe=args.recipe, loss=args.loss,
        decayed=args.decay, batch=args.batch,
        base_lr=args.base_lr, epochs=args.epochs, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        resolution=args.resolution, min_crop_area=args.min_crop_area, probe_data=args.probe_data,
        probe_shots=shots, probe_resolution=args.probe_resolution, batch_split=args.batch_split,
        eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, log_every=args.log_every,
        workers=default_workers() if args.workers is None else args.workers, precision=args.precision,
        compile=args.compile, fsdp=args.fsdp, device=args.device, restart=args.restart, progress=not args.quiet)
    if args.out is None and not args.plan:
        raise BigTransferError("pretrain: --out is required (the run directory), unless --plan")
    if args.plan:
        from .pretrain import plan_only
        from .upstream import describe

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


def _add_pack(sub) -> None:
    p = _verb(sub, "pack", "Pack an image folder, manifest or built-in set into webdataset tar shards.",
              "  bigtransfer pack --data ~/data/imagenet --out shards/imagenet --shard-size 5000\n"
              "  bigtransfer pack --data tags.csv --out shards/tags\n"
              "Shards are read by `pretrain --data shards/imagenet`; upload them anywhere webdataset reads.\n")
    p.add_argument("--data", required=True, help="image folder, CSV manifest, CIFAR archive, digits or glyphs")
    p.add_argument("--val-fraction", type=float, default=None, help="hold out this fraction as the test split")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_run_pack)


def _run_pack(args) -> int:
    from .data.shards import pack
    from .data.sources import load_source

    splits = load_source(args.data, val_fraction=args.val_fraction, progress=not args.quiet,
                         require_test=False)
    meta = pack(splits, args.out, shard_size=args.shard_size, progress=not args.quiet)
    for name, info in meta["splits"].items():
        print(f"{name}: {info['count']} images in {len(info['shards'])} shard(s)")
    print(f"wrote {args.out}/dataset.json")
    return 0


# --------------------------------------------------------------------------- demo
def _add_demo(sub) -> None:
    p = _verb(sub, "demo", "The BiT story offline: pre-train on procedural glyphs, transfer to real digits, "
                           "compare with training from scratch.",
              "  bigtransfer demo                 # writes runs/demo/summary.json and accuracy_vs_examples.png\n"
              "  bigtransfer demo --out /tmp/demo --seeds 5\n"
              "Re-running continues where an interrupted demo stopped; --restart starts over.\n")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per shot count (default 3)")
    p.add_argument("--restart", action="store_true",
                   help="start over: delete what an earlier demo wrote in OUT (only that)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from .demo import DemoConfig, run_demo

    if args.seeds < 1:
        raise BigTransferError(f"--seeds must be at least 1, got {args.seeds}")
    run_demo(args.out, DemoConfig(seeds=tuple(range(args.seeds))), progress=not args.quiet, restart=args.restart)
    print(f"wrote {args.out / 'summary.json'} and {args.out / 'accuracy_vs_examples.png'}")
    return 0


# --------------------------------------------------------------------------- using a model
def _add_model_arg(p) -> None:
    p.add_argument("--model", required=True,
                   help="run directory, .safetensors file, released name or authors' .npz")
    p.add_argument("--resolution", type=int, default=None, help="input size (default: from the model's metadata)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_evaluate(sub) -> None:
    p = _verb(sub, "evaluate", "Top-1, top-5, per-class accuracy and a confusion matrix on labelled data.",
              "  bigtransfer evaluate --model runs/flowers --data ~/data/flowers --out runs/flowers/eval\n"
              "  bigtransfer evaluate --model model.safetensors --data test.csv --split train\n")
    _add_model_arg(p)
    _add_data_args(p, training=False)
    p.add_argument("--split", choices=("test", "train"), default="test")
    p.add_argument("--out", type=Path, default=None,
                   help="write metrics.json, per_class_accuracy.csv, confusion.csv and confusion.png here")
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args) -> int:
    from .inference import evaluate

    result = evaluate(args.model, args.data, split=args.split, val_fraction=args.val_fraction, out=args.out,
                      batch=args.batch, workers=args.workers, device=args.device, resolution=args.resolution,
                      progress=not args.quiet)
    print(f"top-1 {result['top1']:.2%}  top-5 {result['top5']:.2%}  loss {result['loss']:.4f}  "
          f"({result['examples']} images, {args.split} split)")
    if args.out:
        print(f"reports in {args.out}")
    return 0


def _add_predict(sub) -> None:
    p = _verb(sub, "predict", "Top-k labels with class names and probabilities for images.",
              "  bigtransfer predict --model runs/flowers photo1.jpg photo2.png\n"
              "  bigtransfer predict --model runs/flowers ~/Pictures/garden --top-k 3 --json > predictions.json\n")
    _add_model_arg(p)
    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_run_predict)


def _run_predict(args) -> int:
    from .inference import predict

    results, unreadable = predict(args.model, args.images, top_k=args.top_k, batch=args.batch,
                                  workers=args.workers, device=args.device, resolution=args.resolution,
                                  progress=not (args.quiet or args.json))
    if args.json:
        print(json.dumps({"predictions": results, "unreadable": [str(p) for p in unreadable]}, indent=2))
    else:
        for r in results:
            print(r["path"])
            for rank, pred in enumerate(r["predictions"], start=1):
                print(f"  {rank}. {pred['label']:<30} {pred['probability']:7.2%}")
    if unreadable:
        print(f"bigtransfer: warning: {len(unreadable)} unreadable image(s): "
              f"{', '.join(map(str, unreadable[:5]))}", file=sys.stderr)
    return 0


def _add_embed(sub) -> None:
    p = _verb(sub, "embed", "Pre-logit features (the BiT representation) of images, to .npy + an index CSV.",
              "  bigtransfer embed --model BiT-M-R50x1 --resolution 224 ~/Pictures --out features/pictures\n"
              "  (writes features/pictures.npy [N, 2048] and features/pictures.csv: row,path)\n")
    _add_model_arg(p)
    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--out", type=Path, required=True, help="output stem: OUT.npy and OUT.csv")
    p.add_argument("--overwrite", action="store_true", help="replace OUT.npy/OUT.csv if they exist")
    p.set_defaults(run=_run_embed)


def _run_embed(args) -> int:
    from .inference import embed

    result = embed(args.model, args.images, args.out, batch=args.batch, workers=args.workers, device=args.device,
                   resolution=args.resolution, progress=not args.quiet, overwrite=args.overwrite)
    print(f"wrote {result['features']} {tuple(result['shape'])} and {result['index']}")
    if result["unreadable"]:
        print(f"bigtransfer: warning: skipped {len(result['unreadable'])} unreadable image(s): "
              f"{', '.join(result['unreadable'][:5])}", file=sys.stderr)
    return 0


def _add_export(sub) -> None:
    p = _verb(sub, "export", "Export a model to ONNX (checked with onnxruntime), TorchScript or torch.export (.pt2).",
              "  bigtransfer export --model runs/flowers --out flowers.onnx\n"
              "  bigtransfer export --model runs/flowers --format torchscript --out flowers.pt\n"
              "  bigtransfer export --model runs/flowers --format pt2 --out flowers.pt2\n")
    p.add_argument("--model", required=True, help="run directory, .safetensors file, released name or .npz")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--format", choices=("onnx", "torchscript", "pt2"), default="onnx")
    p.add_argument("--resolution", type=int, default=None, help="input size (default: from the model's metadata)")
    p.add_argument("--no-check", action="store_true", help="skip comparing the export with PyTorch")
    p.add_argument("--overwrite", action="store_true", help="replace OUT (and OUT.json) if it exists")
    p.set_defaults(run=_run_export)


def _run_export(args) -> int:
    from .export import export

    report = export(args.model, args.out, args.format, resolution=args.resolution, check=not args.no_check,
                    overwrite=args.overwrite)
    diff = report.get("max_abs_diff_vs_pytorch")
    print(f"wrote {report['path']} ({args.format}; input {report['input']}"
          + (f"; max |diff| vs PyTorch {diff:.2e}" if diff is not None else "") + ")")
    return 0


# --------------------------------------------------------------------------- entry point
# --------------------------------------------------------------------------- evaluation protocols
def _add_execution_args(p) -> None:
    g = p.add_argument_group("execution")
    g.add_argument("--out", type=Path, required=True, help="output directory (re-run the command to resume)")
    g.add_argument("--batch-split", type=int, default=1, help="micro-batches per step (gradient accumulation)")
    g.add_argument("--workers", type=int, default=None, help="data-loading processes (default: cores - 1, at most 8)")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--no-cache", action="store_true",
                   help="decode images in every run instead of once per resolution (slower; for comparison)")
    g.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                   help="run only every N-th job starting at I, so N processes share the work (default 0/1)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N such as 0/4, got {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N, got {text!r}")
    return index, count


def _protocol_finetune_options(args):
    from .train.loop import default_workers

    if args.batch_split < 1:
        raise BigTransferError(f"--batch-split must be at least 1, got {args.batch_split}")
    return _finetune_options(
        args, batch_split=args.batch_split, workers=default_workers() if args.workers is None else args.workers,
        precision=args.precision, device=args.device, progress=not args.quiet)


def _add_fewshot(sub) -> None:
    p = _verb(sub, "fewshot", "The paper's few-shot protocol: fine-tune at K examples per class over random draws.",
              "  bigtransfer fewshot --model BiT-M-R50x1 --data ~/data/cifar10 --out runs/fs-cifar10\n"
              "  bigtransfer fewshot --model runs/bit-s --data digits --shots 1,5,10,full --repeats 3 --out runs/fs\n"
              "  # two GPUs share one sweep; then either command (or `bigtransfer report`) collects it\n"
              "  CUDA_VISIBLE_DEVICES=0 bigtransfer fewshot ... --shard 0/2 &\n"
              "  CUDA_VISIBLE_DEVICES=1 bigtransfer fewshot ... --shard 1/2\n"
              "Finished runs are never repeated: re-run the same command to resume or to rebuild the report.\n")
    _add_data_args(p, training=False)
    g = p.add_argument_group("protocol")
    g.add_argument("--shots", default="1,5,10,25,100", help="K values, comma-separated; 'full' = all (default %(default)s)")
    g.add_argument("--repeats", type=int, default=5, help="random draws per K (seeds 0..R-1; default %(default)s)")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the --val-fraction split (default 0)")
    g.add_argument("--strict", action="store_true", help="unreadable images are an error instead of skipped")
    g.add_argument("--no-linear-probe", action="store_true", help="skip the linear-probe baseline")
    _add_hyperrule_args(p)
    _add_execution_args(p)
    p.set_defaults(run=_run_fewshot, examples_per_class=None, seed=0)


def _run_fewshot(args) -> int:
    from .evaluate.fewshot_sweep import SweepOptions, parse_shots, run_sweep
    from .evaluate.report import fewshot_table

    opts = SweepOptions(finetune=_protocol_finetune_options(args), out=args.out, shots=parse_shots(args.shots),
                        repeats=args.repeats, linear_probe=not args.no_linear_probe, cache=not args.no_cache,
                        shard=args.shard)
    results = run_sweep(opts)
    header, rows = fewshot_table(results)
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(row))
    print(f"{results['finished']}/{results['expected']} runs finished; report: {args.out / 'report.html'}")
    return 0


def _add_report(sub) -> None:
    p = _verb(sub, "report", "Rebuild results files and the HTML report of protocol runs from what has finished.",
              "  bigtransfer report runs/fs-cifar10\n  bigtransfer report runs/vtab runs/ablation\n")
    p.add_argument("dirs", nargs="+", type=Path, metavar="RUN_DIR", help="output directories of fewshot/vtab/ablation")
    p.set_defaults(run=_run_report)


def _run_report(args) -> int:
    from .evaluate.report import rebuild

    for out in args.dirs:
        print(f"{out}: {rebuild(out)}")
    return 0


def _add_objectnet(sub) -> None:
    p = _verb(sub, "objectnet", "ObjectNet-style top-1/top-5 of an ILSVRC-2012 model on the classes it shares "
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
    from .evaluate.objectnet import evaluate_objectnet

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


def _add_vtab(sub) -> None:
    from .evaluate.vtab import TASKS

    p = _verb(sub, "vtab", "VTAB-1k: fine-tune on 1000 images of each of the 19 tasks with BiT-HyperRule; score table.",
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
    _add_hyperrule_args(p)
    _add_execution_args(p)
    p.set_defaults(run=_run_vtab, data=None, val_fraction=None, examples_per_class=None, seed=0)


def _run_vtab(args) -> int:
    from .evaluate.vtab import TASKS, VtabOptions, run_vtab

    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip()) if args.tasks else TASKS
    if args.runs < 1:
        raise BigTransferError(f"--runs must be at least 1, got {args.runs}")
    opts = VtabOptions(finetune=_protocol_finetune_options(args), root=args.root, out=args.out, tasks=tasks,
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


def _add_vtab_import(sub) -> None:
    p = _verb(sub, "vtab-import", "Write a Hugging Face dataset saved to disk as a VTAB task folder (PNG files).",
              "  bigtransfer vtab-import --hf ~/hf/dtd --root ~/data/vtab --task dtd\n"
              "  bigtransfer vtab-import --hf ~/hf/eurosat --root ~/data/vtab --task eurosat --image-column img\n")
    p.add_argument("--hf", type=Path, required=True, help="a folder written by datasets' save_to_disk")
    p.add_argument("--root", type=Path, required=True, help="VTAB root; the task goes to ROOT/TASK/")
    p.add_argument("--task", required=True, help="the task's VTAB name (see `bigtransfer vtab --help`)")
    p.add_argument("--image-column", default="image")
    p.add_argument("--label-column", default="label")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_vtab_import)


def _run_vtab_import(args) -> int:
    from .data.hf_import import import_hf_dataset
    from .evaluate.vtab import GROUP_OF

    if args.task not in GROUP_OF:
        raise BigTransferError(f"--task: unknown VTAB task {args.task!r}")
    written = import_hf_dataset(args.hf, args.root / args.task, image_column=args.image_column,
                                label_column=args.label_column, progress=not args.quiet)
    print(", ".join(f"{n} {split} images" for split, n in written.items()) + f" in {args.root / args.task}")
    return 0


def _add_ablation(sub) -> None:
    p = _verb(sub, "ablation", "Normalisation ablation (paper Tables 4/5): pre-train with BN, BN+WS, GN, GN+WS; transfer each.",
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
    g.add_argument("--resolution", type=_resolution, default=None, metavar="RESIZE[/CROP]", help="fine-tuning resolution")
    p.add_argument("--flip", action="store_true", help="random flips when fine-tuning (off: digits change under a mirror)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_ablation)


def _run_ablation(args) -> int:
    from .evaluate.ablation import AblationOptions, run_ablation
    from .evaluate.fewshot_sweep import parse_shots
    from .evaluate.report import norm_grid

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


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None


def _add_search(sub) -> None:
    p = _verb(sub, "search", "Random hyper-parameter search (paper Supp. A), compared with BiT-HyperRule.",
              "  bigtransfer search --model BiT-M-R50x1 --data ~/data/vtab/dtd --train-size 800 --val-size 200 \\\n"
              "      --trials 40 --out runs/search-dtd\n"
              "  # workers on several machines share one study through a database URL (give each its own --seed)\n"
              "  bigtransfer search ... --storage postgresql://user:pw@db/bit --seed 1 --no-final\n"
              "  # demo scale: the digits with the demo's pre-trained model and a space shrunk to its budget\n"
              "  bigtransfer search --model runs/demo/pretrain --data digits --steps 40 --batch 64 --base-lr 0.03 \\\n"
              "      --resolution 36/32 --no-flip --space-steps 10,20,40,80,160 --space-resolution 16,24,32,40 \\\n"
              "      --trials 12 --out runs/search-digits\n"
              "Re-running resumes the study; a dead worker's trial is retried and resumes from its checkpoint.\n")
    _add_data_args(p, training=False)
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
    sp.add_argument("--space-lr", type=_floats, default=None, metavar="MIN,MAX", help="log-uniform (1e-4,1e-1)")
    sp.add_argument("--space-steps", type=_ints, default=None, metavar="N,...", help="(500,...,16000)")
    sp.add_argument("--space-dropout", type=_floats, default=None, metavar="MIN,MAX", help="uniform (0,0.7)")
    sp.add_argument("--space-l2-to-init", type=_floats, default=None, metavar="MIN,MAX", help="log-uniform (1e-6,1e-1)")
    sp.add_argument("--space-mixup", type=_floats, default=None, metavar="A,...", help="0 = none (0,0.05,0.1,0.2,0.4)")
    sp.add_argument("--space-resolution", type=_ints, default=None, metavar="PX,...", help="crop (64,...,384)")
    _add_hyperrule_args(p)
    g = p.add_argument_group("execution")
    g.add_argument("--out", type=Path, required=True, help="output directory (re-run the command to resume)")
    g.add_argument("--workers", type=int, default=None, help="data-loading processes (default: cores - 1, at most 8)")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--no-cache", action="store_true", help="decode images in every trial instead of once per size")
    g.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(run=_run_search, examples_per_class=None, batch_split=1)


def _run_search(args) -> int:
    from .search import SearchOptions, SearchSpace, run_search

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
    finetune = dataclasses.replace(_protocol_finetune_options(args), seed=0)
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
        print(f"{'random search (best trial)':<28}{final['best_val_top1']:>10.2%}{final['searched/test']:>12.2%}")
        print("best: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in final["best_params"].items()))
    return 0


def _add_dedup(sub) -> None:
    p = _verb(sub, "dedup", "Find near-duplicates of test images in an upstream collection (paper Supp. C).",
              "  bigtransfer dedup --upstream ~/data/imagenet21k.csv --downstream ~/data/cifar10,~/data/pets \\\n"
              "      --model BiT-M-R50x1 --out runs/dedup\n"
              "  bigtransfer pretrain --data runs/dedup/upstream_filtered.csv ...   # pre-train without them\n"
              "Writes pairs.csv, upstream_filtered.csv, contact_sheet.png/.html and summary.json.\n")
    p.add_argument("--upstream", required=True, help="upstream image folder or CSV manifest")
    p.add_argument("--downstream", required=True,
                   help="comma-separated downstream sources; each one's test split (all its images if it has none)")
    p.add_argument("--model", default="BiT-M-R50x1", help="embedding model (default %(default)s)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--resolution", type=int, default=128, help="embedding input size (default 128)")
    p.add_argument("--cosine", type=float, default=0.90, help="cosine a nearest neighbour must reach (default 0.90)")
    p.add_argument("--margin", type=float, default=0.03, help="... and by which it must beat the second (0.03)")
    p.add_argument("--identical", type=float, default=0.98, help="cosine that makes a duplicate at any rank (0.98)")
    p.add_argument("--hash-bits", type=int, default=4, help="pHash Hamming radius of the pre-filter (of 64; 4)")
    p.add_argument("--hash-cosine", type=float, default=0.95, help="cosine a hash match must still reach (0.95)")
    p.add_argument("--neighbours", type=int, default=5, help="nearest upstream images per test image")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_dedup)


def _run_dedup(args) -> int:
    from .dedup import DedupOptions, run_dedup

    summary = run_dedup(DedupOptions(
        upstream=args.upstream, downstream=tuple(d for d in args.downstream.split(",") if d), out=args.out,
        model=args.model, resolution=args.resolution, cosine=args.cosine, margin=args.margin,
        identical=args.identical, hash_bits=args.hash_bits,
        hash_cosine=args.hash_cosine, neighbours=args.neighbours, batch=args.batch, workers=args.workers,
        device=args.device, progress=not args.quiet))
    print(f"{summary['pairs']} near-duplicate pairs; {summary['upstream_duplicates']} of {summary['upstream_images']} "
          f"upstream images removed in {args.out / 'upstream_filtered.csv'} ({summary['seconds']:.0f}s)")
    return 0


def _add_detect_train(sub) -> None:
    p = _verb(sub, "detect-train", "Train RetinaNet with a BiT backbone on COCO-format data (paper section 3.7).",
              "  bigtransfer detect-train --data coco/train.json --val-data coco/val.json --model BiT-M-R101x3 \\\n"
              "      --batch 16 --out runs/det      # the paper's plan, lr scaled to the batch: 0.08 x 16/256\n"
              "  bigtransfer detect-train --data shapes/annotations.json --model R50x1 --resolution 256 \\\n"
              "      --epochs 12 --decay-epochs 8,11 --grad-clip 1 --out runs/shapes\n"
              "Images are looked up next to the json (or under --images). Re-running resumes.\n")
    p.add_argument("--data", required=True, help="COCO json of the training images")
    p.add_argument("--val-data", default=None, help="COCO json of the validation images (COCO AP at the end)")
    p.add_argument("--images", default=None, help="folder of the training images (default: the json's folder)")
    p.add_argument("--val-images", default=None)
    p.add_argument("--model", default="BiT-M-R101x3", help="backbone: released name, run, weights file or architecture")
    p.add_argument("--out", type=Path, required=True)
    g = p.add_argument_group("plan (default: the paper's)")
    g.add_argument("--resolution", type=int, default=1024, help="input size (default 1024)")
    g.add_argument("--batch", type=int, default=256, help="batch (default 256)")
    g.add_argument("--base-lr", type=float, default=None, help="lr (default 0.08 x batch/256)")
    g.add_argument("--epochs", type=float, default=30.0)
    g.add_argument("--decay-epochs", type=_floats, default=(16.0, 22.0), help="lr /10 at these epochs (16,22)")
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--grad-clip", type=float, default=None, help="max gradient norm (not in the paper)")
    g.add_argument("--fpn-channels", type=int, default=256)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--workers", type=int, default=0)
    g.add_argument("--device", default="auto")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_detect_train)


def _run_detect_train(args) -> int:
    from .detection.train import DetectOptions, run_detect_train

    summary = run_detect_train(DetectOptions(
        data=args.data, val_data=args.val_data, images=args.images, val_images=args.val_images, model=args.model,
        out=args.out, resolution=args.resolution, batch=args.batch, base_lr=args.base_lr, epochs=args.epochs,
        decay_epochs=args.decay_epochs, warmup_steps=args.warmup_steps, grad_clip=args.grad_clip,
        fpn_channels=args.fpn_channels, seed=args.seed, workers=args.workers, device=args.device,
        progress=not args.quiet))
    final = summary["final"]
    print(f"trained {summary['steps']} steps; model: {summary['model']}"
          + (f"; validation AP {final['AP']:.3f}, AP50 {final['AP50']:.3f}" if final else ""))
    return 0


def _add_detect_eval(sub) -> None:
    p = _verb(sub, "detect-eval", "COCO AP of a trained detection run on COCO-format data (pycocotools).",
              "  bigtransfer detect-eval --model runs/det --data coco/val.json --out runs/det/eval\n")
    p.add_argument("--model", required=True, help="a detect-train run directory")
    p.add_argument("--data", required=True, help="COCO json")
    p.add_argument("--images", default=None, help="folder of the images (default: the json's folder)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=None, help="write detections.json and metrics.json here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_detect_eval)


def _run_detect_eval(args) -> int:
    from .detection.train import run_detect_eval

    metrics = run_detect_eval(args.model, args.data, args.images, device=args.device, batch=args.batch, out=args.out,
                              progress=not args.quiet)
    print("  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return 0


VERBS: tuple[Callable, ...] = (
    _add_models, _add_download, _add_convert, _add_info, _add_plan, _add_finetune,
    _add_evaluate, _add_predict, _add_embed, _add_export, _add_pretrain, _add_pack, _add_demo,
    _add_fewshot, _add_vtab, _add_vtab_import, _add_objectnet, _add_ablation,
    _add_search, _add_dedup, _add_detect_train, _add_detect_eval, _add_report,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bigtransfer",
        description="Big Transfer (BiT) in PyTorch: models, weights, fine-tuning, evaluation.",
        epilog="examples:\n  bigtransfer models\n  bigtransfer download BiT-M-R50x1\n"
               "run `bigtransfer VERB --help` for a verb's options and examples",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for add in VERBS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "max_pixels", None):
        from .data.images import MAX_PIXELS_ENV

        os.environ[MAX_PIXELS_ENV] = str(args.max_pixels)  # loader processes inherit it
    try:
        return args.run(args)
    except BigTransferError as err:
        print(f"bigtransfer: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("bigtransfer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
