"""De-duplication stage by stage, on real images (scikit-learn's digits and sample photographs):
the canonical thumbnail, verification under each web-copy edit and against look-alikes,
candidate search, the self-test's bookkeeping."""

import io

import numpy as np
import pytest
from PIL import Image, ImageEnhance

pytest.importorskip("faiss")

from bigtransfer.dedup import EDITS, Tolerance
from bigtransfer.dedup import candidates as cand
from bigtransfer.dedup.pixels import CANONICAL, contrast, descriptors, grey_thumbnail
from bigtransfer.dedup.selftest import plant, score
from bigtransfer.dedup.verify import verify


@pytest.fixture(scope="module")
def digits28():
    """scikit-learn's digits upscaled to 28 px, as grey images, and their labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = [Image.fromarray(np.round(d * 255 / 16).astype(np.uint8)).resize((28, 28), Image.BILINEAR)
              for d in bunch.images[:600]]
    return images, bunch.target[:600]


@pytest.fixture(scope="module")
def photo_crops():
    """Textured crops of the two sample photographs, at their native 120 px."""
    from sklearn.datasets import load_sample_images

    crops = []
    for photo in load_sample_images().images:
        for y in range(0, 300, 120):
            for x in range(0, 520, 120):
                crop = Image.fromarray(photo[y:y + 120, x:x + 120])
                if contrast(grey_thumbnail(crop)[None])[0] >= 10:
                    crops.append(crop)
    return crops


def thumbs(images) -> np.ndarray:
    return np.stack([grey_thumbnail(i) for i in images])


def decoded(blob: bytes) -> Image.Image:
    return Image.open(io.BytesIO(blob)).convert("RGB")


def test_thumbnail_is_canonical_grey_whatever_the_size_and_mode():
    rng = np.random.default_rng(0)
    grey = Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8))
    assert grey_thumbnail(grey).shape == (CANONICAL, CANONICAL)
    assert np.array_equal(grey_thumbnail(grey), grey_thumbnail(grey.convert("RGB")))  # grey <-> RGB: same luma
    big = Image.fromarray(rng.integers(0, 255, (500, 300, 3), dtype=np.uint8))
    assert grey_thumbnail(big).shape == (CANONICAL, CANONICAL) and grey_thumbnail(big).dtype == np.uint8


@pytest.mark.parametrize("edit", list(EDITS))
def test_every_edit_of_a_small_digit_and_a_large_photo_is_verified(edit, digits28, photo_crops):
    images = digits28[0][:40] + [c.resize((480, 480), Image.BICUBIC) for c in photo_crops[:10]]
    images = [i.convert("RGB") for i in images]
    copies = [decoded(EDITS[edit](image, np.random.default_rng(k))) for k, image in enumerate(images)]
    verdicts = verify(thumbs(images), thumbs(copies))
    if edit == "crop":  # the scale search covers crops of a few percent only approximately
        assert verdicts.copy.mean() >= 0.75, verdicts.copy.mean()
    elif edit == "brightness":  # x1.1 clips a bright sky to white: where most of an image clips, it can fail
        clipped = np.array([(np.asarray(c.convert("L")) >= 254).mean() for c in copies])
        assert verdicts.copy[clipped < 0.2].all() and verdicts.copy.mean() >= 0.9, verdicts.used[~verdicts.copy]
    else:
        assert verdicts.copy.all(), (edit, verdicts.used.max())
    if edit in ("copy", "grey_rgb"):  # lossless for grey digits: nothing left to explain
        assert verdicts.residual[:40].max() < 0.5


def test_copies_made_independently_of_dedups_edits_are_verified(digits28):
    """Edits written here with Pillow's own operations (black-filled shift, ImageEnhance)."""
    images = digits28[0][:30]
    shifted = [i.transform(i.size, Image.AFFINE, (1, 0, -1, 0, 1, 0), fillcolor=0) for i in images]
    brighter = [ImageEnhance.Brightness(i).enhance(1.1) for i in images]
    assert verify(thumbs(images), thumbs(shifted)).copy.all()
    assert verify(thumbs(images), thumbs(brighter)).copy.all()


def test_look_alikes_are_not_copies(digits28, photo_crops):
    """Each test digit against its 10 nearest other digits by pixels (mostly its own class)."""
    images, labels = digits28
    t = thumbs(images)
    d = descriptors(t)
    similarity = d[:100] @ d[100:].T
    nearest = np.argsort(-similarity, axis=1)[:, :10] + 100
    same_class = labels[nearest] == labels[:100, None]
    assert same_class.mean() > 0.8  # these really are look-alikes
    verdicts = verify(np.repeat(t[:100], 10, axis=0), t[nearest.reshape(-1)])
    # sklearn's digits hold a few nearly identical '1's; anything beyond those would be a failure
    assert verdicts.copy.mean() < 0.01, verdicts.copy.sum()
    crops = thumbs(photo_crops)
    pairs = [(a, b) for a in range(len(crops)) for b in range(len(crops)) if a != b]
    assert not verify(crops[[a for a, _ in pairs]], crops[[b for _, b in pairs]]).copy.any()


def test_thresholds_mean_the_same_at_28_and_500_px(photo_crops):
    """The same crops, and their one-pixel shifts, at two native sizes: the same verdicts."""
    for size in (28, 500):
        images = [c.resize((size, size), Image.BICUBIC) for c in photo_crops[:8]]
        shifted = [decoded(EDITS["shift"](i, np.random.default_rng(k))) for k, i in enumerate(images)]
        assert verify(thumbs(images), thumbs(shifted)).copy.all(), size
        others = thumbs(images[1:] + images[:1])
        assert not verify(thumbs(images), others).copy.any(), size


def test_featureless_images_are_never_verified_and_tolerance_is_checked():
    flat = np.full((2, CANONICAL, CANONICAL), 128, np.uint8)
    flat[1] += np.random.default_rng(0).integers(0, 2, (CANONICAL, CANONICAL), dtype=np.uint8)
    assert not verify(flat[:1], flat[1:]).copy.any()
    with pytest.raises(ValueError):
        verify(flat[:1], flat[1:], Tolerance(max_gain=0.5))


def test_pixel_queries_put_a_shifted_copy_first_among_look_alikes(digits28):
    images, _ = digits28
    t = thumbs(images)
    index = cand.VectorIndex(descriptors(t).shape[1], approximate=False)
    index.add(descriptors(t[100:]))
    shifted = thumbs([decoded(EDITS["shift"](i.convert("RGB"), np.random.default_rng(k)))
                      for k, i in enumerate(images[:50])])
    index.add(descriptors(shifted))  # ids 500.. are the copies of test images 0..49
    tests, ups, _ = cand.nearest(index, cand.pixel_queries(t[:50]), 3)
    found = {(int(i), int(j)) for i, j in zip(tests, ups)}
    assert all((k, 500 + k) in found for k in range(50))


def test_a_black_row_from_a_shift_does_not_hide_a_hazy_copy_from_the_index(photo_crops):
    """A shift onto a black canvas adds one dark row or column; in a low-contrast (hazy) image
    that row outweighs the picture, unless the descriptor leaves the border out."""
    hazy = [Image.fromarray((np.asarray(c, dtype=np.float32) * 0.2 + 200).astype(np.uint8)) for c in photo_crops]
    hazy = [h.resize((32, 32), Image.BICUBIC) for h in hazy]
    shifted = [h.transform(h.size, Image.AFFINE, (1, 0, -1, 0, 1, 0), fillcolor=0) for h in hazy]
    d, q = descriptors(thumbs(hazy)), descriptors(thumbs(shifted))
    assert (np.argmax(q @ d.T, axis=1) == np.arange(len(hazy))).all()


def test_two_smooth_horizons_are_not_copies_for_sharing_their_ramp():
    """The same bright-sky-over-dark-land ramp, each with its own faint texture: the contrast
    rule alone would call them copies; the residual is about their detail, so they are not."""
    rng = np.random.default_rng(0)
    rows = np.linspace(0, 1, CANONICAL)[:, None]
    ramp = 215 - 30 / (1 + np.exp(-(rows - 0.55) * 12)) + np.zeros((1, CANONICAL))
    a, b = (np.clip(ramp + rng.normal(0, 3.0, (5, *ramp.shape)), 0, 255).astype(np.uint8) for _ in range(2))
    assert not verify(a, b).copy.any()
    contrast_only = Tolerance(per_detail=100.0, min_detail_correlation=-1.0)
    assert verify(a, b, contrast_only).copy.all()  # what the contrast rule alone says
    assert not verify(a, b, Tolerance(per_detail=100.0)).copy.any()  # their detail does not agree either
    assert verify(a, a).copy.all()  # and each image is still its own copy


def hazy_pair(seed: int, pattern: float) -> tuple[np.ndarray, np.ndarray]:
    """Two crops of one hazy scene: the same ramp and fine texture, each with its own faint cloud
    (smooth structure of `pattern` grey levels)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    rows = np.linspace(0, 1, CANONICAL)[:, None]
    base = 200 - 60 / (1 + np.exp(-(rows - 0.55) * 10)) + 6 * gaussian_filter(rng.normal(size=(CANONICAL,) * 2), 1.0)
    clouds = [gaussian_filter(rng.normal(size=(CANONICAL,) * 2), 2.5) for _ in range(2)]
    return tuple(np.clip(base + c * pattern / c.std(), 0, 255).round().astype(np.uint8) for c in clouds)


@pytest.mark.parametrize("pattern", [1.0, 1.5])
def test_hazy_crops_are_told_apart_by_the_structure_of_their_residual(pattern):
    """Faint clouds that differ pass the detail bound (each uses over half of it) and are caught
    by what their residual looks like; the JPEG copy of the same image still passes."""
    a, b = hazy_pair(3, pattern)
    copy = grey_thumbnail(decoded(EDITS["jpeg"](Image.fromarray(a).convert("RGB"), np.random.default_rng(0))))
    lenient = verify(np.stack([a, a]), np.stack([b, copy]), Tolerance(max_structure=1.0))
    assert lenient.copy.tolist() == [True, True] and lenient.by_detail.all() and lenient.used[0] > 0.5
    checked = verify(np.stack([a, a]), np.stack([b, copy]))
    assert checked.copy.tolist() == [False, True]
    assert checked.structure[0] > Tolerance().max_structure


def test_the_residual_of_real_copies_is_fine_grained(photo_crops):
    """On real photographs, what each web-copy edit leaves mostly blurs away."""
    from bigtransfer.dedup.verify import residual_structure

    originals = photo_crops[:8]
    for edit in ("rescale", "jpeg", "shift"):
        copies = [decoded(EDITS[edit](c, np.random.default_rng(k))) for k, c in enumerate(originals)]
        a, b = thumbs(originals), thumbs(copies)
        structure = residual_structure(a, b, np.ones(len(a), np.float32))
        assert (structure < Tolerance().max_structure).all(), (edit, structure)


def _china_crop(box, size: int = 32) -> Image.Image:
    from sklearn.datasets import load_sample_images

    photo = load_sample_images().images[0]
    return Image.fromarray(photo[box[1]:box[3], box[0]:box[2]]).resize((size, size), Image.BICUBIC)


# Side-by-side, non-overlapping crops of china.jpg's hazy lake horizon (x0, y0, x1, y1): at 32 px
# each pair agrees on the horizon and the haze to within the residual tolerance.
HORIZON_PAIRS = [((333, 168, 383, 218), (396, 166, 451, 221)), ((458, 146, 536, 224), (330, 139, 424, 233))]


@pytest.mark.parametrize("boxes", HORIZON_PAIRS)
def test_crops_of_one_hazy_horizon_share_the_line_not_the_detail(boxes):
    """Real crops of one horizon pass on their residual alone and are told apart by their detail;
    a JPEG copy of each crop keeps its detail and still passes."""
    from bigtransfer.dedup.verify import detail_correlation

    a, b = (_china_crop(box) for box in boxes)
    copy = decoded(EDITS["jpeg"](a, np.random.default_rng(0)))
    pairs = thumbs([a, a]), thumbs([b, copy])
    residual_only = verify(*pairs, Tolerance(min_detail_correlation=-1.0, max_structure=1.0))
    assert residual_only.copy.tolist() == [True, True]
    checked = verify(*pairs)
    assert checked.copy.tolist() == [False, True]
    assert checked.detail_correlation[0] < 0.4 < Tolerance().min_detail_correlation < checked.detail_correlation[1]
    assert np.allclose(detail_correlation(*pairs, checked.scale), checked.detail_correlation)


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_the_detail_of_real_copies_agrees(edit, photo_crops, digits28):
    """Every web-copy edit keeps enough of a real image's detail, photographs and digits alike: the
    check drops no copy that the residual accepts (some crops fail on their residual already)."""
    images = photo_crops[:8] + digits28[0][:8]
    copies = [decoded(EDITS[edit](c, np.random.default_rng(k))) for k, c in enumerate(images)]
    a, b = thumbs(images), thumbs(copies)
    residual_only = verify(a, b, Tolerance(min_detail_correlation=-1.0))
    checked = verify(a, b)
    assert residual_only.copy.mean() >= (0.75 if edit in ("crop", "combined") else 1.0)
    assert np.array_equal(checked.copy, residual_only.copy), (edit, checked.detail_correlation)
    assert (checked.detail_correlation[checked.copy] >= 0.8).all()


def test_identical_hashes_and_merged_sources():
    rng = np.random.default_rng(1)
    up = rng.integers(0, 255, (6, CANONICAL, CANONICAL), dtype=np.uint8)
    down = up[[4, 4, 0]].copy()
    down[2, 0, 0] ^= 1  # one grey level off: no longer identical
    tests, ups = cand.identical(cand.thumbnail_hashes(down), cand.thumbnail_hashes(up))
    assert sorted(zip(tests.tolist(), ups.tolist())) == [(0, 4), (1, 4)]
    merged = cand.merge([(tests, ups, cand.IDENTICAL), ([0, 2, 2], [4, 0, -1], cand.PIXELS)])
    got = {(int(i), int(j)): int(s) for i, j, s in zip(merged.test, merged.upstream, merged.sources)}
    assert got == {(0, 4): cand.IDENTICAL | cand.PIXELS, (1, 4): cand.IDENTICAL, (2, 0): cand.PIXELS}
    assert cand.source_names(got[(0, 4)]) == "identical+pixels"


def test_hnsw_index_finds_what_the_exact_one_does():
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(3000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    exact, approximate = cand.VectorIndex(32, False), cand.VectorIndex(32, True)
    for index in (exact, approximate):
        for start in range(0, 3000, 1000):
            index.add(vectors[start:start + 1000])
    queries = vectors[:100] + 0.05 * rng.normal(size=(100, 32)).astype(np.float32)
    assert cand.index_recall(exact, queries, 10) is None
    assert cand.index_recall(approximate, queries, 10) > 0.9
    assert (approximate.search(queries, 1)[1][:, 0] == np.arange(100)).mean() > 0.95


def test_a_planted_vector_is_a_candidate_only_where_it_beats_the_kth_real_one():
    real = cand.VectorIndex(2, False)
    real.add(np.array([[1, 0], [0.8, 0.6], [0.6, 0.8], [0, 1]], np.float32))
    planted = cand.VectorIndex(2, False)
    planted.add(np.array([[0.96, 0.28], [0.28, 0.96]], np.float32))
    queries = [np.array([[1, 0], [0, 1]], np.float32)]
    tests, ids = cand.nearest_planted(planted, real, queries, 2)
    # query 0's 2nd real neighbour scores 0.8: planted 0 (0.96) gets in, planted 1 (0.28) does not
    assert sorted(zip(tests.tolist(), ids.tolist())) == [(0, 0), (1, 1)]


def test_self_test_plants_every_edit_and_scores_recall_and_false_pairs(digits28):
    images = [i.convert("RGB") for i in digits28[0][:20]]
    planted = plant(lambda i: images[i], np.arange(20), sample=5, seed=3)
    assert len(planted) == 5 * len(EDITS) and set(planted.edit) == set(EDITS)
    again = plant(lambda i: images[i], np.arange(20), sample=5, seed=3)
    assert again.blobs == planted.blobs and again.source.tolist() == planted.source.tolist()  # seeded
    first = [k for k in range(len(planted)) if planted.edit[k] == "jpeg"]
    tests = np.array([planted.source[first[0]], planted.source[first[1]], (planted.source[first[1]] + 1) % 20])
    copies = np.array([first[0], first[1], first[1]])
    result = score(planted, tests, copies)
    assert result["per_edit"]["jpeg"] == {"planted": 5, "found": 2, "recall": 0.4, "false_pairs": 1}
    assert result["per_edit"]["copy"]["found"] == 0 and result["overall"]["planted"] == 5 * len(EDITS)
    assert len(result["missed"]) == 5 * len(EDITS) - 2


def _horizon(seed: int) -> Image.Image:
    """256 px: a bright sky over a darker ground, with a fine texture of its own (like hazy hills)."""
    from PIL import ImageFilter

    rng = np.random.default_rng(seed)
    base = np.where(np.arange(256)[:, None] < 128, 200.0, 110.0) + np.zeros((1, 256))
    noise = Image.fromarray(rng.normal(128, 60, (256, 256)).clip(0, 255).astype(np.uint8))
    texture = np.asarray(noise.filter(ImageFilter.GaussianBlur(2)), float) - 128
    return Image.fromarray(np.clip(base + 1.5 * texture, 0, 255).astype(np.uint8))


def test_large_look_alikes_that_agree_at_32_px_are_told_apart_at_64():
    from bigtransfer.dedup.pipeline import FINE, decide, fine_check

    a, b = _horizon(1), _horizon(2)
    buffer = io.BytesIO()
    a.save(buffer, format="JPEG", quality=70)
    images = [a, b, decoded(buffer.getvalue())]  # test image, a look-alike, a copy
    # At 32 x 32, by residual alone, both pass: the texture is finer than that. (The detail
    # agreement check already catches this look-alike there; it is off here to test the 64 px check.)
    coarse = verify(thumbs(images[:1] * 2), thumbs(images[1:]), Tolerance(min_detail_correlation=-1.0))
    assert coarse.copy.all()
    assert verify(thumbs(images[:1] * 2), thumbs(images[1:])).copy.tolist() == [False, True]
    pairs = cand.Candidates(np.array([0, 0]), np.array([1, 2]), np.array([cand.PIXELS, cand.PIXELS]))
    sides = np.array([256, 256, 256])
    kept, dropped = fine_check(decide(pairs, coarse), lambda i: images[i], lambda j: images[j], sides, sides,
                               Tolerance())
    assert dropped == 1 and kept.pairs.upstream.tolist() == [2] and kept.fine.tolist() == ["passed"]
    small = np.array([FINE - 1, FINE - 1, FINE - 1])  # below the fine size the first verdict stands
    kept, dropped = fine_check(decide(pairs, coarse), lambda i: images[i], lambda j: images[j], small, small,
                               Tolerance())
    assert dropped == 0 and len(kept.stage) == 2
