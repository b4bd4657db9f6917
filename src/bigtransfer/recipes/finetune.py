"""Fine-tuning a BiT model on the user's images with BiT-HyperRule, end to end.

data source -> (few-shot subset) -> HyperRule plan -> model with a zero head -> training loop
-> run directory: config.json, metrics.jsonl, tensorboard/, checkpoints/, final.safetensors,
summary.json. Re-running the same command on the same --out resumes from the last checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import rundir
from ..data.dataset import TransformedImages
from ..data.fewshot import sample_per_class
from ..data.sources import Splits, load_source, report_skipped
from ..data.transforms import eval_transform, train_transform
from ..errors import BigTransferError
from ..models import create_model
from ..models.factory import model_source, resolve_arch_name
from ..models.resnetv2 import parse_arch
from ..train.distributed import DistContext
from ..train.execution import ExecutionOptions
from ..train.linear_probe import extract_features, fit_logistic_regression
from ..train.logbook import Logbook
from ..train.loop import evaluate_model, resolve_execution, train
from ..train.run import TrainingRun
from . import hyperrule

FREEZE_POINTS = ("root", "stage1", "stage2", "stage3", "stage4")


@dataclass
class FinetuneOptions(ExecutionOptions):
    data: str
    model: str = "BiT-M-R50x1"
    weights: str | None = None
    out: Path = Path("runs/finetune")
    # data
    val_fraction: float | None = None
    split_seed: int = 0
    strict: bool = False
    examples_per_class: int | None = None
    seed: int = 0
    # HyperRule overrides (None: the rule decides)
    batch: int | None = None
    base_lr: float | None = None
    steps: int | None = None
    resolution: tuple[int, int] | None = None
    mixup: float | None = None
    flip: bool = True
    random_crop: bool = True
    schedule: str = "release"
    keep_head: bool = False  # start from the weights file's head instead of an all-zero one
    # Supp. A regularisers, off in the HyperRule (the search turns them on)
    dropout: float = 0.0  # on the pre-logits
    l2_to_init: float = 0.0  # weight decay towards the initial weights
    # which layers train (execution options: the base class)
    freeze_until: str | None = None
    linear_probe: bool = False
    extra: dict = field(default_factory=dict)


def prepare_data(opts: FinetuneOptions, splits: Splits | None = None, warn: bool = True) -> Splits:
    """The source's splits (loaded unless given), the training split cut to a few-shot subset if asked."""
    if splits is None:
        splits = load_source(opts.data, val_fraction=opts.val_fraction, seed=opts.split_seed, strict=opts.strict,
                             progress=opts.progress, warn=warn)
    if opts.examples_per_class:
        chosen = sample_per_class(splits.train.labels, opts.examples_per_class, opts.seed, splits.classes)
        splits = Splits(splits.train.subset(chosen), splits.test, splits.skipped)
    return splits


def make_plan(opts: FinetuneOptions, splits: Splits) -> hyperrule.Plan:
    name, _ = model_source(opts.model, opts.weights)
    return hyperrule.plan(
        len(splits.train), splits.train.median_area(), len(splits.classes), resolve_arch_name(name),
        batch=opts.batch, base_lr=opts.base_lr, steps=opts.steps, resolution_override=opts.resolution,
        mixup=opts.mixup, flip=opts.flip, random_crop=opts.random_crop, schedule_variant=opts.schedule,
        keep_head=opts.keep_head,
    )


def _check_kept_head(model, name: str, weights: str | None, classes: int) -> None:
    """--keep-head needs a weights file whose head has the data's class count."""
    from ..models import checkpoint, zoo

    entry = zoo.lookup(name)
    source = weights or (zoo.require_cached(entry) if entry else None)
    head = checkpoint.summarize(Path(source)).num_classes if source else None
    if head != classes:
        raise BigTransferError(f"--keep-head: the weights' head has {head or 'no'} classes, the data has {classes}; "
                               "it can only continue on the same label set")


def _freeze(model, until: str | None) -> list[torch.nn.Module]:
    """Stop gradients for the root and stages up to `until` (inclusive); returns the frozen modules."""
    if until is None:
        return []
    if until not in FREEZE_POINTS:
        raise BigTransferError(f"--freeze-until must be one of {', '.join(FREEZE_POINTS)}, got {until!r}")
    frozen = [model.root] + list(model.stages)[: FREEZE_POINTS.index(until)]
    for module in frozen:
        module.requires_grad_(False)
    return frozen


def check_options(opts: FinetuneOptions, check_out: bool = True, need_weights: bool = True) -> None:
    """Every check that needs no data, run first: a mistyped flag costs a second, not a data scan.
    (`check_out=False` for a protocol's template options, whose jobs each check their own folder;
    `need_weights=False` for a plan, which is arithmetic on the data and runs before a download.)"""
    from ..models import checkpoint, zoo

    def at_least(flag: str, value, low, inclusive: bool = True) -> None:
        if value is not None and (value < low if inclusive else value <= low):
            raise BigTransferError(f"--{flag} must be {'at least' if inclusive else 'more than'} {low}, got {value}")

    name, weights = model_source(opts.model, opts.weights)  # a run or weights file: its header is read
    arch = resolve_arch_name(name)  # an unknown architecture or released name fails here
    entry = zoo.lookup(name)
    if need_weights and weights is None and entry is not None:
        zoo.require_cached(entry)
    if weights is not None:
        summary = checkpoint.summarize(Path(weights))
        if summary.arch != parse_arch(arch):
            raise BigTransferError(f"--weights {weights}: this file is {summary.describe()}, --model is {arch}")
    opts.check_execution()
    for flag, value, low in (("batch", opts.batch, 1), ("steps", opts.steps, 1),
                             ("examples-per-class", opts.examples_per_class, 1), ("mixup", opts.mixup, 0),
                             ("l2-to-init", opts.l2_to_init, 0)):
        at_least(flag, value, low)
    at_least("base-lr", opts.base_lr, 0, inclusive=False)
    if not 0 <= opts.dropout < 1:
        raise BigTransferError(f"--dropout must be in [0, 1), got {opts.dropout}")
    if opts.val_fraction is not None and not 0 < opts.val_fraction < 1:
        raise BigTransferError(f"--val-fraction must be between 0 and 1, got {opts.val_fraction}")
    if opts.resolution is not None and not 0 < opts.resolution[1] <= opts.resolution[0]:
        raise BigTransferError(f"--resolution: crop must be positive and at most the resize, got "
                               f"{opts.resolution[0]}/{opts.resolution[1]}")
    if opts.schedule not in hyperrule.SCHEDULES:
        raise BigTransferError(f"--schedule must be one of {', '.join(hyperrule.SCHEDULES)}, got {opts.schedule!r}")
    if opts.freeze_until is not None and opts.freeze_until not in FREEZE_POINTS:
        raise BigTransferError(f"--freeze-until must be one of {', '.join(FREEZE_POINTS)}, got {opts.freeze_until!r}")
    if check_out:
        rundir.check_claim(Path(opts.out), "finetune")


def run_finetune(opts: FinetuneOptions, splits: Splits | None = None) -> dict:
    """Fine-tune as `opts` says; returns the summary (also written to OUT/summary.json).

    `splits` hands in data already loaded (e.g. decoded once for a whole few-shot sweep); it must
    be what `opts.data` names, which the run records. OUT must be new, empty or a run of ours;
    another process writing it is an error (`rundir.RunInUse`)."""
    check_options(opts)
    ctx = DistContext.from_env(opts.device)
    with TrainingRun.claim(Path(opts.out), "finetune", ctx, restart=opts.restart) as run:
        return _finetune(opts, splits, run)


def _finetune(opts: FinetuneOptions, splits: Splits | None, run: TrainingRun) -> dict:
    ctx = run.ctx
    loaded_here = splits is None  # data handed in was loaded (and its skipped images reported) by the caller
    splits = prepare_data(opts, splits, warn=False)
    if splits.test is None:
        raise BigTransferError(f"--data {opts.data}: nothing to evaluate on (no val/test split)")
    plan = make_plan(opts, splits)
    settings = {
        "plan": plan.to_dict(), "model": opts.model, "weights": str(opts.weights) if opts.weights else None,
        "data": opts.data, "examples_per_class": opts.examples_per_class, "seed": opts.seed,
        "split_seed": opts.split_seed, "freeze_until": opts.freeze_until, "linear_probe": opts.linear_probe,
        "classes": splits.classes,
    }
    if opts.dropout or opts.l2_to_init:  # only when used, so earlier runs keep their fingerprints
        settings["regularisers"] = {"dropout": opts.dropout, "l2_to_init": opts.l2_to_init}
    if (finished := run.finished(settings)) is not None:
        return finished
    torch.manual_seed(opts.seed)  # a from-scratch model's init is part of the run's reproducible state
    name, weights = model_source(opts.model, opts.weights)
    model = create_model(name, num_classes=len(splits.classes), weights=weights)
    if opts.keep_head:
        _check_kept_head(model, name, weights, len(splits.classes))
    else:  # the release always starts from an all-zero head, even when the file's has the same classes
        model.reset_head(len(splits.classes), zero_init=True)
    recipe = plan.training(opts.seed, prelogit_dropout=opts.dropout, l2_to_init=opts.l2_to_init)
    execution = resolve_execution(opts, model, recipe, ctx)
    frozen = _freeze(model, "stage4" if opts.linear_probe else opts.freeze_until)
    run.write_config(batch_split=execution.batch_split, **run.execution_facts(execution.precision, opts),
                     skipped_images=splits.skipped)
    if ctx.is_main:
        report_skipped(run.dir, splits.skipped, opts.data, warn=loaded_here)
        if opts.progress:  # quiet runs (--quiet, sweeps, the demo) keep the plan to config.json
            print(hyperrule.describe(plan), flush=True)

    final = run.final_weights(model, class_names=splits.classes, resolution=plan.crop, provenance={
        "source_model": opts.model, "weights": str(opts.weights or ""), "data": opts.data, "steps": plan.steps})
    test_data = TransformedImages(splits.test, eval_transform(plan.crop), strict=opts.strict)
    if opts.linear_probe:
        metrics = _linear_probe(model, splits, plan, test_data, opts, ctx, execution.precision == "bf16")
        if ctx.is_main:
            final.write()
    else:
        train_data = TransformedImages(
            splits.train, train_transform(plan.resize, plan.crop, random_crop=plan.random_crop, flip=plan.flip),
            strict=opts.strict)
        metrics = train(model, train_data, test_data, recipe, execution, run.dir, ctx, run.fingerprint,
                        frozen_modules=frozen, final=final)
    return run.finish({"final": metrics, "classes": splits.classes, "train_examples": len(splits.train),
                       "test_examples": len(splits.test), "steps": plan.steps, "model": str(run.final_path)})


def _linear_probe(model, splits, plan, test_data, opts, ctx, bf16) -> dict:
    model.to(ctx.device)
    features_data = TransformedImages(splits.train, eval_transform(plan.crop), strict=opts.strict)
    features, labels = extract_features(model, features_data, ctx.device, workers=opts.workers, bf16=bf16,
                                        progress=opts.progress and ctx.is_main)
    weight, bias = fit_logistic_regression(features, labels, len(splits.classes))
    with torch.no_grad():
        model.head.weight.copy_(weight[:, :, None, None])
        model.head.bias.copy_(bias)
    metrics = evaluate_model(model, test_data, ctx, workers=opts.workers, bf16=bf16).result()
    logbook = Logbook(Path(opts.out), enabled=ctx.is_main)
    logbook.log(plan.steps, "eval", **metrics)
    logbook.close()
    return metrics
