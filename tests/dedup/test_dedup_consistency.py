"""Where an image has several faint matches they must be copies of one another
(dedup/consistency.py): a hazy image that two different images both pass against keeps only its
best match, while every real copy of an image stays, however many there are."""

import numpy as np
import pytest
from PIL import Image, ImageFilter
from scipy.ndimage import gaussian_filter

pytest.importorskip("faiss")

from bigtransfer.data.images import load_rgb
from bigtransfer.dedup import EDITS, DedupOptions, Tolerance, run_dedup
from bigtransfer.dedup.consistency import consistent
from bigtransfer.dedup.pixels import grey_thumbnail
from bigtransfer.dedup.verify import verify


def triple(seed: int = 0, texture: float = 6.0, pattern: float = 1.6) -> tuple[np.ndarray, ...]:
    """A hazy horizon (a ramp with faint texture) and two images that differ from it by one faint
    pattern, with opposite signs: each within the tolerance of the horizon, twice as far from the
    other. With more texture, the pair's tolerance is set by contrast instead of detail."""
    rng = np.random.default_rng(seed)
    rows = np.linspace(0, 1, 32)[:, None]
    base = 200 - 60 / (1 + np.exp(-(rows - 0.55) * 10)) + texture * gaussian_filter(rng.normal(size=(32, 32)), 1.0)
    faint = gaussian_filter(rng.normal(size=(32, 32)), 0.8)
    faint *= pattern / faint.std()
    return tuple(np.clip(x, 0, 255).round().astype(np.uint8) for x in (base, base + faint, base - faint))


def test_the_crafted_images_are_what_the_rule_is_for():
    for images, by_detail in ((triple(), True), (triple(texture=40.0, pattern=3.0), False)):
        middle, plus, minus = images
        checks = verify(np.stack([middle, middle, plus]), np.stack([plus, minus, minus]))
        assert checks.copy.tolist() == [True, True, False]
        assert checks.by_detail[:2].tolist() == [by_detail] * 2


def held(images, test, upstream) -> np.ndarray:
    """Which pairs verify() says were decided by detail (the ones the rule holds to the others)."""
    return verify(np.stack([images[i] for i in test]), np.stack([images[j] for j in upstream])).by_detail


def test_faint_matches_that_are_not_copies_of_each_other_keep_only_the_best():
    thumbs = np.stack(triple())
    # test image 0 matched by upstream 1 and 2 (2 the better); upstream 0 matched by test 1 and 2
    test, upstream = np.array([0, 0]), np.array([1, 2])
    assert held(thumbs, test, upstream).all()
    keep = consistent(test, upstream, np.array([0.7, 0.6]), held(thumbs, test, upstream), np.zeros(2, bool),
                      thumbs, thumbs, Tolerance())
    assert keep.tolist() == [False, True]
    keep = consistent(upstream, test, np.array([0.6, 0.7]), held(thumbs, upstream, test), np.zeros(2, bool),
                      thumbs, thumbs, Tolerance())
    assert keep.tolist() == [True, False]
    # identical thumbnails are never dropped, and rank first
    keep = consistent(test, upstream, np.array([0.7, 0.6]), held(thumbs, test, upstream), np.array([True, False]),
                      thumbs, thumbs, Tolerance())
    assert keep.tolist() == [True, False]


def test_textured_matches_are_not_held_to_each_other():
    """Where contrast sets the tolerance, two copies made with different edits may fail against
    each other (the edits compound) and still both be copies: they all stand."""
    thumbs = np.stack(triple(texture=40.0, pattern=3.0))
    test, upstream = np.array([0, 0]), np.array([1, 2])
    assert not held(thumbs, test, upstream).any()
    keep = consistent(test, upstream, np.array([0.7, 0.6]), held(thumbs, test, upstream), np.zeros(2, bool),
                      thumbs, thumbs, Tolerance())
    assert keep.all()
    everything = consistent(test, upstream, np.array([0.7, 0.6]), np.ones(2, bool), np.zeros(2, bool),
                            thumbs, thumbs, Tolerance())
    assert everything.tolist() == [False, True]  # what holding them would do


def test_every_copy_of_an_image_stays_however_many_it_has():
    """Real digits and out-of-focus photo crops (blurred: their faint detail sets the tolerance),
    each with copies made by every edit but the two that give identical thumbnails (so no copy
    stands in for the original): every copy that verifies also stands."""
    from sklearn.datasets import load_digits, load_sample_images

    digits = load_digits().images[:20]
    images = [Image.fromarray(np.round(d * 255 / 16).astype(np.uint8)).resize((28, 28), Image.BILINEAR) for d in digits]
    for photo in load_sample_images().images:
        images += [Image.fromarray(photo[y:y + 96, x:x + 96]).resize((32, 32), Image.BICUBIC)
                   .filter(ImageFilter.GaussianBlur(1.5)) for y in range(0, 330, 60) for x in range(0, 540, 60)]
    edits = [name for name in EDITS if name not in ("copy", "grey_rgb")]
    rng = np.random.default_rng(0)
    test, upstream, originals, copies = [], [], [], []
    for i, image in enumerate(images):
        originals.append(grey_thumbnail(image))
        for name in edits:
            copies.append(grey_thumbnail(load_rgb(EDITS[name](image, rng))))
            test.append(i)
            upstream.append(len(copies) - 1)
    test, upstream = np.array(test), np.array(upstream)
    originals, copies = np.stack(originals), np.stack(copies)
    verdicts = verify(originals[test], copies[upstream])
    found = verdicts.copy
    assert found.mean() > 0.8  # most copies verify at all (crops and the combined edit may not)
    assert verdicts.by_detail[found].sum() >= 30  # and many are held to the others
    keep = consistent(test[found], upstream[found], verdicts.used[found], verdicts.by_detail[found],
                      np.zeros(found.sum(), bool), originals, copies, Tolerance())
    assert keep.all()


def test_dedup_reports_the_pairs_it_dropped_for_disagreeing(tmp_path):
    middle, plus, minus = triple()
    unrelated = [triple(seed, texture=40.0)[0] for seed in (1, 2)]  # folders need two classes
    for folder, name, pixels in (("up/a", "plus.png", plus), ("up/a", "minus.png", minus), ("test/a", "ramp.png", middle),
                                 ("up/b", "other.png", unrelated[0]), ("test/b", "other.png", unrelated[1])):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(tmp_path / folder / name)
    summary = run_dedup(DedupOptions(upstream=str(tmp_path / "up"), downstream=(str(tmp_path / "test"),),
                                     out=tmp_path / "out", model="none", self_test=0, progress=False))
    assert summary["dropped_disagreeing"] == 1
    pairs = (tmp_path / "out" / "pairs.csv").read_text().splitlines()
    better = "plus.png" if np.argmin(verify(np.stack([middle] * 2), np.stack([plus, minus])).used) == 0 else "minus.png"
    assert len(pairs) == 2 and f"/up/a/{better}," in pairs[1]  # the header and the better match
