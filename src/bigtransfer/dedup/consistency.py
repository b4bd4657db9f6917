"""Copies of one image are copies of each other: the check that a group of faint matches agrees.

Where the flatter image of a pair has little fine detail (a hazy horizon, a blurred background),
the pixel check's tolerance is that detail (verify.py's per_detail ceiling), and a smooth test
image can pass against several *different* upstream images: each differs from it by less than
its own faint detail, yet they differ from one another by more. Real copies do not behave like
this: web copies of one image are, within the same tolerance, copies of each other. So where a
test image has several matches, each match that was decided by the detail ceiling must also
verify against the best of them (the one that used the least of its allowed residual); likewise
where an upstream image matches several test images. A member that fails is dropped.

Only matches decided by detail are checked: between two copies of a textured image made with
different edits (a crop and a shift, say), the edits compound, and such pairs fail the check now
and then while being copies (benchmarks/dedup_real.py --consistency measures both on the tuning
halves). Identical thumbnails are never dropped, and rank first.
"""

from __future__ import annotations

import numpy as np

from .verify import Tolerance, verify


def _inconsistent(key: np.ndarray, other: np.ndarray, used: np.ndarray, alive: np.ndarray, fixed: np.ndarray,
                  checked: np.ndarray, thumbnails: np.ndarray, tol: Tolerance) -> np.ndarray:
    """bool [P]: the `checked` pairs whose `other` image fails to verify against the `other` image
    of the best pair sharing their `key` image (among `alive` pairs; `fixed` pairs are best)."""
    rank = np.where(fixed, -1.0, used)
    live = np.flatnonzero(alive)
    order = live[np.lexsort((rank[live], key[live]))]  # grouped by key, best first
    starts = np.flatnonzero(np.r_[True, key[order][1:] != key[order][:-1]])
    members, bests = [], []
    for begin, end in zip(starts, np.r_[starts[1:], len(order)]):
        for member in order[begin + 1:end]:
            if checked[member] and not fixed[member]:
                members.append(member)
                bests.append(order[begin])
    bad = np.zeros(len(key), bool)
    if members:
        members, bests = np.asarray(members), np.asarray(bests)
        bad[members[~verify(thumbnails[other[bests]], thumbnails[other[members]], tol).copy]] = True
    return bad


def consistent(test: np.ndarray, upstream: np.ndarray, used: np.ndarray, by_detail: np.ndarray,
               identical: np.ndarray, test_thumbnails: np.ndarray, upstream_thumbnails: np.ndarray,
               tol: Tolerance) -> np.ndarray:
    """bool [P]: which of the found pairs (test[p], upstream[p]) stand, given how much of the
    allowed residual each used, which were decided by detail (Verdicts.by_detail: the pairs held
    to the others; all True holds every match, as the benchmark does to show why not) and which
    had identical thumbnails (see the module doc)."""
    keep = np.ones(len(test), bool)
    if len(test) < 2:
        return keep
    keep &= ~_inconsistent(test, upstream, used, keep, identical, by_detail, upstream_thumbnails, tol)
    keep &= ~_inconsistent(upstream, test, used, keep, identical, by_detail, test_thumbnails, tol)
    return keep
