"""Distillation (`bigtransfer distill`): a small student learns to compute what a big teacher computes.

The recipe of "Knowledge distillation: A good teacher is patient and consistent" (Beyer et al.,
CVPR 2022), with the values of the authors' configs in big_vision (`configs/proj/distill/`):
  * function matching: teacher and student see the identical augmented image, the same Inception
    crop, flip and MixUp (every batch mixed, ratio ~ Beta(1, 1)); aggressive augmentation is the
    point: it shows the student the teacher's function far from the training images;
  * loss: KL divergence from the teacher's softmax to the student's, both at temperature T
    (scaled by T^2; default T = 1);
  * Adam (0.9, 0.999), lr 0.003, decoupled weight decay 3e-4 on the kernels (scaled by the
    schedule, not the lr), gradient clipping at global norm 1, linear warm-up (1500 steps, at
    most a tenth of the run) then a cosine to zero; batch 512;
  * patience: long schedules (the authors run thousands of epochs on small sets; default 1000).
The teacher is a fine-tuning run (or any classifier weights); it runs in eval mode under no_grad
on the very batch the student trains on, in bf16 where that is native, sharded with the student
under torchrun (DDP; with --fsdp both are sharded, for a teacher that does not fit).

`--data` is a labelled source (its training images are distilled, its labels only score the
student) or a folder of unlabelled images (the teacher labels them). The run directory is an
ordinary one (resume, metrics.jsonl, TensorBoard, final.safetensors with the teacher's class
names), so `evaluate`, `predict` and `export` take it as they take a fine-tuning run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import rundir
from ..atomic import write_json, write_npy
from ..data.dataset import TransformedImages
from ..data.imageset import ImageSet, Splits
from ..data.sources import IMAGE_EXTENSIONS, load_source, report_skipped
from ..data.transforms import eval_transform, upstream_transform
from ..errors import BigTransferError
from ..models import checkpoint, create_model
from ..models.factory import model_source, resolve_arch_name, resolve_weights
from ..train.distributed import DistContext
from ..train.execution import ExecutionOptions
from ..train.loop import evaluate_model, resolve_execution, train
from ..train.memory import forward_flops_per_image
from ..train.recipe import TrainingRecipe
from ..train.run import TrainingRun
from ..train.schedule import CosineSchedule

# The authors' values (big_vision configs/proj/distill): bit_i1k.py and bigsweep_flowers_pet.py.
BATCH = 512
BASE_LR = 0.003
WEIGHT_DECAY = 3e-4
WARMUP_STEPS = 1500
GRAD_CLIP = 1.0
TEMPERATURE = 1.0
MIXUP = 1.0  # Beta(1, 1): every batch mixed
EPOCHS = 1000.0
MIN_CROP_AREA = 0.08  # Inception crop


@dataclass
class DistillOptions(ExecutionOptions):
    data: str
    teacher: str
    student: str = "R50x1"  # an architecture (random init, as the authors) or weights to start from
    out: Path = Path("runs/distill")
    unlabelled: bool = False  # ignore --data's labels (the teacher's are the only ones)
    val_fraction: float | None = None
    split_seed: int = 0
    strict: bool = False
    seed: int = 0
    new_head: bool = False  # a student file with another head gets a new all-zero one
    # the recipe (None: the authors' value)
    batch: int | None = None
    base_lr: float | None = None
    steps: int | None = None
    epochs: float | None = None
    resolution: int | None = None  # default: the teacher's
    temperature: float = TEMPERATURE
    mixup: float = MIXUP
    weight_decay: float = WEIGHT_DECAY
    warmup_steps: int | None = None
    grad_clip: float | None = GRAD_CLIP
    optimizer: str = "adam"
    min_crop_area: float = MIN_CROP_AREA
    cache_teacher: bool = False  # only with fixed views (no augmentation, no MixUp)
    compare: str | None = None  # a fine-tuning run of the same student, shown beside it in the report
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DistillPlan:
    """Everything the run will do, decided before it starts (written to config.json)."""

    train_images: int
    num_classes: int
    batch: int
    steps: int
    schedule: CosineSchedule
    optimizer: str
    weight_decay: float
    grad_clip: float | None
    temperature: float
    mixup: float
    resolution: int
    min_crop_area: float
    fixed_views: bool

    def to_dict(self) -> dict:
        return {**asdict(self), "schedule": self.schedule.to_dict()}

    def training(self, seed: int = 0) -> TrainingRecipe:
        """What the loop needs of this plan, with the run's seed: the authors' optimiser (decoupled
        weight decay on the kernels, clipping), MixUp on every batch."""
        return TrainingRecipe(schedule=self.schedule, batch=self.batch, momentum=0.9, weight_decay=self.weight_decay,
                              decayed="kernels", optimizer=self.optimizer, decoupled_decay=True,
                              grad_clip=self.grad_clip, mixup_alpha=self.mixup, seed=seed,
                              image_side=self.resolution)


def make_plan(opts: DistillOptions, train_images: int, num_classes: int, teacher_resolution: int) -> DistillPlan:
    batch = BATCH if opts.batch is None else opts.batch
    if opts.steps is not None:
        steps = opts.steps
    else:
        steps = max(1, round((EPOCHS if opts.epochs is None else opts.epochs) * train_images / batch))
    warmup = min(WARMUP_STEPS, steps // 10) if opts.warmup_steps is None else opts.warmup_steps
    if warmup > steps:
        raise BigTransferError(f"--warmup-steps ({warmup}) must not exceed the steps ({steps})")
    fixed = opts.cache_teacher
    return DistillPlan(
        train_images=train_images, num_classes=num_classes, batch=batch, steps=steps,
        schedule=CosineSchedule(BASE_LR if opts.base_lr is None else opts.base_lr, warmup, steps),
        optimizer=opts.optimizer, weight_decay=opts.weight_decay, grad_clip=opts.grad_clip,
        temperature=opts.temperature, mixup=0.0 if fixed else opts.mixup,
        resolution=opts.resolution or teacher_resolution, min_crop_area=opts.min_crop_area, fixed_views=fixed)


def describe(p: DistillPlan) -> str:
    s = p.schedule
    return "\n".join([
        f"data           {p.train_images} training images, {p.num_classes} classes (the teacher's)",
        (f"views          {'fixed (resize only; teacher logits cached)' if p.fixed_views else 'Inception crop '}"
         + ("" if p.fixed_views else f"({p.min_crop_area:g}-1 of the area) + flip at {p.resolution} px, ")
         + ("" if p.fixed_views else (f"MixUp Beta({p.mixup:g}, {p.mixup:g})" if p.mixup else "no MixUp"))
         + "; identical for teacher and student"),
        f"loss           KL(teacher || student) at temperature {p.temperature:g}",
        (f"optimizer      {p.optimizer} lr {s.base_lr:g}, decoupled weight decay {p.weight_decay:g} on kernels, "
         f"gradient clip {p.grad_clip if p.grad_clip else 'off'}, batch {p.batch}"),
        (f"schedule       {p.steps} steps ({p.steps * p.batch / p.train_images:.0f} epochs): "
         f"warm-up {s.warmup_steps}, then cosine to 0"),
    ])


def kl_to_teacher(temperature: float):
    """The loss: KL(teacher softmax || student softmax) at temperature T, times T^2, mean over the batch."""
    def loss(student_logits, teacher_logits, perm=None, lam=1.0):
        t = temperature
        teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
        student = F.log_softmax(student_logits.float() / t, dim=1)
        return t * t * F.kl_div(student, teacher, reduction="batchmean", log_target=True)
    return loss


# --------------------------------------------------------------------------- inputs
def check_options(opts: DistillOptions, check_out: bool = True) -> None:
    """Every check that needs no data (a mistyped flag costs a second, not a data scan)."""
    opts.check_execution()
    _teacher_file(opts.teacher)
    student_name, _ = model_source(opts.student, None)
    resolve_arch_name(student_name)
    for flag, value, low in (("batch", opts.batch, 1), ("steps", opts.steps, 1), ("warmup-steps", opts.warmup_steps, 0),
                             ("resolution", opts.resolution, 1)):
        if value is not None and value < low:
            raise BigTransferError(f"--{flag} must be at least {low}, got {value}")
    for flag, value in (("base-lr", opts.base_lr), ("temperature", opts.temperature), ("epochs", opts.epochs)):
        if value is not None and value <= 0:
            raise BigTransferError(f"--{flag} must be more than 0, got {value}")
    if opts.mixup < 0 or opts.weight_decay < 0 or (opts.grad_clip is not None and opts.grad_clip <= 0):
        raise BigTransferError("--mixup and --weight-decay must be >= 0, --grad-clip > 0")
    if opts.optimizer not in ("adam", "sgd"):
        raise BigTransferError(f"--optimizer must be adam or sgd, got {opts.optimizer!r}")
    if not 0 < opts.min_crop_area <= 1:
        raise BigTransferError(f"--min-crop-area must be in (0, 1], got {opts.min_crop_area}")
    if check_out:
        rundir.check_claim(Path(opts.out), "distill")


def _teacher_file(spec: str) -> Path:
    """The teacher's weights file (run directory, file, released name); it must be a classifier."""
    path = resolve_weights(spec)
    summary = checkpoint.summarize(path)
    if summary.num_classes is None:
        raise BigTransferError(f"--teacher {spec}: the file has no head, so it is not a classifier; "
                               "fine-tune it first (bigtransfer finetune) and pass the run")
    return path


def _unlabelled_folder(path: Path) -> bool:
    """A folder with image files of its own: a heap of unlabelled images (not class folders)."""
    return path.is_dir() and any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir())


def distill_data(opts: DistillOptions, teacher_classes: list[str]) -> tuple[Splits, bool]:
    """The images to distill on (and, when labelled, a test split scored in the teacher's classes)."""
    path = Path(opts.data).expanduser()
    if opts.unlabelled or _unlabelled_folder(path):
        from ..data.sources import collect_images

        files = [str(p) for p in collect_images([opts.data])]
        images = ImageSet(teacher_classes, np.zeros(len(files), dtype=np.int64), paths=files, origin=opts.data)
        return Splits(images, None), False
    splits = load_source(opts.data, val_fraction=opts.val_fraction, seed=opts.split_seed, strict=opts.strict,
                         progress=opts.progress, require_test=False, warn=False)
    index = {name: i for i, name in enumerate(teacher_classes)}
    unknown = [c for c in splits.classes if c not in index]
    if unknown:
        raise BigTransferError(f"--data {opts.data}: class {unknown[0]!r} is not one of the teacher's classes; "
                               "pass --unlabelled to distill on its images without their labels")
    mapping = np.array([index[c] for c in splits.classes], dtype=np.int64)
    relabel = lambda s: None if s is None else s.relabeled(teacher_classes, mapping[s.labels])
    return Splits(relabel(splits.train), relabel(splits.test), splits.skipped), True


class _CachedTeacher(torch.utils.data.Dataset):
    """Fixed views: each image once at the eval transform, with the teacher's logits as its target."""

    def __init__(self, images: TransformedImages, logits: torch.Tensor):
        self.images, self.logits = images, logits

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        return self.images[index][0], self.logits[index]


def _teacher_logits(teacher, data: TransformedImages, device, bf16: bool, workers: int, cache: Path) -> torch.Tensor:
    """The teacher's logits for every training image at its fixed view (kept in OUT/cache)."""
    if cache.is_file():
        return torch.from_numpy(np.load(cache, allow_pickle=False))
    loader = torch.utils.data.DataLoader(data, batch_size=64, num_workers=workers)
    rows = []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    with torch.no_grad(), autocast:
        for images, _ in loader:
            rows.append(teacher(images.to(device)).float().cpu())
    logits = torch.cat(rows)
    write_npy(cache, logits.numpy(), what="teacher logits")
    return logits


# --------------------------------------------------------------------------- the run
def run_distill(opts: DistillOptions) -> dict:
    """Distill as `opts` says; returns the summary (also written to OUT/summary.json)."""
    check_options(opts)
    ctx = DistContext.from_env(opts.device)
    with TrainingRun.claim(Path(opts.out), "distill", ctx, restart=opts.restart) as run:
        return _distill(opts, run)


def _distill(opts: DistillOptions, run: TrainingRun) -> dict:
    ctx = run.ctx
    teacher_path = _teacher_file(opts.teacher)
    meta = checkpoint.read_metadata(teacher_path)
    classes = meta.get("class_names") or [str(i) for i in range(meta["num_classes"])]
    splits, labelled = distill_data(opts, classes)
    plan = make_plan(opts, len(splits.train), len(classes), meta.get("resolution") or 224)
    settings = {"plan": plan.to_dict(), "teacher": str(teacher_path), "student": opts.student, "data": opts.data,
                "labelled": labelled, "seed": opts.seed, "split_seed": opts.split_seed, "classes": classes,
                "new_head": opts.new_head}
    if (finished := run.finished(settings)) is not None:
        return finished

    teacher = create_model(checkpoint.summarize(teacher_path).arch.name, weights=teacher_path).to(ctx.device).eval()
    teacher.requires_grad_(False)
    student = _student(opts, len(classes))
    recipe = plan.training(opts.seed)
    one_pass = replace(opts, batch_split=1) if opts.batch_split == "auto" else opts  # "auto" is not sized here
    execution = resolve_execution(one_pass, student, recipe, ctx,
                                  extra_flops=forward_flops_per_image(teacher.config, plan.resolution))
    bf16 = execution.precision == "bf16"
    run.write_config(**run.execution_facts(execution.precision, opts))
    if ctx.is_main:
        report_skipped(run.dir, splits.skipped, opts.data)
        if opts.progress:
            print(describe(plan), flush=True)

    test = TransformedImages(splits.test, eval_transform(plan.resolution)) if splits.test is not None else None
    if plan.fixed_views:
        fixed = TransformedImages(splits.train, eval_transform(plan.resolution), strict=opts.strict)
        logits = _teacher_logits(teacher, fixed, ctx.device, bf16, opts.workers, run.dir / "cache" / "teacher_logits.npy")
        train_data, targets = _CachedTeacher(fixed, logits), None
    else:
        # the Inception crop + flip of the upstream recipe, seen identically by teacher and student
        train_data = TransformedImages(splits.train, upstream_transform(plan.resolution, plan.min_crop_area),
                                       strict=opts.strict)
        targets = _teacher_on(teacher, ctx, bf16, opts.fsdp)
    eval_batch = 2 * (plan.batch // ctx.world_size)
    final = run.final_weights(student, class_names=classes, resolution=plan.resolution, provenance={
        "distilled_from": str(teacher_path), "student": opts.student, "data": opts.data, "steps": plan.steps})
    metrics = train(student, train_data, test, recipe, execution, run.dir, ctx, run.fingerprint,
                    loss_fn=kl_to_teacher(plan.temperature), targets=targets, final=final, eval_batch=eval_batch)
    teacher_metrics = (evaluate_model(teacher, test, ctx, batch=eval_batch, workers=opts.workers,
                                      bf16=bf16).result() if test is not None else {})
    summary = {"final": metrics, "teacher": teacher_metrics, "classes": classes, "train_images": len(splits.train),
               "test_images": len(splits.test) if splits.test is not None else 0, "steps": plan.steps,
               "labelled": labelled, "model": str(run.final_path)}
    return run.finish(summary, then=lambda: _write_report(run.dir, opts, teacher_path))


def _write_report(out: Path, opts: DistillOptions, teacher_path: Path) -> None:
    """protocol.json and the report of the student beside its teacher (and a directly fine-tuned student)."""
    from ..report.protocols.distill import collect_distill, write_distill_report

    write_json(out / "protocol.json", {"protocol": "distill", "teacher": str(teacher_path), "student": opts.student,
                                       "data": opts.data, "compare": opts.compare})
    write_distill_report(out, collect_distill(out))


def _student(opts: DistillOptions, num_classes: int):
    """The student: an architecture (random init, the authors' choice) or weights to start from."""
    torch.manual_seed(opts.seed)
    name, weights = model_source(opts.student, None)
    if weights is None and not Path(opts.student).exists():
        from ..models import zoo

        entry = zoo.lookup(name)
        weights = str(zoo.require_cached(entry)) if entry else None
    if weights is None:
        return create_model(name, num_classes=num_classes)
    head = checkpoint.summarize(Path(weights)).num_classes
    if head is not None and head != num_classes and not opts.new_head:
        raise BigTransferError(f"--student {opts.student}: its head has {head} classes, the teacher's {num_classes}; "
                               "pass --new-head for a new all-zero head, or an architecture name")
    model = create_model(name, num_classes=num_classes, weights=weights)
    if head != num_classes:
        model.reset_head(num_classes, zero_init=True)
    return model


def _teacher_on(teacher, ctx: DistContext, bf16: bool, fsdp: bool):
    """targets(images): the teacher's logits for the batch the student is about to see."""
    if fsdp:
        from ..train.distributed import wrap_for_training

        teacher = wrap_for_training(teacher, ctx, fsdp=True)
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16) if bf16 else None

    @torch.no_grad()
    def targets(images: torch.Tensor) -> torch.Tensor:
        if autocast is None:
            return teacher(images).float()
        with autocast:
            return teacher(images).float()

    return targets
