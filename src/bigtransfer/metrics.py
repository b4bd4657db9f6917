"""Classification metrics accumulated over batches: loss, top-1, top-5, confusion matrix."""

from __future__ import annotations

import numpy as np
import torch


class ClassificationMeter:
    """Sums over batches; `result()` gives means. `confusion[true, predicted]` counts examples."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self.loss_sum = 0.0
        self.top5_hits = 0
        self.count = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits, labels = logits.detach().float().cpu(), labels.detach().cpu()
        self.loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        k = min(5, self.num_classes)
        self.top5_hits += int((logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum())
        predicted = logits.argmax(dim=1)
        self.confusion += torch.bincount(labels * self.num_classes + predicted,
                                         minlength=self.num_classes**2).reshape(self.num_classes, -1)
        self.count += len(labels)

    def state(self) -> torch.Tensor:
        """Everything as one float64 vector, so processes can add theirs up with one all_reduce."""
        return torch.cat([torch.tensor([self.loss_sum, self.top5_hits, self.count], dtype=torch.float64),
                          self.confusion.flatten().double()])

    def load_state(self, state: torch.Tensor) -> None:
        self.loss_sum, self.top5_hits, self.count = float(state[0]), int(state[1]), int(state[2])
        self.confusion = state[3:].round().long().reshape(self.num_classes, self.num_classes)

    def result(self) -> dict:
        n = max(self.count, 1)
        return {
            "top1": float(self.confusion.diag().sum()) / n,
            "top5": self.top5_hits / n,
            "loss": self.loss_sum / n,
            "examples": self.count,
        }

    def per_class_accuracy(self) -> np.ndarray:
        totals = self.confusion.sum(dim=1).double()
        return (self.confusion.diag().double() / totals.clamp(min=1)).numpy()


class MultiLabelMeter:
    """Multi-label evaluation: precision@1 (is the top-scoring class one of the image's labels?)
    and the summed-over-classes sigmoid cross-entropy."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.loss_sum = 0.0
        self.hits = 0
        self.count = 0

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        logits, targets = logits.detach().float().cpu(), targets.detach().float().cpu()
        self.loss_sum += float(torch.nn.functional.binary_cross_entropy_with_logits(
            logits, targets, reduction="none").sum())
        top = logits.argmax(dim=1)
        self.hits += int(targets[torch.arange(len(top)), top].sum())
        self.count += len(top)

    def state(self) -> torch.Tensor:
        return torch.tensor([self.loss_sum, self.hits, self.count], dtype=torch.float64)

    def load_state(self, state: torch.Tensor) -> None:
        self.loss_sum, self.hits, self.count = float(state[0]), int(state[1]), int(state[2])

    def result(self) -> dict:
        n = max(self.count, 1)
        return {"precision_at_1": self.hits / n, "loss": self.loss_sum / n, "examples": self.count}
