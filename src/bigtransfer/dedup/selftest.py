"""The self-test: how much does dedup find on *your* data?

A seeded sample of the downstream images is copied with every edit of edits.py (in memory only:
nothing is written anywhere), and the copies are searched and verified exactly like upstream
images, each one as if it were the only copy among the real upstream images: a copy is a
candidate of a test image when it would have been among that image's nearest upstream
neighbours (it beats the k-th real one), so the copies neither crowd each other out nor change
what the real search finds. What the run finds among them gives, per edit, the recall (copies
paired with the image they were made from) and the false pairs (copies paired with another test
image). Then the copies are dropped: they never reach pairs.csv or upstream_filtered.csv.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .edits import EDITS


@dataclass
class Planted:
    """The planted copies: which test image each was made from, with which edit, and its bytes."""

    source: np.ndarray  # int64 [M]: the test image (global downstream index) it copies
    edit: list[str]  # [M]
    blobs: list[bytes]  # [M]: the copy, encoded as a file would be

    def __len__(self) -> int:
        return len(self.source)


def plant(load: Callable[[int], Image.Image], eligible: np.ndarray, sample: int, seed: int,
          edits: tuple[str, ...] = tuple(EDITS)) -> Planted:
    """Copies of `sample` test images drawn (seeded) from `eligible`, one per edit; `load(i)`
    gives test image i as RGB."""
    rng = np.random.default_rng([seed, 15])
    chosen = np.sort(rng.choice(eligible, size=min(sample, len(eligible)), replace=False))
    source, names, blobs = [], [], []
    for i in chosen.tolist():
        image = load(i)
        for e, name in enumerate(edits):
            blobs.append(EDITS[name](image, np.random.default_rng([seed, i, e])))
            source.append(i)
            names.append(name)
    return Planted(np.asarray(source, np.int64), names, blobs)


def score(planted: Planted, test: np.ndarray, copy: np.ndarray) -> dict:
    """Per edit (and over all): copies planted, found with their own test image (recall), and
    false pairs with another test image, from the pairs (test[k], planted copy copy[k]) dedup found."""
    hits = np.zeros(len(planted), bool)
    false = np.zeros(len(planted), np.int64)
    for t, c in zip(test.tolist(), copy.tolist()):
        if t == planted.source[c]:
            hits[c] = True
        else:
            false[c] += 1
    edits = np.asarray(planted.edit)

    def summary(mask: np.ndarray) -> dict:
        n = int(mask.sum())
        return {"planted": n, "found": int(hits[mask].sum()), "recall": round(float(hits[mask].mean()), 4) if n else None,
                "false_pairs": int(false[mask].sum())}

    per_edit = {name: summary(edits == name) for name in dict.fromkeys(planted.edit)}
    return {"test_images": len(set(planted.source.tolist())), "per_edit": per_edit,
            "overall": summary(np.ones(len(planted), bool)),
            "missed": [{"test": int(planted.source[c]), "edit": planted.edit[c], "copy": int(c)}
                       for c in np.flatnonzero(~hits)]}
