"""MixUp as BiT uses it: one mixing ratio per batch, partners from a permutation of the batch."""

from __future__ import annotations

import numpy as np
import torch


def mixup_ratio(alpha: float, seed: int, step: int) -> float:
    """lambda ~ Beta(alpha, alpha) for optimisation step `step` (1.0, i.e. no mixing, if alpha is 0)."""
    if alpha <= 0:
        return 1.0
    return float(np.random.default_rng([seed, step, 0x6D6978]).beta(alpha, alpha))


def mix(images: torch.Tensor, lam: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(lam * x + (1 - lam) * x[perm], perm) for a random permutation `perm` of the batch."""
    perm = torch.randperm(images.shape[0], generator=generator).to(images.device)
    return lam * images + (1.0 - lam) * images[perm], perm
