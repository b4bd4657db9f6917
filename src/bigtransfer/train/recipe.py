"""What a plan decides about training, as plain data: the loop's half that defines the result.

The other half, how the run executes (batch split, cadences, workers, precision, compile, FSDP,
device, progress), is `execution.ExecutionOptions`; the loop takes one of each. A plan (the
HyperRule's, the upstream recipe's, distillation's) makes its `TrainingRecipe` with `training()`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .schedule import CosineSchedule, LRSchedule


@dataclass(frozen=True)
class TrainingRecipe:
    schedule: LRSchedule | CosineSchedule
    batch: int  # the global batch of one optimisation step
    momentum: float = 0.9
    weight_decay: float = 0.0
    decayed: str = "all"  # which parameters weight decay applies to: "all", or "kernels" (see loop.decay_groups)
    mixup_alpha: float = 0.0
    seed: int = 0  # the batches, MixUp ratios and mixing permutations are functions of (seed, step)
    # Supp. A's two extra regularisers (both off in BiT-HyperRule):
    prelogit_dropout: float = 0.0  # dropout on the pre-logits during training
    l2_to_init: float = 0.0  # weight decay towards the initial (pre-trained) weights: grad += l2 * (w - w0)
    # The distillation recipe's optimiser (BiT's own recipes use SGD with momentum, no clipping):
    optimizer: str = "sgd"  # sgd | adam
    decoupled_decay: bool = False  # weight decay w -= schedule(t) * wd * w, outside the gradient (big_vision's)
    grad_clip: float | None = None  # clip the global gradient norm to this
    multilabel: bool = False  # evaluation reports precision@1 instead of top-1/top-5
    image_side: int = 0  # side of the training crops, for the memory layout (0: unknown, channels_last)

    @property
    def steps(self) -> int:
        return self.schedule.total_steps
