"""What the verbs share: the parser of one verb, value parsers, and the argument groups that
several verbs take (data, BiT-HyperRule overrides, execution, a model to use).

Nothing here imports torch: building the parser (and `--help`) stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import BigTransferError

# Verbs that decode images take --max-pixels (see data/images.py).
READS_IMAGES = {"plan", "finetune", "evaluate", "predict", "embed", "pretrain", "pack", "fewshot", "vtab",
                "objectnet", "ablation", "search", "dedup", "detect-train", "detect-eval", "distill", "serve"}


def verb(subparsers, name: str, summary: str, examples: str) -> argparse.ArgumentParser:
    """A verb's parser: its one-line summary, and examples at the end of --help."""
    p = subparsers.add_parser(
        name,
        help=summary,
        description=summary,
        epilog="examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if name in READS_IMAGES:
        larger = ("a larger image is answered 413" if name == "serve" else
                  "larger files are skipped as unreadable (an error with --strict)")
        p.add_argument("--max-pixels", type=positive_int, default=None, metavar="N",
                       help="largest image decoded, width x height (default 100000000: twice a 50-megapixel "
                            f"photo); {larger}")
    return p


# What each verb writes and reads, by argument name, so that an output never overlaps an input
# (bigtransfer.overlap): its outputs, the data folders it reads whole, and what it reads by name.
# A name ending in "*" is a comma-separated list; "ROOT/TASK" is vtab-import's output.
PATH_ROLES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "convert": (("dest",), (), ("source",)),
    "finetune": (("out",), ("data",), ("model", "weights")),
    "pretrain": (("out",), ("data", "probe_data"), ("model",)),
    "distill": (("out",), ("data",), ("teacher", "student", "compare")),
    "evaluate": (("out",), ("data",), ("model",)),
    "embed": (("out.npy", "out.csv"), ("images",), ("model",)),
    "export": (("out",), (), ("model",)),
    "push": (("to_folder",), (), ("run_dir",)),
    "fewshot": (("out",), ("data",), ("model", "weights")),
    "vtab": (("out",), (), ("root", "model", "weights")),  # reads ROOT/TASK of the tasks named, not ROOT
    "objectnet": (("out",), ("data",), ("model", "mapping", "boxes")),
    "ablation": (("out",), ("upstream", "downstream*"), ()),
    "search": (("out",), ("data",), ("model", "weights")),
    "pack": (("out",), ("data",), ()),
    "vtab-import": (("ROOT/TASK",), ("hf",), ()),
    "dedup": (("out",), ("upstream", "downstream*"), ("model",)),
    "detect-train": (("out",), (), ("data", "val_data", "images", "val_images", "model")),
    "detect-eval": (("out",), (), ("model", "data", "images")),
}


# --------------------------------------------------------------------------- value parsers
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def parse_resolution(text: str) -> tuple[int, int]:
    try:
        parts = [int(v) for v in text.split("/")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected RESIZE or RESIZE/CROP, e.g. 160/128, got {text!r}") from None
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected RESIZE or RESIZE/CROP, e.g. 160/128, got {text!r}")
    return (parts[0], parts[-1])


def parse_floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def parse_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N such as 0/4, got {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N, got {text!r}")
    return index, count


def parse_batch_split(value: str | int, allow_auto: bool) -> int | str:
    """--batch-split: a whole number >= 1, or 'auto' where the verb can pick one."""
    if allow_auto and value == "auto":
        return value
    try:
        split = int(value)
    except ValueError:
        raise BigTransferError(f"--batch-split must be a whole number{' or auto' if allow_auto else ''}, "
                               f"got {value!r}") from None
    if split < 1:
        raise BigTransferError(f"--batch-split must be at least 1, got {split}")
    return split


# --------------------------------------------------------------------------- argument groups
def add_data_args(p, *, training: bool) -> None:
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


def add_hyperrule_args(p) -> None:
    g = p.add_argument_group("BiT-HyperRule overrides (default: the rule decides)")
    g.add_argument("--model", default="BiT-M-R50x1",
                   help="released name (needs `bigtransfer download`) or architecture such as R50x1 (default: %(default)s)")
    g.add_argument("--weights", default=None, help="start from this .npz/.safetensors instead")
    g.add_argument("--batch", type=int, default=None, help="global batch size (rule: 512)")
    g.add_argument("--base-lr", type=float, default=None, help="peak learning rate (rule: 0.003)")
    g.add_argument("--steps", type=int, default=None, help="total steps; the schedule's boundaries scale with it")
    g.add_argument("--resolution", type=parse_resolution, default=None, metavar="RESIZE[/CROP]",
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


def add_execution_args(p, *, out_help: str, auto_split: bool = False, protocol: bool = False,
                       out_required: bool = True, shard: bool = True) -> argparse._ArgumentGroup:
    """The execution options (train/execution.py) as one group; returns it for verb-specific additions.

    A protocol runs many jobs: it has no per-run cadences, --restart or --fsdp, and adds the
    decode cache and (unless `shard=False`) --shard instead."""
    g = p.add_argument_group("execution" if protocol else "run")
    g.add_argument("--out", type=Path, required=out_required, default=None, help=out_help)
    g.add_argument("--batch-split", default="1",
                   help="micro-batches per step (gradient accumulation)" + (", or 'auto'" if auto_split else ""))
    if not protocol:
        g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (always at the end)")
        g.add_argument("--checkpoint-every", type=int, default=0,
                       help="checkpoint every N steps (default: every 10 minutes, and at the end)")
        g.add_argument("--log-every", type=int, default=10, help="log training loss/lr/speed every N steps")
    g.add_argument("--workers", type=int, default=None, help="data-loading processes (default: cores - 1, at most 8)")
    add_device_args(g)
    if not protocol:
        g.add_argument("--compile", action="store_true", help="torch.compile the model")
        g.add_argument("--fsdp", action="store_true",
                       help="with torchrun: shard weights, gradients and momentum over processes (FSDP), "
                            "for models whose replicated optimizer state does not fit (R152x4)")
    if protocol:
        g.add_argument("--no-cache", action="store_true",
                       help="decode images in every run instead of once per resolution (slower; for comparison)")
        if shard:
            g.add_argument("--shard", type=parse_shard, default=(0, 1), metavar="I/N",
                           help="run only every N-th job starting at I, so N processes share the work (default 0/1)")
    else:
        g.add_argument("--restart", action="store_true", help="discard the run's checkpoint and start over")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    return g


def add_device_args(g) -> None:
    """--precision and --device, the same for every verb that trains (ExecutionOptions)."""
    g.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 autocast where the device does bf16 natively (GPUs, AMX/AVX512-BF16 CPUs) "
                        "and the model is large enough to gain from it, else fp32")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")


def execution_options(args, *, auto_split: bool = False) -> dict:
    """ExecutionOptions keyword arguments from what add_execution_args parsed."""
    from ..train.loop import default_workers

    options = {"batch_split": parse_batch_split(args.batch_split, auto_split),
               "workers": default_workers() if args.workers is None else args.workers,
               "precision": args.precision, "device": args.device, "progress": not args.quiet}
    for name in ("eval_every", "checkpoint_every", "log_every", "compile", "fsdp", "restart"):
        if hasattr(args, name):
            options[name] = getattr(args, name)
    return options


def add_model_args(p) -> None:
    """A trained model to use, and how to run it (evaluate, predict, embed)."""
    p.add_argument("--model", required=True,
                   help="run directory, .safetensors file, released name or authors' .npz")
    p.add_argument("--resolution", type=int, default=None, help="input size (default: from the model's metadata)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    add_runtime_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_runtime_args(p) -> None:
    """How a trained model runs forward (predict, embed, evaluate, serve): backend and precision."""
    p.add_argument("--backend", choices=("auto", "torch", "onnxruntime"), default="auto",
                   help="auto: what measured fastest for this device and model (printed); onnxruntime: CPU, fp32, "
                        "the model exported to ONNX once and kept in the cache")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 where the device computes it natively (GPUs, AMX/AVX512-BF16 CPUs) and the model "
                        "is heavy enough to gain from it, else fp32")


def finetune_options(args, **extra):
    """FinetuneOptions from the data and HyperRule groups (and whatever else the verb adds)."""
    from ..recipes.finetune import FinetuneOptions

    return FinetuneOptions(
        data=args.data, model=args.model, weights=args.weights, val_fraction=args.val_fraction,
        split_seed=args.split_seed, strict=args.strict, examples_per_class=args.examples_per_class, seed=args.seed,
        batch=args.batch, base_lr=args.base_lr, steps=args.steps, resolution=args.resolution, mixup=args.mixup,
        flip=not args.no_flip, random_crop=not args.no_crop, schedule=args.schedule, keep_head=args.keep_head,
        dropout=args.dropout, l2_to_init=args.l2_to_init, **extra)


def protocol_finetune_options(args):
    """The FinetuneOptions every job of a protocol starts from."""
    return finetune_options(args, **execution_options(args))
