"""Learning-rate schedules as plain data: linear warm-up, then a staircase of /10 decays, or a cosine.

Both of BiT's recipes have the staircase: the HyperRule downstream (warm-up then decays at fixed
steps) and the upstream recipe (5000 warm-up steps, decays at epochs 30/60/80). Distillation
(the authors' function-matching recipe) warms up and then decays along a cosine.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LRSchedule:
    """lr(step): ramps linearly from 0 to `base_lr` over `warmup_steps`, then is divided by
    `1 / decay_factor` once for every decay boundary strictly below `step`.

    "Strictly below" follows the authors' release: at the boundary step itself the old rate
    still holds, the decay takes effect on the step after it.
    """

    base_lr: float
    warmup_steps: int
    decay_steps: tuple[int, ...]
    total_steps: int
    decay_factor: float = 0.1

    def __post_init__(self):
        points = (self.warmup_steps, *self.decay_steps, self.total_steps)
        if any(b > a for a, b in zip(points[1:], points)) or self.total_steps < 1:
            raise ValueError(f"schedule boundaries must be non-decreasing and end >= 1: {points}")

    def at(self, step: int) -> float:
        """The learning rate used for optimisation step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.base_lr * step / self.warmup_steps
        decays = sum(1 for boundary in self.decay_steps if boundary < step)
        return self.base_lr * self.decay_factor**decays

    @property
    def boundaries(self) -> tuple[int, ...]:
        """[warm-up end, decay, ..., end], the release's `supports` list."""
        return (self.warmup_steps, *self.decay_steps, self.total_steps)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["decay_steps"] = list(self.decay_steps)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LRSchedule:
        return cls(**{**d, "decay_steps": tuple(d["decay_steps"])})


@dataclass(frozen=True)
class CosineSchedule:
    """lr(step): ramps linearly from 0 to `base_lr` over `warmup_steps`, then follows half a cosine
    down to 0 at `total_steps` (big_vision's `decay_type='cosine'`, the distillation recipe's)."""

    base_lr: float
    warmup_steps: int
    total_steps: int
    kind: str = "cosine"

    def __post_init__(self):
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"need 0 <= warmup_steps <= total_steps >= 1, got {self.warmup_steps}, {self.total_steps}")

    def at(self, step: int) -> float:
        """The learning rate used for optimisation step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.base_lr * step / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CosineSchedule:
        return cls(**d)
