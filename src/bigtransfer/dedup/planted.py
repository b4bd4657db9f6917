"""Evaluation sets with planted near-duplicates, and precision/recall against them (tests and
benchmarks use these; dedup itself plants its self-test copies in memory, see selftest.py)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic import write_image


def planted_precision_recall(pairs_csv: Path, truth: set[tuple[str, str]]) -> dict:
    """Precision and recall of found (downstream path, upstream path) pairs against planted ones."""
    with open(pairs_csv, newline="") as fh:
        found = {(r["downstream_path"], r["upstream_path"]) for r in csv.DictReader(fh)}
    hits = len(found & truth)
    return {"found": len(found), "planted": len(truth), "true_positives": hits,
            "precision": hits / len(found) if found else 1.0, "recall": hits / len(truth) if truth else 1.0}


def write_planted_set(root: Path, *, upstream_per_class: int = 100, classes: int = 100, test_per_class: int = 3,
                      planted: int = 100, size: int = 64, seed: int = 0,
                      progress: bool = False) -> set[tuple[str, str]]:
    """An evaluation set: procedural upstream and test images, with `planted` test images copied
    into the upstream folder resized (60-90%), re-encoded as JPEG (quality 40-80) and cropped by
    2-8% per side. Returns the planted (test path, upstream copy path) pairs."""
    from ..data.procedural import glyphs

    rng = np.random.default_rng(seed)
    upstream = glyphs(classes, upstream_per_class, 0, size, seed=seed + 1, progress=progress).train
    test = glyphs(classes, 1, test_per_class, size, seed=seed + 2, progress=progress).test
    # A folder of class folders: a downstream set without a test split counts all its images.
    for name, images, folder in (("up", upstream, root / "upstream"), ("test", test, root / "test")):
        for i in range(len(images)):
            write_image(folder / images.classes[images.labels[i]] / f"{name}{i:06d}.png", images.load(i),
                        durable=False)  # test data, made again at will
    truth = set()
    for i in rng.choice(len(test), size=min(planted, len(test)), replace=False).tolist():
        image = test.load(i)
        w, h = image.size
        left, top, right, bottom = (int(v) for v in rng.uniform(0.02, 0.08, 4) * [w, h, w, h])
        copy = image.crop((left, top, w - right, h - bottom))
        scale = rng.uniform(0.6, 0.9)
        copy = copy.resize((max(8, round(copy.width * scale)), max(8, round(copy.height * scale))), Image.BILINEAR)
        label = test.classes[test.labels[i]]
        path = root / "upstream" / label / f"planted{i:06d}.jpg"
        write_image(path, copy, durable=False, quality=int(rng.integers(40, 81)))
        truth.add((str(root / "test" / label / f"test{i:06d}.png"), str(path)))
    return truth
