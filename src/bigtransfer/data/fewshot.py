"""Balanced few-shot subsets: K examples of every class, reproducible from a seed."""

from __future__ import annotations

import numpy as np

from ..errors import BigTransferError
from ..safe_text import quoted


def sample_per_class(labels: np.ndarray, k: int, seed: int, classes: list[str] | None = None) -> np.ndarray:
    """Indices of `k` randomly drawn examples of every class (sorted); error if a class has fewer."""
    if k < 1:
        raise BigTransferError(f"--examples-per-class must be at least 1, got {k}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(int(labels.max()) + 1 if classes is None else len(classes)):
        members = np.flatnonzero(labels == c)
        if len(members) < k:
            name = classes[c] if classes is not None else c
            raise BigTransferError(
                f"--examples-per-class {k}: class {quoted(name)} has only {len(members)} training image(s)"
            )
        chosen.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(chosen))
