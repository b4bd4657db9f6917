"""Candidate pairs: for each test image, the few upstream images worth verifying.

Three sources, none of them class features alone:

* IDENTICAL: upstream images whose canonical thumbnail is byte-for-byte the test image's (a
  64-bit hash of the thumbnail, looked up in a sorted array): exact copies, found even where an
  approximate index would miss them;
* PIXELS: nearest neighbours of the pixel descriptor (pixels.py) in a faiss inner-product index,
  queried with the test image as it is and moved by one canonical pixel in each of eight
  directions, so that a copy shifted by a pixel still comes first;
* EMBEDDING: nearest neighbours of the model's embedding, when there is a model.

Indexes are exact below APPROXIMATE_ABOVE upstream images and HNSW graphs above it (millions of
upstream images: search time then grows with the logarithm of the collection, not linearly).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ..errors import BigTransferError
from .pixels import descriptors

APPROXIMATE_ABOVE = 200_000  # upstream images: exact search up to this many, HNSW above
HNSW_LINKS = 32  # neighbours per node of the HNSW graph
HNSW_SEARCH_DEPTH = 128  # candidates an HNSW search keeps while it walks the graph
SHIFTS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))  # query variants, canonical px

IDENTICAL, PIXELS, EMBEDDING = 1, 2, 4  # bits of a candidate's `sources`
SOURCE_NAMES = {IDENTICAL: "identical", PIXELS: "pixels", EMBEDDING: "embedding"}


def faiss_module():
    """faiss, or a clear error saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise BigTransferError("bigtransfer dedup needs faiss: pip install 'bigtransfer[dedup]'") from None
    return faiss


def source_names(sources: int) -> str:
    """'pixels+embedding' for a bit set of sources."""
    return "+".join(name for bit, name in SOURCE_NAMES.items() if sources & bit)


class VectorIndex:
    """Unit vectors searched by inner product, filled in chunks; exact or HNSW (see the module doc)."""

    def __init__(self, dim: int, approximate: bool):
        faiss = faiss_module()
        self.approximate = approximate
        if approximate:
            self.index = faiss.IndexHNSWFlat(dim, HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efSearch = HNSW_SEARCH_DEPTH
        else:
            self.index = faiss.IndexFlatIP(dim)

    def __len__(self) -> int:
        return self.index.ntotal

    def add(self, vectors: np.ndarray) -> None:
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))

    def search(self, queries: np.ndarray, k: int, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) [Q, k] of each query's k nearest (ids -1 where there are fewer); `exact`
        searches an HNSW index's stored vectors one by one instead of its graph."""
        k = max(1, min(k, len(self)))
        if len(self) == 0 or len(queries) == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        index = self.index
        if exact and self.approximate:
            index = faiss_module().downcast_index(self.index.storage)
        return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def thumbnail_hashes(thumbnails: np.ndarray) -> np.ndarray:
    """uint64 [N]: a 64-bit hash of each canonical thumbnail's bytes."""
    return np.array([int.from_bytes(hashlib.blake2b(t.tobytes(), digest_size=8).digest(), "little")
                     for t in thumbnails], dtype=np.uint64)


@dataclass
class Candidates:
    """Candidate pairs (test image i, upstream image j) with the sources that proposed each."""

    test: np.ndarray  # int64 [P]
    upstream: np.ndarray  # int64 [P]
    sources: np.ndarray  # int64 [P], bits IDENTICAL | PIXELS | EMBEDDING

    def __len__(self) -> int:
        return len(self.test)


def merge(found: list[tuple[np.ndarray, np.ndarray, int]]) -> Candidates:
    """One entry per (i, j) pair, its source bits OR-ed, from (test ids, upstream ids, source) lists."""
    parts = [(np.asarray(i, np.int64), np.asarray(j, np.int64), np.full(len(i), s, np.int64)) for i, j, s in found
             if len(i)]
    if not parts:
        empty = np.zeros(0, np.int64)
        return Candidates(empty, empty, empty)
    i, j, s = (np.concatenate(p) for p in zip(*parts))
    keep = j >= 0
    i, j, s = i[keep], j[keep], s[keep]
    pairs, inverse = np.unique(np.stack([i, j], 1), axis=0, return_inverse=True)
    sources = np.zeros(len(pairs), np.int64)
    np.bitwise_or.at(sources, inverse.reshape(-1), s)
    return Candidates(pairs[:, 0], pairs[:, 1], sources)


def identical(test_hashes: np.ndarray, upstream_hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(test ids, upstream ids) of every pair with equal thumbnail hashes."""
    order = np.argsort(upstream_hashes, kind="stable")
    ranked = upstream_hashes[order]
    lo = np.searchsorted(ranked, test_hashes, side="left")
    hi = np.searchsorted(ranked, test_hashes, side="right")
    tests = np.repeat(np.arange(len(test_hashes)), hi - lo)
    ups = np.concatenate([order[a:b] for a, b in zip(lo, hi)]) if len(tests) else np.zeros(0, np.int64)
    return tests, ups


def pixel_queries(thumbnails: np.ndarray) -> list[np.ndarray]:
    """The pixel descriptors to query with: one array [N, D] per shift in SHIFTS."""
    return [descriptors(thumbnails, shift) for shift in SHIFTS]


def nearest(index: VectorIndex, queries: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(test ids, upstream ids, scores) of each query's k nearest, over every variant of the queries."""
    tests, ups, scores = [], [], []
    for q in queries:
        s, ids = index.search(q, k)
        tests.append(np.repeat(np.arange(len(q)), ids.shape[1]))
        ups.append(ids.reshape(-1))
        scores.append(s.reshape(-1))
    if not tests:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(tests), np.concatenate(ups), np.concatenate(scores)


def kth_scores(index: VectorIndex, queries: list[np.ndarray], k: int) -> list[np.ndarray]:
    """Per query variant, the score of each query's k-th nearest (-inf when the index holds fewer):
    what anything else must beat to be among its k nearest."""
    out = []
    for q in queries:
        s, ids = index.search(q, k)
        if s.shape[1] < k:
            out.append(np.full(len(q), -np.inf, np.float32))
        else:
            out.append(np.where(ids[:, -1] >= 0, s[:, -1], -np.inf).astype(np.float32))
    return out


def index_recall(index: VectorIndex, queries: np.ndarray, k: int) -> float | None:
    """For an approximate index: the share of the exact k nearest that its search finds (None if exact)."""
    if not index.approximate or len(queries) == 0:
        return None
    _, approx = index.search(queries, k)
    _, exact = index.search(queries, k, exact=True)
    found = sum(len(set(a[a >= 0]) & set(e[e >= 0])) for a, e in zip(approx, exact))
    return found / max(1, int((exact >= 0).sum()))


def nearest_planted(planted: VectorIndex, real: VectorIndex, queries: list[np.ndarray],
                    k: int) -> tuple[np.ndarray, np.ndarray]:
    """(test ids, planted ids): each planted vector that would be among a query's k nearest had it
    been the only one added to `real` (it scores at least the query's k-th real neighbour)."""
    tests, ids = [], []
    for q, bar in zip(queries, kth_scores(real, queries, k)):
        s, found = planted.search(q, k)
        keep = (found >= 0) & (s >= bar[:, None])
        tests.append(np.nonzero(keep)[0])
        ids.append(found[keep])
    if not tests:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(tests), np.concatenate(ids)
