"""BiT-HyperRule: every fine-tuning hyper-parameter as a pure function of the task.

From the paper (section 3.3) and the authors' release:
  * SGD, lr 0.003, momentum 0.9, batch 512, no weight decay, no dropout, zero-initialised head.
  * Resolution from the images' size: area < 96x96 px -> resize 160, random crop 128;
    larger -> resize 448, crop 384 (R152x4: 512 -> 480). Test time: resize to the crop size.
  * Schedule from the training-set size: small (< 20k) 500 steps, medium (< 500k) 10k,
    large 20k. MixUp (alpha 0.1) for medium and large tasks only.

Schedules. The release warms up linearly and then decays /10 at fixed steps:
  small [100, 200, 300, 400, 500], medium [500, 3000, 6000, 9000, 10000],
  large [500, 6000, 12000, 18000, 20000]  ([warm-up end, decay, decay, decay, end]).
The paper's text says decays at 30%, 60% and 90% of the steps, with no warm-up. The release
reproduces the paper's numbers, so it is the default here; `schedule="paper"` gives the text's.
Resolution. The release resizes every large-image task to 512/480, for every architecture;
the paper says 448/384 and keeps 512/480 for R152x4. We follow the paper here (pass
`resolution=(512, 480)` for the release's behaviour).
Head. Fine-tuning starts from an all-zero head (weights and bias), whatever head the weights
file has; `keep_head=True` keeps the file's head instead (continuing on the same label set).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import BigTransferError
from ..train.recipe import TrainingRecipe
from ..train.schedule import LRSchedule

BASE_LR = 0.003
BATCH = 512
MOMENTUM = 0.9
WEIGHT_DECAY = 0.0
MIXUP_ALPHA = 0.1
SMALL_TASK = 20_000  # examples: below this a task is "small"
LARGE_TASK = 500_000  # examples: at or above this a task is "large"
SMALL_IMAGE_AREA = 96 * 96  # px: below this, images are "small"
RELEASE_BOUNDARIES = {
    "small": (100, 200, 300, 400, 500),
    "medium": (500, 3000, 6000, 9000, 10000),
    "large": (500, 6000, 12000, 18000, 20000),
}
SCHEDULES = ("release", "paper")


def tier(dataset_size: int) -> str:
    """'small' (< 20k examples), 'medium' (< 500k) or 'large'."""
    if dataset_size < 1:
        raise BigTransferError(f"a training set needs at least one example, got {dataset_size}")
    if dataset_size < SMALL_TASK:
        return "small"
    return "medium" if dataset_size < LARGE_TASK else "large"


def resolution(image_area: float, arch_name: str = "R50x1") -> tuple[int, int]:
    """(resize, crop) in pixels from the images' typical area (e.g. the median of a sample)."""
    if image_area < SMALL_IMAGE_AREA:
        return 160, 128
    return (512, 480) if arch_name.startswith("R152x4") else (448, 384)


def mixup_alpha(dataset_size: int) -> float:
    return 0.0 if tier(dataset_size) == "small" else MIXUP_ALPHA


def schedule(dataset_size: int, *, steps: int | None = None, base_lr: float = BASE_LR,
             variant: str = "release") -> LRSchedule:
    """The lr schedule; with `steps` the tier's boundaries are scaled to that length."""
    if variant not in SCHEDULES:
        raise BigTransferError(f"unknown schedule {variant!r}: choose one of {', '.join(SCHEDULES)}")
    default = RELEASE_BOUNDARIES[tier(dataset_size)]
    total = default[-1] if steps is None else steps
    if total < 1:
        raise BigTransferError(f"--steps must be at least 1, got {total}")
    if variant == "paper":
        warmup, decays = 0, tuple(round(total * f) for f in (0.3, 0.6, 0.9))
    else:
        scaled = [round(b * total / default[-1]) for b in default[:-1]]
        warmup, decays = scaled[0], tuple(scaled[1:])
    return LRSchedule(base_lr=base_lr, warmup_steps=warmup, decay_steps=decays, total_steps=total)


@dataclass(frozen=True)
class Plan:
    """Everything fine-tuning needs, decided before the first step (written to config.json)."""

    dataset_size: int
    num_classes: int
    image_area: float
    arch: str
    tier: str
    resize: int
    crop: int
    batch: int
    schedule: LRSchedule
    momentum: float
    weight_decay: float
    mixup_alpha: float
    flip: bool
    random_crop: bool
    schedule_variant: str = "release"
    overrides: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return self.schedule.total_steps

    @property
    def train_side(self) -> int:
        """The square side training images are resized to before any crop."""
        return self.resize if self.random_crop else self.crop

    def lr(self, step: int) -> float:
        return self.schedule.at(step)

    def training(self, seed: int = 0, *, prelogit_dropout: float = 0.0, l2_to_init: float = 0.0) -> TrainingRecipe:
        """What the loop needs of this plan, with the run's seed and Supp. A's regularisers (the rule's are off)."""
        return TrainingRecipe(schedule=self.schedule, batch=self.batch, momentum=self.momentum,
                              weight_decay=self.weight_decay, mixup_alpha=self.mixup_alpha, seed=seed,
                              prelogit_dropout=prelogit_dropout, l2_to_init=l2_to_init, image_side=self.crop)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schedule"] = self.schedule.to_dict()
        d["steps"] = self.steps  # derived; written for readers of config.json
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        fields = {k: v for k, v in d.items() if k != "steps"}
        return cls(**{**fields, "schedule": LRSchedule.from_dict(d["schedule"])})


def plan(
    dataset_size: int,
    image_area: float,
    num_classes: int,
    arch: str = "R50x1",
    *,
    batch: int | None = None,
    base_lr: float | None = None,
    steps: int | None = None,
    resolution_override: tuple[int, int] | None = None,
    mixup: float | None = None,
    flip: bool = True,
    random_crop: bool = True,
    schedule_variant: str = "release",
    keep_head: bool = False,
) -> Plan:
    """The BiT-HyperRule plan; every keyword left at None takes the rule's value.

    Values that differ from the rule are recorded in `Plan.overrides`.
    """
    overrides = {name: value for name, value in (
        ("batch", batch), ("base_lr", base_lr), ("steps", steps), ("resolution", resolution_override),
        ("mixup", mixup),
    ) if value is not None}
    if not flip:
        overrides["flip"] = False
    if not random_crop:
        overrides["random_crop"] = False
    if schedule_variant != "release":
        overrides["schedule"] = schedule_variant
    if keep_head:
        overrides["keep_head"] = True
    resize, crop = resolution_override or resolution(image_area, arch)
    if not 0 < crop <= resize:
        raise BigTransferError(f"--resolution: crop must be positive and at most the resize, got {resize}/{crop}")
    batch = BATCH if batch is None else batch
    if batch < 1:
        raise BigTransferError(f"--batch must be at least 1, got {batch}")
    alpha = mixup_alpha(dataset_size) if mixup is None else mixup
    if alpha < 0:
        raise BigTransferError(f"--mixup must be >= 0 (0 disables it), got {alpha}")
    if num_classes < 2:
        raise BigTransferError(f"classification needs at least 2 classes, got {num_classes}")
    return Plan(
        dataset_size=dataset_size, num_classes=num_classes, image_area=float(image_area), arch=arch,
        tier=tier(dataset_size), resize=resize, crop=crop, batch=batch,
        schedule=schedule(dataset_size, steps=steps, base_lr=BASE_LR if base_lr is None else base_lr,
                          variant=schedule_variant),
        momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, mixup_alpha=alpha, flip=flip, random_crop=random_crop,
        schedule_variant=schedule_variant, overrides=overrides,
    )


def describe(p: Plan) -> str:
    """A human-readable account of the plan, one fact per line."""
    side = p.image_area**0.5
    sched = p.schedule
    lines = [
        f"dataset        {p.dataset_size} training examples, {p.num_classes} classes -> {p.tier} task",
        (f"images         median area {p.image_area:.0f} px (~{side:.0f}x{side:.0f}) -> "
         f"{'small' if p.image_area < SMALL_IMAGE_AREA else 'large'} images"),
        (f"resolution     train: resize {p.resize}x{p.resize}"
         + (f", random crop {p.crop}x{p.crop}" if p.random_crop else f" -> {p.crop}x{p.crop}, no crop")
         + f"; test: resize {p.crop}x{p.crop}"),
        (f"augmentation   {'random horizontal flip' if p.flip else 'no flip'}"
         f"{', random crop' if p.random_crop else ', no crop'}"),
        (f"optimizer      SGD lr {sched.base_lr:g}, momentum {p.momentum:g}, weight decay {p.weight_decay:g}, "
         f"batch {p.batch}"),
        (f"schedule       {p.steps} steps ({p.schedule_variant}): warm-up to step {sched.warmup_steps}, "
         f"lr /10 after steps {', '.join(map(str, sched.decay_steps))}"),
        f"mixup          {'alpha ' + format(p.mixup_alpha, 'g') if p.mixup_alpha > 0 else 'off'}",
        (f"head           {p.num_classes} classes, kept from the weights file (--keep-head)"
         if p.overrides.get("keep_head") else
         f"head           {p.num_classes} classes, zero-initialised: a new all-zero head (weights and bias), "
         "whatever the file's head"),
    ]
    if p.image_area >= SMALL_IMAGE_AREA and "resolution" not in p.overrides and p.resize != 512:
        lines.append("               (the paper's 448/384; the authors' release uses 512/480 for every "
                     "architecture: --resolution 512/480)")
    if p.overrides:
        lines.append("overrides      " + ", ".join(f"{k}={v}" for k, v in sorted(p.overrides.items())))
    return "\n".join(lines)
