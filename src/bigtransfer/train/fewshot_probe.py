"""Few-shot linear probes on frozen pre-logits, solved in closed form (ridge regression).

Used while pre-training to watch how well the representation transfers: draw K images per class
of a held-out downstream set, fit a ridge regression from their L2-normalised features to
one-hot targets, and classify the downstream test images with it. No gradient steps, so it costs
two feature passes and one small linear solve.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.fewshot import sample_per_class

DEFAULT_SHOTS = (1, 5, 10)
DEFAULT_SEEDS = (0, 1, 2)  # draws per shot count a pre-training run's monitor averages
DEFAULT_L2 = 1e-2


def ridge_classifier(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     l2: float = DEFAULT_L2) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [D, K], b [K]) minimising |X W + b - Y|^2 + l2 |W|^2 for one-hot Y (features centred)."""
    x = features.double()
    mean = x.mean(0)
    xc = x - mean
    y = torch.nn.functional.one_hot(labels, num_classes).double()
    y_mean = y.mean(0)
    n, d = xc.shape
    if n < d:  # dual form: an n x n system when there are fewer examples than features
        alpha = torch.linalg.solve(xc @ xc.T + l2 * torch.eye(n, dtype=x.dtype), y - y_mean)
        w = xc.T @ alpha
    else:
        w = torch.linalg.solve(xc.T @ xc + l2 * torch.eye(d, dtype=x.dtype), xc.T @ (y - y_mean))
    return w, y_mean - mean @ w


def _normalise(features: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(features.double(), dim=1)


def fewshot_accuracies(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                       test_labels: torch.Tensor, num_classes: int, shots=DEFAULT_SHOTS, seeds=DEFAULT_SEEDS,
                       l2: float = DEFAULT_L2) -> dict[str, list[float]]:
    """Test accuracy of every draw: {"Kshot": [one per seed]}. Seed s draws what fine-tuning with
    `--examples-per-class K --seed s` trains on, so the two compare draw by draw."""
    train_x, test_x = _normalise(train_features), _normalise(test_features)
    out = {}
    for k in shots:
        accuracies = []
        for seed in seeds:
            idx = torch.from_numpy(sample_per_class(train_labels.numpy(), k, seed))
            w, b = ridge_classifier(train_x[idx], train_labels[idx], num_classes, l2)
            predicted = (test_x @ w + b).argmax(1)
            accuracies.append(float((predicted == test_labels).double().mean()))
        out[f"{k}shot"] = accuracies
    return out


def mean_over_draws(per_draw: dict[str, list[float]]) -> dict[str, float]:
    """{"Kshot": mean accuracy over the draws}, what a pre-training run logs."""
    return {key: float(np.mean(accuracies)) for key, accuracies in per_draw.items()}
