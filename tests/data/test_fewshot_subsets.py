"""Balanced few-shot subsets (data/fewshot.py)."""

from __future__ import annotations

import numpy as np
import pytest

from bigtransfer.data.fewshot import sample_per_class
from bigtransfer.errors import BigTransferError

FEW_LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(4), [5, 6, 7, 9]))
FEW_CLASSES = ["cat", "dog", "emu", "fox"]


def test_sample_per_class_exact_counts_and_sorted():
    chosen = sample_per_class(FEW_LABELS, 3, seed=0, classes=FEW_CLASSES)
    assert len(chosen) == 12
    assert chosen.tolist() == sorted(set(chosen.tolist()))
    assert np.bincount(FEW_LABELS[chosen], minlength=4).tolist() == [3, 3, 3, 3]
    assert chosen.min() >= 0 and chosen.max() < len(FEW_LABELS)


def test_sample_per_class_is_reproducible_per_seed():
    a = sample_per_class(FEW_LABELS, 4, seed=11, classes=FEW_CLASSES)
    b = sample_per_class(FEW_LABELS, 4, seed=11, classes=FEW_CLASSES)
    c = sample_per_class(FEW_LABELS, 4, seed=12, classes=FEW_CLASSES)
    np.testing.assert_array_equal(a, b)
    assert a.tolist() != c.tolist()
    # without class names the classes come from the labels
    np.testing.assert_array_equal(sample_per_class(FEW_LABELS, 4, seed=11), a)


def test_sample_per_class_too_few_names_the_class():
    with pytest.raises(BigTransferError, match="class 'cat' has only 5"):
        sample_per_class(FEW_LABELS, 6, seed=0, classes=FEW_CLASSES)
    with pytest.raises(BigTransferError, match="class 'owl' has only 0"):
        sample_per_class(FEW_LABELS, 1, seed=0, classes=FEW_CLASSES + ["owl"])


@pytest.mark.parametrize("k", [0, -2])
def test_sample_per_class_rejects_k_below_one(k):
    with pytest.raises(BigTransferError, match="at least 1"):
        sample_per_class(FEW_LABELS, k, seed=0, classes=FEW_CLASSES)
