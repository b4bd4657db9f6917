"""Training losses, with the step's MixUp applied to the targets (lam = 1: no mixing)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def softmax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, perm: torch.Tensor | None = None,
                          lam: float = 1.0) -> torch.Tensor:
    """Single-label: lam * CE(labels) + (1 - lam) * CE(labels[perm]), mean over the batch."""
    loss = F.cross_entropy(logits, labels)
    if perm is None or lam >= 1.0:
        return loss
    return lam * loss + (1.0 - lam) * F.cross_entropy(logits, labels[perm])


def sigmoid_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, perm: torch.Tensor | None = None,
                          lam: float = 1.0) -> torch.Tensor:
    """Binary cross-entropy of every class, summed over classes, mean over the batch.

    `targets` is multi-hot [N, K], or class indices [N] (single-label data under a sigmoid recipe:
    one-hot). Summing over classes (not averaging) follows the authors' sigmoid cross-entropy, so
    the loss does not shrink with the number of classes.
    """
    if targets.ndim == 1:
        targets = F.one_hot(targets.long(), logits.shape[1])
    targets = targets.to(logits.dtype)
    if perm is not None and lam < 1.0:
        targets = lam * targets + (1.0 - lam) * targets[perm]
    per_class = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return per_class.sum(dim=1).mean()
