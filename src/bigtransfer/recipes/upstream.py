"""BiT's upstream (pre-training) recipe as plain data, computed before training starts.

Paper section 3.3 and the lecture summary:
  * SGD, momentum 0.9, weight decay 1e-4, lr 0.03 x global_batch / 256 (0.48 at batch 4096);
  * linear warm-up over 5000 steps; /10 decays at epochs 30, 60, 80 of 90 (BiT-S, BiT-M) or
    10, 23, 30, 37 of 40 (BiT-L);
  * Inception-style random-resized crop and horizontal flip at 224 px; no MixUp (flips can be
    switched off for data whose classes are not mirror-symmetric, as downstream in Supp. F);
  * the loss is part of the recipe, whatever the data's layout: BiT-S (ILSVRC-2012) uses softmax
    cross-entropy; BiT-M and BiT-L (ImageNet-21k, JFT: multi-label) a sigmoid cross-entropy, with
    the head's bias initialised to -10 as in the authors' later public BiT-on-ImageNet-21k config
    (single-label data then trains on one-hot targets);
  * weight decay on the convolution and head kernels only, as the authors' successor codebase
    does (big_vision's default `.*/kernel$`): decaying GroupNorm's scales and shifts, or the
    sigmoid head's -10 bias, would pull them towards 0 for no benefit.
Shorter runs (other --epochs or a small dataset) keep the decays at the same fractions of
training, and scale the warm-up down in proportion: 5000 steps belong to the full BiT-S run,
90 epochs of ILSVRC-2012 at batch 4096 (28,170 steps). Every value can be overridden.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..errors import BigTransferError
from ..train.recipe import TrainingRecipe
from ..train.schedule import LRSchedule

RECIPES = {  # name -> (epochs, decay epochs)
    "bit-s": (90, (30, 60, 80)),
    "bit-m": (90, (30, 60, 80)),
    "bit-l": (40, (10, 23, 30, 37)),
}
BASE_LR = 0.03  # at batch 256, scaled linearly with the batch
REFERENCE_BATCH = 256
GLOBAL_BATCH = 4096
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
WARMUP_STEPS = 5000
FULL_SCALE_STEPS = 90 * math.ceil(1_281_167 / GLOBAL_BATCH)  # BiT-S: ILSVRC-2012, 90 epochs
RESOLUTION = 224
SIGMOID_HEAD_BIAS = -10.0
LOSSES = ("softmax", "sigmoid")
RECIPE_LOSS = {"bit-s": "softmax", "bit-m": "sigmoid", "bit-l": "sigmoid"}
DECAYED = ("kernels", "all")  # which parameters weight decay applies to


@dataclass(frozen=True)
class UpstreamPlan:
    dataset_size: int
    num_classes: int
    multilabel: bool
    recipe: str
    batch: int
    epochs: float
    decay_epochs: tuple[float, ...]
    steps_per_epoch: int
    schedule: LRSchedule
    momentum: float
    weight_decay: float
    resolution: int
    head_bias_init: float
    overrides: dict = field(default_factory=dict)
    loss: str = "softmax"
    decayed: str = "kernels"
    flip: bool = True  # random horizontal flips; off for data whose classes change under a mirror

    @property
    def steps(self) -> int:
        return self.schedule.total_steps

    def training(self, seed: int = 0) -> TrainingRecipe:
        """What the loop needs of this plan, with the run's seed."""
        return TrainingRecipe(schedule=self.schedule, batch=self.batch, momentum=self.momentum,
                              weight_decay=self.weight_decay, decayed=self.decayed, seed=seed,
                              multilabel=self.multilabel, image_side=self.resolution)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schedule"] = self.schedule.to_dict()
        d["steps"] = self.steps
        d["decay_epochs"] = list(self.decay_epochs)
        if self.flip:  # the recipe's: left out, so runs from before the option keep their fingerprints
            del d["flip"]
        return d


def upstream_plan(
    dataset_size: int,
    num_classes: int,
    *,
    multilabel: bool = False,
    recipe: str = "bit-m",
    batch: int | None = None,
    base_lr: float | None = None,
    epochs: float | None = None,
    warmup_steps: int | None = None,
    weight_decay: float | None = None,
    resolution: int | None = None,
    loss: str | None = None,
    decayed: str = "kernels",
    flip: bool = True,
) -> UpstreamPlan:
    """The upstream plan for a dataset; keywords left at None take the recipe's value."""
    if recipe not in RECIPES:
        raise BigTransferError(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    if loss is not None and loss not in LOSSES:
        raise BigTransferError(f"--loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if loss == "softmax" and multilabel:
        raise BigTransferError("--loss softmax needs one label per image; this data has several (use sigmoid)")
    if decayed not in DECAYED:
        raise BigTransferError(f"--decay must be one of {', '.join(DECAYED)}, got {decayed!r}")
    for flag, value, low in (("base-lr", base_lr, 0.0), ("weight-decay", weight_decay, 0.0),
                             ("warmup-steps", warmup_steps, 0), ("resolution", resolution, 1)):
        if value is not None and (value <= low if flag == "base-lr" else value < low):
            raise BigTransferError(f"--{flag} must be {'more than' if flag == 'base-lr' else 'at least'} {low}, "
                                   f"got {value}")
    if dataset_size < 1 or num_classes < 2:
        raise BigTransferError(f"pre-training needs images of at least 2 classes (got {dataset_size}, {num_classes})")
    overrides = {k: v for k, v in (("batch", batch), ("base_lr", base_lr), ("epochs", epochs),
                                   ("warmup_steps", warmup_steps), ("weight_decay", weight_decay),
                                   ("resolution", resolution), ("loss", loss)) if v is not None}
    if decayed != "kernels":
        overrides["decayed"] = decayed
    if not flip:
        overrides["flip"] = False
    loss = loss or RECIPE_LOSS[recipe]
    batch = GLOBAL_BATCH if batch is None else batch
    if batch < 1:
        raise BigTransferError(f"--batch must be at least 1, got {batch}")
    recipe_epochs, recipe_decays = RECIPES[recipe]
    epochs = float(recipe_epochs if epochs is None else epochs)
    if epochs <= 0:
        raise BigTransferError(f"--epochs must be positive, got {epochs}")
    decay_epochs = tuple(d * epochs / recipe_epochs for d in recipe_decays)
    steps_per_epoch = math.ceil(dataset_size / batch)
    total = max(1, round(epochs * steps_per_epoch))
    decays = tuple(round(d * steps_per_epoch) for d in decay_epochs)
    if warmup_steps is None:
        warmup_steps = round(WARMUP_STEPS * min(1.0, total / FULL_SCALE_STEPS))
    warmup_steps = min(warmup_steps, decays[0]) if decays else warmup_steps
    lr = (BASE_LR if base_lr is None else base_lr) * batch / REFERENCE_BATCH
    return UpstreamPlan(
        dataset_size=dataset_size, num_classes=num_classes, multilabel=multilabel, recipe=recipe, batch=batch,
        epochs=epochs, decay_epochs=decay_epochs, steps_per_epoch=steps_per_epoch,
        schedule=LRSchedule(base_lr=lr, warmup_steps=warmup_steps, decay_steps=decays, total_steps=total),
        momentum=MOMENTUM, weight_decay=WEIGHT_DECAY if weight_decay is None else weight_decay,
        resolution=RESOLUTION if resolution is None else resolution,
        head_bias_init=SIGMOID_HEAD_BIAS if loss == "sigmoid" else 0.0, overrides=overrides, loss=loss,
        decayed=decayed, flip=flip,
    )


def describe(p: UpstreamPlan) -> str:
    s = p.schedule
    loss = ("sigmoid cross-entropy, head bias -10" + ("" if p.multilabel else " (one-hot targets)")
            if p.loss == "sigmoid" else "softmax cross-entropy")
    decayed = ("convolution and head kernels only (not GroupNorm scales/shifts or biases)"
               if p.decayed == "kernels" else "every parameter")
    lines = [
        (f"dataset        {p.dataset_size} images, {p.num_classes} classes"
         f" ({'multi-label' if p.multilabel else 'single-label'})"),
        f"recipe         {p.recipe}: {p.epochs:g} epochs x {p.steps_per_epoch} steps = {p.steps} steps, batch {p.batch}",
        f"loss           {loss}" + ("" if "loss" in p.overrides else f" (the {p.recipe} recipe's; --loss to change)"),
        (f"optimizer      SGD lr {s.base_lr:g} ({s.base_lr * 256 / p.batch:g} x batch/256), momentum {p.momentum:g}, "
         f"weight decay {p.weight_decay:g} on {decayed}"),
        (f"schedule       linear warm-up {s.warmup_steps} steps; lr /10 at epochs "
         f"{', '.join(f'{e:g}' for e in p.decay_epochs)} (steps {', '.join(map(str, s.decay_steps))})"),
        (f"augmentation   random-resized crop{' + horizontal flip' if p.flip else ', no flip'} at {p.resolution} px;"
         " no MixUp"),
    ]
    if p.overrides:
        lines.append("overrides      " + ", ".join(f"{k}={v}" for k, v in sorted(p.overrides.items())))
    return "\n".join(lines)
