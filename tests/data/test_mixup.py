"""MixUp (data/mixup.py) and the loss it feeds."""

from __future__ import annotations

import math

import pytest
import torch

from bigtransfer.data.mixup import mix, mixup_ratio
from bigtransfer.train.losses import softmax_cross_entropy


def test_mixup_ratio_without_mixing_is_one():
    assert mixup_ratio(0.0, seed=0, step=0) == 1.0
    assert mixup_ratio(0.0, seed=3, step=1234) == 1.0


def test_mixup_ratio_with_alpha_is_a_fraction_fixed_by_seed_and_step():
    values = [mixup_ratio(0.1, seed=0, step=s) for s in (0, 1, 2)]
    assert all(0.0 < v < 1.0 for v in values)
    assert values == [mixup_ratio(0.1, seed=0, step=s) for s in (0, 1, 2)]
    assert len(set(values)) == 3
    assert mixup_ratio(0.1, seed=1, step=0) != values[0]
    many = [mixup_ratio(0.1, seed=4, step=s) for s in range(200)]
    assert all(0.0 <= v <= 1.0 for v in many)
    # Beta(0.1, 0.1) piles up near 0 and 1
    assert sum(v < 0.1 or v > 0.9 for v in many) > 100


def test_mix_blends_each_item_with_a_permuted_partner():
    x = torch.arange(6 * 2 * 2, dtype=torch.float32).reshape(6, 1, 2, 2)
    mixed, perm = mix(x, 0.3, torch.Generator().manual_seed(0))
    assert sorted(perm.tolist()) == list(range(6))
    assert torch.allclose(mixed, 0.3 * x + 0.7 * x[perm])
    again, perm_again = mix(x, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(perm, perm_again) and torch.equal(mixed, again)
    same, _ = mix(x, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(same, x)


def _hand_cross_entropy(rows: list[list[float]], targets: list[int]) -> float:
    total = 0.0
    for row, target in zip(rows, targets):
        log_norm = math.log(sum(math.exp(v) for v in row))
        total += log_norm - row[target]
    return total / len(rows)


def test_softmax_cross_entropy_matches_hand_computation():
    rows = [[2.0, 0.5, -1.0], [0.0, 1.0, 3.0], [-0.5, 0.25, 0.0]]
    targets = [0, 2, 1]
    perm = [2, 0, 1]
    lam = 0.7
    logits = torch.tensor(rows, dtype=torch.float64)
    labels = torch.tensor(targets)
    got = softmax_cross_entropy(logits, labels, torch.tensor(perm), lam)
    permuted = [targets[p] for p in perm]
    want = lam * _hand_cross_entropy(rows, targets) + (1 - lam) * _hand_cross_entropy(rows, permuted)
    assert got.item() == pytest.approx(want, rel=1e-12)
    plain = _hand_cross_entropy(rows, targets)
    assert softmax_cross_entropy(logits, labels, None, lam).item() == pytest.approx(plain, rel=1e-12)
    assert softmax_cross_entropy(logits, labels, torch.tensor(perm), 1.0).item() == pytest.approx(
        plain, rel=1e-12)
