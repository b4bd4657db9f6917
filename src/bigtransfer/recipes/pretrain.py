"""Upstream pre-training with BiT's recipe (`bigtransfer pretrain`).

data (folder, manifest, multi-label manifest, shards, or the procedural `glyphs`) -> upstream
plan -> a BiT model from scratch -> the same training loop fine-tuning uses -> run directory.
While it trains, the run is validated on its held-out split and, optionally, probed for
transfer: a closed-form few-shot linear probe on a downstream set's frozen pre-logits.
The final model (`OUT/final.safetensors`) loads directly in `bigtransfer finetune --model OUT`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import rundir
from ..data.dataset import TransformedImages
from ..data.shards import ShardSet, ShardStream, is_shard_dir
from ..data.sources import Splits, load_source, report_skipped
from ..data.transforms import eval_transform, upstream_transform
from ..errors import BigTransferError
from ..models import create_model
from ..train.distributed import DistContext
from ..train.execution import ExecutionOptions
from ..train.fewshot_probe import DEFAULT_SEEDS, DEFAULT_SHOTS, fewshot_accuracies, mean_over_draws
from ..train.linear_probe import extract_features
from ..train.logbook import Logbook
from ..train.loop import resolve_execution, train
from ..train.losses import sigmoid_cross_entropy, softmax_cross_entropy
from ..train.run import TrainingRun
from . import upstream


@dataclass
class PretrainOptions(ExecutionOptions):
    data: str
    model: str = "R50x1"
    out: Path = Path("runs/pretrain")
    norm: str = "gn_ws"
    groups: int = 32
    val_fraction: float | None = None
    strict: bool = False
    seed: int = 0
    # recipe overrides (None: the recipe decides)
    recipe: str = "bit-m"
    loss: str | None = None  # None: the recipe's (bit-s softmax; bit-m, bit-l sigmoid)
    decayed: str = "kernels"  # weight decay on the kernels only, or "all" parameters
    batch: int | None = None
    base_lr: float | None = None
    epochs: float | None = None
    warmup_steps: int | None = None
    weight_decay: float | None = None
    resolution: int | None = None
    min_crop_area: float = 0.08
    flip: bool = True  # random horizontal flips (the recipe's); off where a mirror changes the class
    # monitoring
    probe_data: str | None = None
    probe_shots: tuple[int, ...] = DEFAULT_SHOTS
    probe_resolution: int | None = None


@dataclass
class UpstreamData:
    train: object  # TransformedImages or ShardStream
    test: object | None
    classes: list[str]
    multilabel: bool
    size: int
    skipped: list[str] = field(default_factory=list)  # unreadable files of a folder or manifest


def open_upstream_data(opts: PretrainOptions, resolution: int) -> UpstreamData:
    train_tf, test_tf = upstream_transform(resolution, opts.min_crop_area, opts.flip), eval_transform(resolution)
    if is_shard_dir(Path(opts.data)):
        shards = ShardSet(opts.data)
        test = ShardStream(shards, "test", test_tf, train=False, strict=opts.strict) if shards.urls("test") else None
        return UpstreamData(ShardStream(shards, "train", train_tf, train=True, seed=opts.seed, strict=opts.strict), test,
                            shards.classes, shards.multilabel, shards.count("train"))
    splits: Splits = load_source(opts.data, val_fraction=opts.val_fraction, strict=opts.strict,
                                 progress=opts.progress, require_test=False, warn=False)
    test = TransformedImages(splits.test, test_tf, strict=opts.strict) if splits.test is not None else None
    return UpstreamData(TransformedImages(splits.train, train_tf, strict=opts.strict), test, splits.classes,
                        splits.train.multilabel, len(splits.train), splits.skipped)


class TransferProbe:
    """Few-shot ridge probes on a downstream set, run at every evaluation (on the main process)."""

    def __init__(self, spec: str, resolution: int, shots, device: torch.device, bf16: bool,
                 seeds=DEFAULT_SEEDS):
        splits = load_source(spec, progress=False)
        if splits.test is None:
            raise BigTransferError(f"--probe-data {spec}: needs a test split")
        transform = eval_transform(resolution)
        self.train = TransformedImages(splits.train, transform)
        self.test = TransformedImages(splits.test, transform)
        self.num_classes, self.shots, self.device, self.bf16 = len(splits.classes), shots, device, bf16
        self.seeds = tuple(seeds)

    def __call__(self, model) -> dict[str, float]:
        """Mean test accuracy over the draws, per shot count (what the run logs)."""
        return mean_over_draws(self.per_draw(model))

    def per_draw(self, model) -> dict[str, list[float]]:
        """Test accuracy of every draw, per shot count: {"Kshot": [one per seed]}."""
        train_x, train_y = extract_features(model, self.train, self.device, bf16=self.bf16)
        test_x, test_y = extract_features(model, self.test, self.device, bf16=self.bf16)
        return fewshot_accuracies(train_x, train_y, test_x, test_y, self.num_classes, self.shots, self.seeds)


def make_plan(opts: PretrainOptions, data: UpstreamData) -> upstream.UpstreamPlan:
    """The recipe's plan for this data, with the options' overrides."""
    return upstream.upstream_plan(
        data.size, len(data.classes), multilabel=data.multilabel, recipe=opts.recipe, batch=opts.batch,
        base_lr=opts.base_lr, epochs=opts.epochs, warmup_steps=opts.warmup_steps, weight_decay=opts.weight_decay,
        resolution=opts.resolution, loss=opts.loss, decayed=opts.decayed, flip=opts.flip)


def plan_only(opts: PretrainOptions) -> upstream.UpstreamPlan:
    """The plan `run_pretrain` would follow (reads the data's size and labels; trains nothing)."""
    check_options(opts, check_out=False)
    return make_plan(opts, open_upstream_data(opts, opts.resolution or upstream.RESOLUTION))


def build_upstream_model(opts: PretrainOptions, plan: upstream.UpstreamPlan):
    """A from-scratch BiT model with a zero head whose bias is the plan's (-10 for sigmoid)."""
    torch.manual_seed(opts.seed)
    model = create_model(opts.model, num_classes=plan.num_classes, norm=opts.norm, groups=opts.groups)
    with torch.no_grad():
        model.head.bias.fill_(plan.head_bias_init)  # sigmoid: start from "no class present" (p ~ 4.5e-5)
    return model


def check_options(opts: PretrainOptions, check_out: bool = True) -> None:
    """Every check that needs no data, run first (a mistyped flag costs a second, not a data scan)."""
    from ..models.factory import resolve_arch_name
    from ..models.resnetv2 import NORMS, parse_arch

    width = parse_arch(resolve_arch_name(opts.model)).width
    if opts.norm not in NORMS:
        raise BigTransferError(f"--norm must be one of {', '.join(NORMS)}, got {opts.norm!r}")
    if opts.groups < 1 or (64 * width) % opts.groups:
        raise BigTransferError(f"--groups {opts.groups} does not divide the {64 * width:g} channels of {opts.model}")
    opts.check_execution(auto_split=False)
    upstream.upstream_plan(1, 2, recipe=opts.recipe, batch=opts.batch, base_lr=opts.base_lr, epochs=opts.epochs,
                           warmup_steps=opts.warmup_steps, weight_decay=opts.weight_decay,
                           resolution=opts.resolution, loss=opts.loss, decayed=opts.decayed)  # the recipe's checks
    if not 0 < opts.min_crop_area <= 1:
        raise BigTransferError(f"--min-crop-area must be in (0, 1], got {opts.min_crop_area}")
    if check_out:
        rundir.check_claim(Path(opts.out), "pretrain")


def run_pretrain(opts: PretrainOptions) -> dict:
    """Pre-train as `opts` says; returns the summary (also written to OUT/summary.json)."""
    check_options(opts)
    ctx = DistContext.from_env(opts.device)
    with TrainingRun.claim(Path(opts.out), "pretrain", ctx, restart=opts.restart) as run:
        return _pretrain(opts, run)


def _pretrain(opts: PretrainOptions, run: TrainingRun) -> dict:
    ctx = run.ctx
    resolution = opts.resolution or upstream.RESOLUTION
    data = open_upstream_data(opts, resolution)
    plan = make_plan(opts, data)
    settings = {"plan": plan.to_dict(), "model": opts.model, "norm": opts.norm, "groups": opts.groups,
                "data": opts.data, "seed": opts.seed, "min_crop_area": opts.min_crop_area, "classes": data.classes}
    if (finished := run.finished(settings)) is not None:
        return finished
    model = build_upstream_model(opts, plan)
    recipe = plan.training(opts.seed)
    execution = resolve_execution(opts, model, recipe, ctx)
    # Every process probes: under FSDP the forward passes are collective (under DDP the others
    # would only wait at the barrier); the main process logs.
    probe = (TransferProbe(opts.probe_data, opts.probe_resolution or resolution, opts.probe_shots, ctx.device,
                           execution.precision == "bf16") if opts.probe_data else None)
    run.write_config(**run.execution_facts(execution.precision, opts))
    if ctx.is_main:
        report_skipped(run.dir, data.skipped, opts.data, warn=True)
        if opts.progress:
            print(upstream.describe(plan), flush=True)

    probes: dict[int, dict] = {}

    def on_eval(step: int, metrics: dict, logbook: Logbook) -> None:
        if probe is not None:
            probes[step] = probe(model)
            logbook.log(step, "fewshot", **probes[step])  # a no-op on all but the main process
            model.train()

    final = run.final_weights(model, class_names=data.classes, resolution=resolution, provenance={
        "pretrained_on": opts.data, "recipe": plan.recipe, "steps": plan.steps, "loss": plan.loss})
    loss_fn = sigmoid_cross_entropy if plan.loss == "sigmoid" else softmax_cross_entropy
    metrics = train(model, data.train, data.test, recipe, execution, run.dir, ctx, run.fingerprint, loss_fn=loss_fn,
                    on_eval=on_eval, final=final)
    return run.finish({"final": metrics, "fewshot": probes.get(plan.steps, {}), "classes": len(data.classes),
                       "train_images": data.size, "steps": plan.steps, "model": str(run.final_path)})
