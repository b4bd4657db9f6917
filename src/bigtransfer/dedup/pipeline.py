"""`bigtransfer dedup`: decode, plant the self-test's copies, search, verify, report."""

from __future__ import annotations

import resource
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import rundir
from ..data.images import IMAGE_ERRORS, load_rgb
from ..data.imageset import ImageSet
from ..data.sources import load_source
from ..errors import BigTransferError, BigTransferWarning
from . import candidates as cand
from .consistency import consistent
from .edits import EDITS
from .features import Embedder, Features, batches, extract
from .pixels import CANONICAL, DESCRIPTOR, descriptors, grey_thumbnail
from .report import write_outputs
from .selftest import plant, score
from .verify import Tolerance, Verdicts, featureless, verify

NO_MODEL = "none"
INDEX_KINDS = ("auto", "exact", "approximate")
VERIFY_CHUNK = 20_000  # candidate pairs gathered and verified at a time
FINE = 64  # side of the second check, for pairs of images that both have this many pixels


@dataclass
class DedupOptions:
    upstream: str
    downstream: tuple[str, ...]
    out: Path = Path("runs/dedup")
    model: str = "BiT-M-R50x1"  # proposes candidates besides the pixels; "none": pixels only
    embedding_layer: str = "stage3"
    resolution: int = 128
    neighbours: int = 10  # nearest upstream images per query (9 pixel queries and 1 embedding query)
    tolerance: Tolerance = field(default_factory=Tolerance)
    self_test: int = 100  # downstream images copied with every edit for the self-test (0: none)
    seed: int = 0
    index: str = "auto"  # exact | approximate (HNSW) | auto: approximate above APPROXIMATE_ABOVE
    sheet_pairs: int = 48  # per stage on the contact sheet
    batch: int = 64
    workers: int = 0
    device: str = "auto"
    progress: bool = True

    def check(self) -> None:
        """One-line errors naming the flag, before anything is read."""
        if not self.downstream:
            raise BigTransferError("--downstream: name at least one source")
        if self.neighbours < 1:
            raise BigTransferError("--neighbours must be at least 1")
        if self.self_test < 0:
            raise BigTransferError("--self-test must be 0 (off) or a number of test images")
        if self.index not in INDEX_KINDS:
            raise BigTransferError(f"--index: expected one of {', '.join(INDEX_KINDS)}")
        if self.resolution < 16:
            raise BigTransferError("--resolution must be at least 16")
        try:
            self.tolerance.check()
        except ValueError as err:
            raise BigTransferError(f"tolerance flags: {err}") from None


def _load(spec: str, flag: str):
    """load_source, its errors naming dedup's flag rather than --data."""
    try:
        return load_source(spec, require_test=False, progress=False)
    except BigTransferError as err:
        message = str(err)
        raise BigTransferError(flag + message[len("--data"):] if message.startswith("--data") else
                               f"{flag} {message}") from None


class TestImages:
    """The test images of every downstream source, numbered one after another."""

    def __init__(self, specs: tuple[str, ...]):
        self.specs, self.sets = list(specs), []
        for spec in specs:
            splits = _load(spec, "--downstream")
            self.sets.append(splits.test if splits.test is not None else splits.train)
        self.offsets = np.cumsum([0] + [len(s) for s in self.sets])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, i: int) -> tuple[int, int]:
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return k, i - int(self.offsets[k])

    def describe(self, i: int) -> str:
        k, j = self.locate(i)
        return self.sets[k].describe_item(j)

    def spec(self, i: int) -> str:
        return self.specs[self.locate(i)[0]]

    def load(self, i: int) -> Image.Image:
        k, j = self.locate(i)
        return self.sets[k].load(j)


def upstream_files(spec: str) -> tuple[ImageSet, list[str]]:
    """All images of the upstream source (every split) and the split each came from; they must
    be files, because upstream_filtered.csv lists them."""
    splits = _load(spec, "--upstream")
    parts = [(name, images) for name, images in (("train", splits.train), ("test", splits.test)) if images is not None]
    if any(images.paths is None for _, images in parts):
        raise BigTransferError(f"--upstream {spec}: dedup needs image files (an image folder or a CSV manifest)")
    paths = [p for _, images in parts for p in images.paths]
    labels = [images.classes[label] for _, images in parts for label in images.labels]
    split_names = [name for name, images in parts for _ in range(len(images))]
    index = {c: i for i, c in enumerate(sorted(set(labels)))}
    merged = ImageSet(sorted(index), [index[c] for c in labels], paths=paths, origin=spec)
    return merged, split_names


def embedding_model(spec: str, device: torch.device) -> torch.nn.Module:
    """The model whose features propose candidates: a released name, a run, a weights file, or an
    architecture (randomly initialised, seed 0)."""
    from ..models.factory import create_model, model_source
    from ..models.resnetv2 import fold_standardization

    name, weights = model_source(spec, None)
    torch.manual_seed(0)
    # Only ever run forward: the standardized kernels are computed once and the originals freed.
    return fold_standardization(create_model(name, weights=weights).to(device).eval())


@dataclass
class Upstream:
    """What the search keeps of the upstream images: thumbnails, hashes and the two indexes."""

    thumbnails: np.ndarray
    readable: np.ndarray
    sides: np.ndarray
    hashes: np.ndarray
    pixels: cand.VectorIndex
    embeddings: cand.VectorIndex | None


def _index_upstream(images: ImageSet, embedder: Embedder | None, opts: DedupOptions, approximate: bool) -> Upstream:
    n = len(images)
    up = Upstream(np.zeros((n, CANONICAL, CANONICAL), np.uint8), np.zeros(n, bool), np.zeros(n, np.int64),
                  np.zeros(n, np.uint64),
                  cand.VectorIndex(DESCRIPTOR**2, approximate),
                  cand.VectorIndex(embedder.dim, approximate) if embedder else None)
    at = 0
    for part in batches(images, embedder, batch=opts.batch, workers=opts.workers, progress=opts.progress,
                        desc="upstream"):
        stop = at + len(part)
        up.thumbnails[at:stop], up.readable[at:stop], up.sides[at:stop] = part.thumbnails, part.readable, part.sides
        up.hashes[at:stop] = cand.thumbnail_hashes(part.thumbnails)
        up.pixels.add(descriptors(part.thumbnails))
        if up.embeddings is not None:
            up.embeddings.add(part.embeddings)
        at = stop
    return up


def _real_candidates(down: Features, up: Upstream, queries, k: int) -> cand.Candidates:
    found = [(*cand.identical(cand.thumbnail_hashes(down.thumbnails), up.hashes), cand.IDENTICAL),
             (*cand.nearest(up.pixels, queries, k)[:2], cand.PIXELS)]
    if up.embeddings is not None:
        found.append((*cand.nearest(up.embeddings, [down.embeddings], k)[:2], cand.EMBEDDING))
    pairs = cand.merge(found)
    keep = down.readable[pairs.test] & up.readable[pairs.upstream]
    return cand.Candidates(pairs.test[keep], pairs.upstream[keep], pairs.sources[keep])


def _planted_candidates(down: Features, planted: Features, up: Upstream, queries, k: int) -> cand.Candidates:
    index = cand.VectorIndex(DESCRIPTOR**2, approximate=False)
    index.add(descriptors(planted.thumbnails))
    found = [(*cand.identical(cand.thumbnail_hashes(down.thumbnails), cand.thumbnail_hashes(planted.thumbnails)),
              cand.IDENTICAL), (*cand.nearest_planted(index, up.pixels, queries, k), cand.PIXELS)]
    if up.embeddings is not None:
        emb = cand.VectorIndex(planted.embeddings.shape[1], approximate=False)
        emb.add(planted.embeddings)
        found.append((*cand.nearest_planted(emb, up.embeddings, [down.embeddings], k), cand.EMBEDDING))
    pairs = cand.merge(found)
    keep = down.readable[pairs.test] & planted.readable[pairs.upstream]
    return cand.Candidates(pairs.test[keep], pairs.upstream[keep], pairs.sources[keep])


def _verify(pairs: cand.Candidates, a: np.ndarray, b: np.ndarray, tol: Tolerance) -> Verdicts:
    """Verdicts for every candidate pair (a[test], b[upstream]), gathered a chunk at a time."""
    return Verdicts.concat([verify(a[pairs.test[s:s + VERIFY_CHUNK]], b[pairs.upstream[s:s + VERIFY_CHUNK]], tol)
                            for s in range(0, len(pairs), VERIFY_CHUNK)])


@dataclass
class Decided:
    """The candidate pairs found to be copies, with how."""

    pairs: cand.Candidates
    verdicts: Verdicts
    stage: np.ndarray  # str [P]: identical | aligned | rescaled
    fine: np.ndarray  # str [P]: the check at FINE px: "passed", "no detail" or "" (not made)

    def take(self, which: np.ndarray) -> Decided:
        pairs = cand.Candidates(self.pairs.test[which], self.pairs.upstream[which], self.pairs.sources[which])
        return Decided(pairs, self.verdicts.take(which), self.stage[which], self.fine[which])


def decide(pairs: cand.Candidates, verdicts: Verdicts) -> Decided:
    """Keep the pairs with identical thumbnails or a verified copy; name the stage that decided each."""
    same = (pairs.sources & cand.IDENTICAL) > 0
    stage = np.where(same, "identical", np.where(verdicts.scale >= 1.0, "aligned", "rescaled"))
    keep = same | verdicts.copy
    return Decided(pairs, verdicts, stage, np.full(len(pairs), "", dtype=object)).take(keep)


def fine_check(found: Decided, load_test, load_upstream, test_sides: np.ndarray, up_sides: np.ndarray,
               tol: Tolerance) -> tuple[Decided, int]:
    """(the pairs that stand, how many were dropped): pairs of two images at least FINE px on their
    shorter side are checked again at FINE x FINE, with the same tolerance. At 32 x 32 two photos of
    a hazy horizon are the same edge on a flat sky; at 64 their detail differs. A pair stands if it
    passes there too, or if an image has no detail at that size (a small image upscaled)."""
    t, u = found.pairs.test, found.pairs.upstream
    todo = np.flatnonzero((found.stage != "identical") & (test_sides[t] >= FINE) & (up_sides[u] >= FINE))
    if not len(todo):
        return found, 0
    cache: dict[int, np.ndarray] = {}

    def test_thumb(i: int) -> np.ndarray:
        if i not in cache:
            cache[i] = grey_thumbnail(load_test(i), FINE)
        return cache[i]

    a, b, loaded = [], [], []
    for k in todo.tolist():
        try:
            b.append(grey_thumbnail(load_upstream(int(u[k])), FINE))
            a.append(test_thumb(int(t[k])))
            loaded.append(k)
        except IMAGE_ERRORS:  # unreadable now: the first check's verdict stands
            continue
    if not loaded:
        return found, 0
    # The residual-structure and detail-agreement checks were measured at the canonical size: at
    # FINE px an image upscaled from a small one is smooth, and so are its copies' residual and detail.
    verdicts = verify(np.stack(a), np.stack(b), replace(tol, max_structure=1.0, min_detail_correlation=-1.0))
    keep = np.ones(len(found.stage), bool)
    keep[loaded] = verdicts.copy | verdicts.featureless
    found.fine[loaded] = np.where(verdicts.copy, "passed", "no detail")
    return found.take(keep), int((~keep).sum())


def agreeing(found: Decided, test_thumbnails: np.ndarray, upstream_thumbnails: np.ndarray,
             tol: Tolerance) -> tuple[Decided, int]:
    """(the pairs that stand, how many were dropped): where an image has several matches decided
    by faint detail, they must be copies of one another (consistency.py)."""
    keep = consistent(found.pairs.test, found.pairs.upstream, found.verdicts.used, found.verdicts.by_detail,
                      found.stage == "identical", test_thumbnails, upstream_thumbnails, tol)
    return found.take(keep), int((~keep).sum())


def run_dedup(opts: DedupOptions) -> dict:
    """Find the pairs, write the reports and the filtered upstream manifest; returns the summary."""
    opts.check()
    out = Path(opts.out)
    with rundir.owned(out, "dedup"):
        return _run(opts, out)


def _run(opts: DedupOptions, out: Path) -> dict:
    from ..inference.predictor import resolve_device

    clock, seconds = time.perf_counter(), {}

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 2)
        clock = now

    upstream, up_splits = upstream_files(opts.upstream)
    tests = TestImages(opts.downstream)
    embedder = None
    if opts.model != NO_MODEL:
        device = resolve_device(opts.device)
        embedder = Embedder(embedding_model(opts.model, device), opts.embedding_layer, opts.resolution, device)
    lap("load")
    common = {"batch": opts.batch, "workers": opts.workers, "progress": opts.progress}
    down_parts = [extract(s, embedder, desc=f"test images {spec}", **common) for spec, s in zip(tests.specs, tests.sets)]
    down = Features(np.concatenate([p.thumbnails for p in down_parts]),
                    None if embedder is None else np.concatenate([p.embeddings for p in down_parts]),
                    np.concatenate([p.readable for p in down_parts]), np.concatenate([p.sides for p in down_parts]))
    lap("test_images")
    planted, planted_features = None, None
    if opts.self_test:
        planted = plant(tests.load, np.flatnonzero(down.readable), opts.self_test, opts.seed)
        planted_features = extract(planted.blobs, embedder, desc="self-test copies", **common)
    lap("self_test_copies")
    count = len(upstream)
    approximate = opts.index == "approximate" or (opts.index == "auto" and count > cand.APPROXIMATE_ABOVE)
    up = _index_upstream(upstream, embedder, opts, approximate)
    lap("upstream")
    queries = cand.pixel_queries(down.thumbnails)
    pairs = _real_candidates(down, up, queries, opts.neighbours)
    planted_pairs = None
    if planted is not None:
        planted_pairs = _planted_candidates(down, planted_features, up, queries, opts.neighbours)
    lap("search")
    found = decide(pairs, _verify(pairs, down.thumbnails, up.thumbnails, opts.tolerance))
    found, dropped = fine_check(found, tests.load, upstream.load, down.sides, up.sides, opts.tolerance)
    found, disagreeing = agreeing(found, down.thumbnails, up.thumbnails, opts.tolerance)
    self_test = None
    if planted is not None:
        found_planted = decide(planted_pairs, _verify(planted_pairs, down.thumbnails, planted_features.thumbnails,
                                                      opts.tolerance))
        found_planted, _ = fine_check(found_planted, tests.load, lambda c: load_rgb(planted.blobs[c]), down.sides,
                                      planted_features.sides, opts.tolerance)
        found_planted, _ = agreeing(found_planted, down.thumbnails, planted_features.thumbnails, opts.tolerance)
        self_test = score(planted, found_planted.pairs.test, found_planted.pairs.upstream)
        self_test.update({"sample": opts.self_test, "seed": opts.seed, "edits": list(EDITS)})
    lap("verify")
    cosines = None
    if embedder is not None and len(found.pairs):
        stored = up.embeddings.index.reconstruct_batch(found.pairs.upstream)
        cosines = (down.embeddings[found.pairs.test] * stored).sum(1)
    sample = down.thumbnails[down.readable][:200]
    recall = cand.index_recall(up.pixels, descriptors(sample), opts.neighbours)
    unreadable = int((~up.readable).sum())
    if unreadable:
        warnings.warn(f"{opts.upstream}: {unreadable} upstream image(s) could not be decoded; they are kept in "
                      "upstream_filtered.csv, unchecked", BigTransferWarning, stacklevel=2)
    flat = int(featureless(down.thumbnails, opts.tolerance)[down.readable].sum())
    summary = {
        "upstream_images": count, "test_images": len(tests), "candidate_pairs": len(pairs),
        "dropped_at_64px": dropped, "dropped_disagreeing": disagreeing,
        "index": {"kind": "hnsw" if approximate else "exact", "pixel_recall_vs_exact": recall},
        "featureless_test_images": flat, "unreadable_upstream": unreadable,
        "unreadable_test_images": int((~down.readable).sum()),
    }
    summary.update(write_outputs(out, found=found, cosines=cosines, tests=tests, upstream=upstream,
                                 up_splits=up_splits, up_readable=up.readable, self_test=self_test,
                                 planted=planted, sheet_pairs=opts.sheet_pairs))
    lap("write")
    seconds["total"] = round(sum(seconds.values()), 2)
    summary["seconds"] = seconds
    summary["peak_memory_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    summary["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}
    from ..atomic import write_json

    write_json(out / "summary.json", summary)
    return summary
