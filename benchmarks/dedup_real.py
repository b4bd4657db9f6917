"""Near-duplicates of real images: precision and recall per web-copy edit, at small and
large sizes, with a class-trained and a pre-trained embedding, and the self-test's estimate beside
the measured recall.

Real images the tests can use, each split into a TUNING half and a REPORT half that share no image:

* digits: scikit-learn's 1797 handwritten digits (8x8), upscaled to 28 px (small) or 224 px
  (large), grey PNG files. A fixed permutation gives 899 tuning and 898 report digits. Of the
  report digits, 300 are test images (100 of them are copied into the upstream folder) and 598
  stay upstream beside 1500 procedural glyphs: the other digits are the hard negatives (distinct
  images of the same class; sklearn's digits even hold hundreds of near-identical "1"s).
* photos: square crops of scikit-learn's two sample photographs (china.jpg, flower.jpg) at random
  places, no two of a photo overlapping by more than IoU 0.5 (overlapping crops of one scene are
  the hard negatives), kept when they have some content (grey standard deviation >= 10 at 32x32;
  the rest is sky and out-of-focus background). Small: crops 32-256 px wide resized to 32 px.
  Large: crops 80-320 px wide resized to 224 px (at most 2.8x upscaled; these are the test
  images), plus the small crops upscaled to 224 px as more negatives. Tuning crops come from the
  photos' left 192 columns, report crops from the other 448. Where a half has too few crops for
  100 copies and 200 controls, two thirds of them are test images and half of those are copied.

For each case (data x size), 100 test images are copied with each edit by THIS script's own
implementation of the edits (not dedup's: edits.py is what the self-test uses), written as
files, and listed in an upstream manifest with the negatives; then, per embedding, `run_dedup`
runs on it as a user would run `bigtransfer dedup` (default tolerances, self-test on). Per edit:
recall = copies found with their test image / copies planted; precision = those / (those + false
pairs), where every false pair with a real upstream image is charged to every edit, and a false
pair with a copy to that copy's edit.

Embeddings: "pre-trained" is R14x0.5 pre-trained for one epoch on the procedural glyphs
(bigtransfer pretrain); "class-trained" is that model fine-tuned (bigtransfer finetune, 40 steps)
on the data's own classes: the digits' ten classes, or for photos which photograph a crop is from.

    python benchmarks/dedup_real.py --tune   # tolerance grid on the tuning halves -> results/dedup_tune.*
    python benchmarks/dedup_real.py --consistency   # the faint-match check on them -> results/dedup_consistency.*
    python benchmarks/dedup_real.py --structure   # faint matches' residual structure on them -> results/dedup_structure.*
    python benchmarks/dedup_real.py --agreement   # matches' detail agreement on them -> results/dedup_agreement.*
    python benchmarks/dedup_real.py          # the report halves -> results/dedup_real.{json,md}
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance

from bigtransfer.dedup import DedupOptions, Tolerance, run_dedup
from bigtransfer.dedup.pixels import contrast, grey_thumbnail

RESULTS = Path(__file__).parent / "results"
SIZES = {"digits": {"small": 28, "large": 224}, "photos": {"small": 32, "large": 224},
         "more-photos": {"small": 32, "large": 224}}
ISSUE_EDITS = ("rename", "rescale", "shift", "brightness", "jpeg", "grey_rgb")
EDITS = (*ISSUE_EDITS, "crop", "combined")
SELF_TEST_NAME = {"rename": "copy"}  # this script's edit -> the self-test's name for the same edit
COPIED, CONTROLS = 100, 200  # test images with a planted copy (fewer where a half has too few), without
MAX_IOU = 0.5  # two crops of a photo overlap at most this much (more: one is nearly a crop of the other)
REPORT_SEED = 3  # the report's draw: crops, test images, copies (seeds 1-2 were looked at while building)
TUNE_COLUMNS = 192  # photo crops for tuning come from the photos' left 192 columns, report crops from the rest
MORE_PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "moon", "rocket", "hubble_deep_field",
               "brick", "grass", "gravel")  # scikit-image's bundled photographs (tuning only)
PHOTO_NAMES = {"photos": ("china", "flower"), "more-photos": MORE_PHOTOS}


# --------------------------------------------------------------------------- the images
def digits_half(half: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [N, 8, 8] digits, labels) of the tuning or the report half."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    order = np.random.default_rng(15).permutation(len(bunch.images))
    chosen = order[:899] if half == "tune" else order[899:]
    return np.round(bunch.images[chosen] * (255 / 16)).astype(np.uint8), bunch.target[chosen]


def _iou(a, b) -> float:
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def sample_photos(data: str) -> list[np.ndarray]:
    """RGB uint8 photographs: scikit-learn's two ("photos") or scikit-image's bundled real ones
    ("more-photos": portraits, a cat, coffee, coins, the moon, a rocket on a sky, a deep field,
    and three textures), which only the tuning uses: they show failures sklearn's two cannot."""
    if data == "photos":
        from sklearn.datasets import load_sample_images

        return load_sample_images().images
    try:
        import skimage.data
    except ImportError:
        sys.exit("the more-photos tuning data needs scikit-image: pip install -e '.[bench]'")
    photos = [getattr(skimage.data, name)() for name in MORE_PHOTOS]
    return [np.repeat(p[..., None], 3, axis=2) if p.ndim == 2 else p[..., :3] for p in photos]


def photo_crops(photos: list[np.ndarray], half: str, large: bool, seed: int,
                data: str = "photos") -> list[tuple[int, tuple[int, int, int, int]]]:
    """(photo, box) of crops with content, none overlapping another of its photo by IoU > 0.5.
    Small: 32-256 px wide; large (to be shown at 224 px, at most 2.8x upscaled): 80-320 px.
    sklearn's photos are split by columns into the halves; scikit-image's are all tuning."""
    low, high = (80, 320) if large else (32, 256)
    rng = np.random.default_rng(seed)
    boxes: list[tuple[int, tuple[int, int, int, int]]] = []
    for _ in range(30000 * (1 if data == "photos" else 3)):
        p = int(rng.integers(len(photos)))
        height, width = photos[p].shape[:2]
        x0, x1 = (0, width) if data != "photos" else (0, TUNE_COLUMNS) if half == "tune" else (TUNE_COLUMNS, width)
        side = round(math.exp(rng.uniform(math.log(low), math.log(high))))
        if side >= min(x1 - x0, height):
            continue
        x, y = int(rng.integers(x0, x1 - side)), int(rng.integers(0, height - side))
        box = (x, y, x + side, y + side)
        if any(q == p and _iou(box, b) > MAX_IOU for q, b in boxes):
            continue
        boxes.append((p, box))
    return [(p, b) for p, b in boxes if contrast(grey_thumbnail(_crop(photos, p, b))[None])[0] >= 10]


def _crop(photos, p: int, box) -> Image.Image:
    return Image.fromarray(photos[p][box[1]:box[3], box[0]:box[2]])


def photo_image(photos: list[np.ndarray], p: int, box, size: int) -> Image.Image:
    return _crop(photos, p, box).resize((size, size), Image.BICUBIC)


def data_set(data: str, half: str, size: int, draw: int = REPORT_SEED) -> tuple[list[Image.Image], list[str], np.ndarray]:
    """(images, class names, eligible test indexes) of one half of a data set at one size (the report
    half's photo crops are drawn with seed `draw`)."""
    if data == "digits":
        pixels, labels = digits_half(half)
        images = [Image.fromarray(d).resize((size, size), Image.BILINEAR) for d in pixels]
        return images, [str(c) for c in labels], np.arange(len(images))
    if data == "more-photos" and half != "tune":
        raise ValueError("scikit-image's photographs are tuning data only")
    large = size >= 224
    seed = draw if half == "report" else 1
    photos = sample_photos(data)
    crops = photo_crops(photos, half, large, seed, data)
    if large:  # the small crops too, upscaled, as more negatives: the same scenes at other scales
        crops += [(p, b) for p, b in photo_crops(photos, half, False, seed + 1, data)
                  if not any(q == p and _iou(b, c) > MAX_IOU for q, c in crops)]
    images = [photo_image(photos, p, b, size) for p, b in crops]
    names = [PHOTO_NAMES[data][p] for p, _ in crops]
    eligible = [k for k, (_, b) in enumerate(crops) if not large or b[2] - b[0] >= 80]
    return images, names, np.asarray(eligible)


def distractors(size: int, count: int = 1500) -> list[Image.Image]:
    """Procedural glyphs (easy negatives that make the upstream folder bigger)."""
    from bigtransfer.data.procedural import glyphs

    g = glyphs(100, count // 100, 0, 32, seed=7, progress=False).train
    return [Image.fromarray(g.pixels[g.rows[i], :, :, 0]).resize((size, size), Image.BILINEAR) for i in range(len(g))]


# --------------------------------------------------------------------------- this script's web copies
def web_copy(image: Image.Image, edit: str, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """(edited image, file suffix): the benchmark's own implementation of each edit."""
    w, h = image.size
    if edit == "rename":
        return image, ".png"
    if edit == "rescale":  # "upscaled by a few pixels and back"
        grow = int(rng.integers(2, 6))
        return image.resize((w + grow, h + grow), Image.LANCZOS).resize((w, h), Image.BICUBIC), ".png"
    if edit == "shift":  # one pixel, the uncovered row/column black
        dx, dy = [(1, 0), (-1, 0), (0, 1), (0, -1)][int(rng.integers(4))]
        return image.transform((w, h), Image.AFFINE, (1, 0, -dx, 0, 1, -dy), fillcolor=0), ".png"
    if edit == "brightness":
        return ImageEnhance.Brightness(image).enhance(float(rng.uniform(1.05, 1.15))), ".png"
    if edit == "jpeg":
        return image, ".jpg"  # written at quality 70
    if edit == "grey_rgb":
        return (image.convert("RGB") if image.mode == "L" else image.convert("L")), ".png"
    if edit == "crop":  # a few percent off each side, back to the original size
        l, t, r, b = (rng.uniform(0.02, 0.07, 4) * [w, h, w, h]).astype(int)
        return image.crop((l, t, w - r, h - b)).resize((w, h), Image.LANCZOS), ".png"
    if edit == "combined":  # rescaled, shifted, brighter, grey/RGB, then JPEG 70
        for step in ("rescale", "shift", "brightness", "grey_rgb"):
            image, _ = web_copy(image, step, rng)
        return image, ".jpg"
    raise ValueError(edit)


def save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jpg":
        image.convert("RGB" if image.mode not in ("L", "RGB") else image.mode).save(path, quality=70)
    else:
        image.save(path)


# --------------------------------------------------------------------------- models
def build_models(work: Path, progress: bool) -> dict[str, Path]:
    """The pre-trained model and one class-trained model per data set (built once, then reused)."""
    from bigtransfer.recipes.finetune import FinetuneOptions, run_finetune
    from bigtransfer.recipes.pretrain import PretrainOptions, run_pretrain

    models = {"pre-trained": work / "models" / "pretrained"}
    if not (models["pre-trained"] / "final.safetensors").is_file():
        run_pretrain(PretrainOptions(data="glyphs", model="R14x0.5", out=models["pre-trained"], recipe="bit-s",
                                     resolution=32, batch=128, epochs=1.0, base_lr=0.1, min_crop_area=0.35,
                                     workers=1, progress=progress))
    common = {"model": str(models["pre-trained"]), "batch": 64, "steps": 40, "base_lr": 0.03, "resolution": (36, 32),
                  "flip": False, "workers": 1, "progress": progress}
    models["class-trained digits"] = work / "models" / "digits"
    if not (models["class-trained digits"] / "final.safetensors").is_file():
        run_finetune(FinetuneOptions(data="digits", out=models["class-trained digits"], **common))
    models["class-trained photos"] = work / "models" / "photos"
    if not (models["class-trained photos"] / "final.safetensors").is_file():
        folder = work / "models" / "photo-crops"
        images, names, _ = data_set("photos", "report", 32)
        for k, (image, name) in enumerate(zip(images, names)):
            save(image, folder / name / f"crop{k:05d}.png")
        run_finetune(FinetuneOptions(data=str(folder), val_fraction=0.2, out=models["class-trained photos"], **common))
    return models


def model_for(models: dict[str, Path], embedding: str, data: str) -> Path:
    return models["pre-trained"] if embedding == "pre-trained" else models[f"class-trained {data}"]


# --------------------------------------------------------------------------- one case
def write_case(root: Path, data: str, half: str, size: int, seed: int) -> dict:
    """Test folder, negatives and the test images to copy, on disk under `root`."""
    images, names, eligible = data_set(data, half, size, draw=seed)
    rng = np.random.default_rng([seed, size])
    test_ids = rng.choice(eligible, size=min(COPIED + CONTROLS, len(eligible) * 2 // 3), replace=False)
    copied = test_ids[:min(COPIED, len(test_ids) // 2)]
    negatives = []
    for k, (image, name) in enumerate(zip(images, names)):
        if k in set(test_ids.tolist()):
            save(image, root / "test" / name / f"test{k:05d}.png")
        else:
            path = root / "negatives" / name / f"img{k:05d}.png"
            save(image, path)
            negatives.append((str(path), name))
    if data == "digits":
        for k, image in enumerate(distractors(size)):
            path = root / "negatives" / "glyph" / f"glyph{k:05d}.png"
            save(image, path)
            negatives.append((str(path), "glyph"))
    return {"images": images, "names": names, "copied": copied, "negatives": negatives,
            "test_count": len(test_ids), "negative_count": len(negatives)}


def plant_copies(root: Path, case: dict, edit: str, seed: int) -> tuple[list[tuple[str, str]], set[tuple[str, str]]]:
    """This script's copies of the chosen test images for one edit, as (path, label) manifest rows,
    and the true (test image, copy) pairs."""
    rng = np.random.default_rng([seed, EDITS.index(edit)])
    rows, truth = [], set()
    for k in case["copied"].tolist():
        name = case["names"][k]
        original = root / "test" / name / f"test{k:05d}.png"
        copy, suffix = web_copy(case["images"][k], edit, rng)
        path = root / edit / name / f"web{k:05d}_{rng.integers(1 << 30):x}{suffix}"  # renamed
        if edit == "rename":
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(original, path)
        else:
            save(copy, path)
        rows.append((str(path), name))
        truth.add((str(original), str(path)))
    return rows, truth


def write_manifest(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label"), *rows])
    return path


def run_cases(work: Path, models: dict[str, Path], progress: bool, only: str | None,
              reuse: bool = False, draw: int = REPORT_SEED) -> list[dict]:
    """Per (data, size, embedding, edit): one run on the report half with that edit's copies planted
    (crops, test images and copies drawn with seed `draw`)."""
    results = []
    for data, size_name in itertools.product(("digits", "photos"), ("small", "large")):
        size = SIZES[data][size_name]
        labels = [f"{data}/{size_name}/{embedding}" for embedding in ("class-trained", "pre-trained")]
        if only and not any(only in label for label in labels):
            continue
        tag = "" if draw == REPORT_SEED else f"-draw{draw}"
        root = work / "cases" / f"{data}-{size}{tag}"
        if root.exists():
            shutil.rmtree(root)
        case = write_case(root, data, "report", size, seed=draw)
        planted = {edit: plant_copies(root, case, edit, seed=draw) for edit in EDITS}
        for embedding, label in zip(("class-trained", "pre-trained"), labels):
            if only and only not in label:
                continue
            for e, edit in enumerate(EDITS):
                rows, truth = planted[edit]
                manifest = write_manifest(root / f"upstream_{edit}.csv", case["negatives"] + rows)
                out = work / "out" / f"{data}-{size}-{embedding}-{edit}{tag}"
                if reuse and (out / "summary.json").is_file():  # finished by an earlier, interrupted report
                    summary = json.loads((out / "summary.json").read_text())
                else:
                    if out.exists():
                        shutil.rmtree(out)
                    summary = run_dedup(DedupOptions(
                        upstream=str(manifest), downstream=(str(root / "test"),), out=out,
                        model=str(model_for(models, embedding, data)), resolution=64, self_test=100, seed=e,
                        progress=progress))
                with open(out / "pairs.csv", newline="") as fh:
                    found = {(r["downstream_path"], r["upstream_path"]) for r in csv.DictReader(fh)}
                hits = len(found & truth)
                r = {"data": data, "size": size, "size_name": size_name, "embedding": embedding, "edit": edit,
                     "planted": len(truth), "pairs": len(found), "correct": hits,
                     "precision": hits / len(found) if found else 1.0, "recall": hits / len(truth),
                     "test_images": case["test_count"], "upstream_images": summary["upstream_images"],
                     "pairs_by_stage": summary["pairs_by_stage"], "dropped_at_64px": summary["dropped_at_64px"],
                     "featureless_test_images": summary["featureless_test_images"],
                     "self_test": summary["self_test"]["per_edit"], "seconds": summary["seconds"]["total"]}
                results.append(r)
                print(f"{label:<30} {edit:<10} precision {r['precision']:.3f} recall {r['recall']:.3f} "
                      f"({hits}/{len(truth)}, {len(found)} pairs) {r['seconds']:.0f}s", flush=True)
    return results


# --------------------------------------------------------------------------- tables
def self_test_estimate(rows: list[dict], edit: str) -> float:
    """The self-test's recall for an edit, pooled over a case's runs (each run tests every edit)."""
    name = SELF_TEST_NAME.get(edit, edit)
    return sum(r["self_test"][name]["found"] for r in rows) / sum(r["self_test"][name]["planted"] for r in rows)


def tables(results: list[dict]) -> list[str]:
    cases = list(dict.fromkeys((r["data"], r["size"], r["embedding"]) for r in results))
    per = {c: {r["edit"]: r for r in results if (r["data"], r["size"], r["embedding"]) == c} for c in cases}
    head = ["| data | size | embedding | copies per edit | " + " | ".join(EDITS) + " |",
            "|---|---|---|---|" + "---|" * len(EDITS)]
    lines = ["Precision / recall per edit (one run per edit):", "", *head]
    for (data, size, embedding), runs in per.items():
        lines.append(f"| {data} | {size} px | {embedding} | {runs[EDITS[0]]['planted']} | "
                     + " | ".join(f"{runs[e]['precision']:.2f} / {runs[e]['recall']:.2f}" if e in runs else "-"
                                  for e in EDITS) + " |")
    lines += ["", ("Self-test estimate of recall (pooled over the case's 8 runs, 100 test images x 8 edits each) vs "
              "measured recall; in brackets, estimate - measured in points:"), "", *head]
    for (data, size, embedding), runs in per.items():
        cells = []
        for edit in EDITS:
            if edit not in runs:
                cells.append("-")
                continue
            estimate = self_test_estimate(list(runs.values()), edit)
            cells.append(f"{estimate:.2f} vs {runs[edit]['recall']:.2f} ({100 * (estimate - runs[edit]['recall']):+.0f})")
        lines.append(f"| {data} | {size} px | {embedding} | {runs[EDITS[0]]['planted']} | " + " | ".join(cells) + " |")
    lines += ["", ("| data | size | embedding | test images | upstream images (with the copies) | false pairs per run "
              "(min-max) | dropped by the 64 px check | featureless test images | dedup wall time per run |"),
              "|---|---|---|---|---|---|---|---|---|"]
    for (data, size, embedding), runs in per.items():
        rs = list(runs.values())
        false = [r["pairs"] - r["correct"] for r in rs]
        lines.append(f"| {data} | {size} px | {embedding} | {rs[0]['test_images']} | {rs[0]['upstream_images']} | "
                     f"{min(false)}-{max(false)} | {min(r['dropped_at_64px'] for r in rs)}-"
                     f"{max(r['dropped_at_64px'] for r in rs)} | {rs[0]['featureless_test_images']} | "
                     f"{np.median([r['seconds'] for r in rs]):.0f} s |")
    return lines


# --------------------------------------------------------------------------- tuning
LAYERS = ("stage1", "stage2", "stage3", "stage4", "pre-logits")


def embedding_coverage(models, data, upstream, tests, truth, opts) -> dict:
    """Per embedding and layer: the share of true pairs among each test image's 10 nearest."""
    from bigtransfer.dedup import pipeline

    device = torch.device("cpu")
    out = {}
    for embedding in ("class-trained", "pre-trained"):
        net = pipeline.embedding_model(str(model_for(models, embedding, data)), device)
        out[embedding] = {}
        for layer in LAYERS:
            embedder = pipeline.Embedder(net, layer, opts.resolution, device)
            index = pipeline.cand.VectorIndex(embedder.dim, approximate=False)
            index.add(pipeline.extract(upstream, embedder).embeddings)
            _, ids = index.search(pipeline.extract(tests.sets[0], embedder).embeddings, opts.neighbours)
            near = {(tests.describe(i), upstream.paths[j]) for i, row in enumerate(ids) for j in row if j >= 0}
            out[embedding][layer] = len(near & truth) / len(truth)
    return out


@dataclass
class Searched:
    """A tuning half with some edits' copies planted at once, searched as dedup searches it."""

    case: dict
    truth: set
    opts: DedupOptions
    upstream: object  # ImageSet
    tests: object  # pipeline.TestImages
    down: object  # Features of the test images
    up: object  # pipeline.Upstream
    pairs: object  # candidates.Candidates


def search_tuning_half(root: Path, data: str, size: int, edits, model: Path, progress: bool) -> Searched:
    from bigtransfer.dedup import pipeline

    if root.exists():
        shutil.rmtree(root)
    case = write_case(root, data, "tune", size, seed=0)
    rows, truth = list(case["negatives"]), set()
    for edit in edits:
        copies, t = plant_copies(root, case, edit, seed=0)
        rows += copies
        truth |= t
    opts = DedupOptions(upstream=str(write_manifest(root / "upstream.csv", rows)), downstream=(str(root / "test"),),
                        model=str(model), resolution=64, progress=progress)
    upstream, _ = pipeline.upstream_files(opts.upstream)
    tests = pipeline.TestImages(opts.downstream)
    device = torch.device("cpu")
    embedder = pipeline.Embedder(pipeline.embedding_model(opts.model, device), opts.embedding_layer,
                                 opts.resolution, device)
    down = pipeline.extract(tests.sets[0], embedder)
    up = pipeline._index_upstream(upstream, embedder, opts, approximate=False)
    pairs = pipeline._real_candidates(down, up, pipeline.cand.pixel_queries(down.thumbnails), opts.neighbours)
    return Searched(case, truth, opts, upstream, tests, down, up, pairs)


def planted_pairs(run: Searched, test: np.ndarray, upstream: np.ndarray) -> np.ndarray:
    """bool [P]: which pairs (test image, upstream image) of a searched half are a planted copy."""
    return np.array([(run.tests.describe(int(i)), run.upstream.paths[int(j)]) in run.truth
                     for i, j in zip(test, upstream)], bool)


def tune(work: Path, models: dict[str, Path], progress: bool) -> None:
    """Score a grid of tolerances on the tuning halves (all edits planted at once, one run's
    candidates verified under every tolerance) and write results/dedup_tune.{json,md}. It
    scores the pixel check alone; the consistency check after it has its own study."""
    from bigtransfer.dedup import pipeline
    from bigtransfer.dedup.candidates import Candidates

    grid = list(itertools.product((0.08, 0.10, 0.12), (0.5, 1.0), (1.0, 2.0)))
    scored = {g: [] for g in grid}
    layers = {}
    for data, size_name in itertools.product(("digits", "photos"), ("small", "large")):
        size = SIZES[data][size_name]
        run = search_tuning_half(work / "tune" / f"{data}-{size}", data, size, ISSUE_EDITS,
                                 model_for(models, "class-trained", data), progress)
        case, truth, opts, upstream, tests, down, up = (run.case, run.truth, run.opts, run.upstream, run.tests,
                                                         run.down, run.up)
        pairs: Candidates = run.pairs
        true_pairs = {(tests.describe(int(i)), upstream.paths[int(j)]) for i, j in zip(pairs.test, pairs.upstream)}
        edit_of = {p: Path(p).parts[-3] for _, p in truth}
        if size_name == "small":
            layers[f"{data}/{size}"] = embedding_coverage(models, data, upstream, tests, truth, opts)
        for g in grid:
            tol = Tolerance(relative=g[0], absolute=g[1], min_detail=g[2])
            found = pipeline.decide(pairs, pipeline._verify(pairs, down.thumbnails, up.thumbnails, tol))
            found, _ = pipeline.fine_check(found, tests.load, upstream.load, down.sides, up.sides, tol)
            got = {(tests.describe(int(i)), upstream.paths[int(j)]) for i, j in zip(found.pairs.test,
                                                                                    found.pairs.upstream)}
            hits = got & truth
            recall = {e: sum(edit_of[p] == e for _, p in hits) / len(case["copied"]) for e in ISSUE_EDITS}
            scored[g].append({"data": data, "size": size, "copied": len(case["copied"]), "pairs": len(got),
                              "correct": len(hits),
                              "precision": len(hits) / max(1, len(got)), "recall": recall,
                              "candidates_cover": len(truth & true_pairs) / len(truth)})
    rows = []
    for g, per in scored.items():
        worst_recall = min(min(s["recall"].values()) for s in per)
        worst_precision = min(s["precision"] for s in per)
        rows.append({"relative": g[0], "absolute": g[1], "min_detail": g[2], "worst_precision": worst_precision,
                     "worst_recall": worst_recall, "cases": per})
    best = max(rows, key=lambda r: (r["worst_precision"] >= 0.97, r["worst_recall"], r["worst_precision"]))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dedup_tune.json").write_text(json.dumps({"command": " ".join(["python", *sys.argv]),
                                                         "chosen": {k: best[k] for k in ("relative", "absolute",
                                                                                         "min_detail")},
                                                         "embedding_coverage": layers, "grid": rows},
                                                        indent=2) + "\n")
    lines = [("Tolerance grid on the TUNING halves (digits 899, photo crops from the left 192 columns); all six "
             "edits planted at once (100 copies each), class-trained embedding. Chosen: the largest worst-case "
             "recall with every precision >= 0.97."), "", f"`{' '.join(['python', *sys.argv])}`", "",
             "| relative | absolute | min detail | worst precision | worst recall (over data, size, edit) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['relative']} | {r['absolute']} | {r['min_detail']} | {r['worst_precision']:.3f} | "
              f"{r['worst_recall']:.2f} |" for r in rows]
    lines += ["", f"chosen: relative {best['relative']}, absolute {best['absolute']}, min detail {best['min_detail']}",
              "", ("Share of the planted copies among a test image's 10 nearest by the embedding alone, per layer "
              "(pixel candidates aside):"), "", "| case | embedding | " + " | ".join(LAYERS) + " |",
              "|---|---|" + "---|" * len(LAYERS)]
    for case, per in layers.items():
        for embedding, cover in per.items():
            lines.append(f"| {case} | {embedding} | " + " | ".join(f"{cover[layer]:.2f}" for layer in LAYERS) + " |")
    (RESULTS / "dedup_tune.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def consistency_study(work: Path, models: dict[str, Path], progress: bool) -> None:
    """The check that an image's faint matches agree (dedup/consistency.py), on the tuning halves
    and scikit-image's photographs: every edit but the two that keep the thumbnail identical is
    planted at once, so each copied test image has several copies made with different edits, and
    the check is scored as dedup makes it (faint matches only) and applied to every match."""
    from bigtransfer.dedup import pipeline
    from bigtransfer.dedup.consistency import consistent

    edits = [e for e in EDITS if e not in ("rename", "grey_rgb")]
    rows = []
    for data, size_name in itertools.product(("digits", "photos", "more-photos"), ("small", "large")):
        size = SIZES[data][size_name]
        embedding = "pre-trained" if data == "more-photos" else "class-trained"  # no classes to train on there
        run = search_tuning_half(work / "consistency" / f"{data}-{size}", data, size, edits,
                                 model_for(models, embedding, data), progress)
        truth, opts, upstream, tests, down, up, pairs = (run.truth, run.opts, run.upstream, run.tests, run.down,
                                                         run.up, run.pairs)
        found = pipeline.decide(pairs, pipeline._verify(pairs, down.thumbnails, up.thumbnails, opts.tolerance))
        found, _ = pipeline.fine_check(found, tests.load, upstream.load, down.sides, up.sides, opts.tolerance)
        t, u = found.pairs.test, found.pairs.upstream
        true = planted_pairs(run, t, u)
        grouped = np.bincount(t, minlength=len(tests))[t] > 1
        faint = found.verdicts.by_detail
        row = {"data": data, "size": size, "copies": len(truth), "found": len(t), "true": int(true.sum()),
               "true_in_groups": int((true & grouped).sum()), "faint_true_in_groups": int((true & grouped & faint).sum()),
               "faint_false": int((~true & faint).sum())}
        for name, held in (("dedup", faint), ("every_match", np.ones(len(t), bool))):
            keep = consistent(t, u, found.verdicts.used, held, found.stage == "identical", down.thumbnails,
                              up.thumbnails, opts.tolerance)
            row[name] = {"true_dropped": int((true & ~keep).sum()), "false_dropped": int((~true & ~keep).sum()),
                         "false_found": int((~true).sum())}
        rows.append(row)
        print(row, flush=True)
    RESULTS.mkdir(exist_ok=True)
    command = " ".join(["python", *sys.argv])
    (RESULTS / "dedup_consistency.json").write_text(json.dumps({"command": command, "edits": edits, "cases": rows},
                                                               indent=2) + "\n")
    lines = [("The check that a test image's faint matches agree with one another, on the TUNING halves "
              f"(and scikit-image's photographs): {', '.join(edits)} planted at once, 100 copies each, "
              "class-trained embedding (pre-trained for scikit-image's), default tolerances."), "",
             f"`{command}`", "",
             ("| data | size | true copies found | of them in groups | faint, in groups | faint false pairs | "
              "dedup's check: true / false dropped | checking every match: true / false dropped |"),
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['data']} | {r['size']} px | {r['true']} | {r['true_in_groups']} | {r['faint_true_in_groups']} | "
              f"{r['faint_false']} | {r['dedup']['true_dropped']} / {r['dedup']['false_dropped']} of "
              f"{r['dedup']['false_found']} | {r['every_match']['true_dropped']} / {r['every_match']['false_dropped']} |"
              for r in rows]
    (RESULTS / "dedup_consistency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def structure_study(work: Path, models: dict[str, Path], progress: bool) -> None:
    """How much of a faint match's residual survives a blur (verify.residual_structure), on the
    TUNING halves and scikit-image's photographs at the small size, for the true copies of every
    edit and for the near misses (different images within 1.5x of the tolerance): the numbers
    behind Tolerance.max_structure. Written to results/dedup_structure.{json,md}."""
    from bigtransfer.dedup import pipeline
    from bigtransfer.dedup.verify import residual_structure

    edits = [e for e in EDITS if e != "rename"]
    tol = Tolerance()
    rows = []
    for data in ("photos", "more-photos"):
        size = SIZES[data]["small"]
        embedding = "pre-trained" if data == "more-photos" else "class-trained"
        run = search_tuning_half(work / "structure" / f"{data}-{size}", data, size, edits,
                                 model_for(models, embedding, data), progress)
        t, u = run.pairs.test, run.pairs.upstream
        strict = pipeline._verify(run.pairs, run.down.thumbnails, run.up.thumbnails, replace(tol, max_structure=1.0))
        true = planted_pairs(run, t, u)
        # the faint true copies the check is asked about, and faint different images that came close
        faint = strict.by_detail & ~strict.featureless
        asked = faint & np.where(true, strict.copy & (strict.used > tol.structure_from), strict.used <= 1.5)
        structure = residual_structure(run.down.thumbnails[t[asked]], run.up.thumbnails[u[asked]], strict.scale[asked])
        for k, p in enumerate(np.flatnonzero(asked)):
            edit = Path(run.upstream.paths[int(u[p])]).parts[-3] if true[p] else "different image"
            rows.append({"data": data, "size": size, "edit": edit, "used": round(float(strict.used[p]), 3),
                         "structure": round(float(structure[k]), 3)})
    RESULTS.mkdir(exist_ok=True)
    command = " ".join(["python", *sys.argv])
    (RESULTS / "dedup_structure.json").write_text(json.dumps({"command": command, "pairs": rows}, indent=2) + "\n")
    lines = [("Share of a faint match's residual that survives a 1.5 px blur, on the TUNING halves (and "
              "scikit-image's photographs), small size, all edits planted at once: true copies that use over "
              f"half of their allowed residual, and different images within 1.5x of the tolerance. dedup asks "
              f"for at most {tol.max_structure}."), "", f"`{command}`", "",
             "| data | pairs | count | structure min | median | max |", "|---|---|---|---|---|---|"]
    for data in ("photos", "more-photos"):
        for edit in [*edits, "different image"]:
            values = [r["structure"] for r in rows if r["data"] == data and r["edit"] == edit]
            if values:
                lines.append(f"| {data} | {edit} | {len(values)} | {min(values):.2f} | "
                             f"{statistics.median(values):.2f} | {max(values):.2f} |")
    (RESULTS / "dedup_structure.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def agreement_study(work: Path, models: dict[str, Path], progress: bool) -> None:
    """How well the fine detail of a match agrees (verify.detail_correlation), on the TUNING halves
    and scikit-image's photographs at both sizes, for every match the residual checks accept
    (true copies of every edit but rename, planted at once, and different images): the numbers
    behind Tolerance.min_detail_correlation. Written to results/dedup_agreement.{json,md}."""
    from bigtransfer.dedup import pipeline
    from bigtransfer.dedup.verify import detail_correlation

    edits = [e for e in EDITS if e != "rename"]
    threshold = Tolerance().min_detail_correlation
    rows = []
    for data, size_name in itertools.product(("digits", "photos", "more-photos"), ("small", "large")):
        size = SIZES[data][size_name]
        embedding = "pre-trained" if data == "more-photos" else "class-trained"
        run = search_tuning_half(work / "agreement" / f"{data}-{size}", data, size, edits,
                                 model_for(models, embedding, data), progress)
        t, u = run.pairs.test, run.pairs.upstream
        residual_only = pipeline._verify(run.pairs, run.down.thumbnails, run.up.thumbnails,
                                         Tolerance(min_detail_correlation=-1.0))
        true = planted_pairs(run, t, u)
        found = np.flatnonzero(residual_only.copy)
        agreement = detail_correlation(run.down.thumbnails[t[found]], run.up.thumbnails[u[found]],
                                       residual_only.scale[found])
        copies, others = agreement[true[found]], agreement[~true[found]]
        rows.append({"data": data, "size": size, "planted": len(run.truth), "true_found": len(copies),
                     "true_agreement": sorted(round(float(v), 3) for v in copies),
                     "different_agreement": sorted(round(float(v), 3) for v in others)})
        print(data, size, len(copies), float(copies.min()) if len(copies) else None, np.round(np.sort(others), 2),
              flush=True)
    RESULTS.mkdir(exist_ok=True)
    command = " ".join(["python", *sys.argv])
    (RESULTS / "dedup_agreement.json").write_text(json.dumps({"command": command, "threshold": threshold,
                                                              "cases": rows}, indent=2) + "\n")
    lines = [("Correlation of a match's fine detail, less the line profile that explains most of it, at its best "
              "alignment, on the TUNING halves (and scikit-image's photographs), every edit but rename planted at "
              "once (100 copies each): every pair the residual checks accept. dedup asks for at least "
              f"{threshold}."), "", f"`{command}`", "",
             ("| data | size | true copies accepted | their agreement: min | 0.5th percentile | median | "
              f"dropped at {threshold} | different images accepted | their agreement | dropped at {threshold} |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c, o = np.asarray(r["true_agreement"]), r["different_agreement"]
        lines.append(f"| {r['data']} | {r['size']} px | {len(c)} of {r['planted']} | {c.min():.2f} | "
                     f"{np.percentile(c, 0.5):.2f} | {np.median(c):.2f} | {int((c < threshold).sum())} | {len(o)} | "
                     f"{', '.join(f'{v:.2f}' for v in o) or '-'} | {sum(v < threshold for v in o)} |")
    (RESULTS / "dedup_agreement.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/dedup-real"), help="models, generated files, runs")
    parser.add_argument("--tune", action="store_true", help="the tolerance grid on the tuning halves")
    parser.add_argument("--consistency", action="store_true",
                        help="the check that an image's faint matches agree, on the tuning halves")
    parser.add_argument("--structure", action="store_true",
                        help="what share of faint matches' residuals survives a blur, on the tuning halves")
    parser.add_argument("--agreement", action="store_true",
                        help="how well the fine detail of accepted matches agrees, on the tuning halves")
    parser.add_argument("--only", default=None, help="cases whose data/size/embedding label contains this")
    parser.add_argument("--draw", type=int, default=REPORT_SEED,
                        help=f"seed of the report halves' draw (default {REPORT_SEED}, the report; another one is a "
                             "fresh draw from the same images -> results/dedup_real_draw<N>.*)")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--reuse", action="store_true",
                        help="read back the runs an interrupted report finished (same code, same work folder)")
    args = parser.parse_args()
    start = time.perf_counter()
    args.work = args.work.resolve()  # manifests list absolute paths
    models = build_models(args.work, args.progress)
    if args.tune:
        tune(args.work, models, args.progress)
        return
    if args.consistency:
        consistency_study(args.work, models, args.progress)
        return
    if args.structure:
        structure_study(args.work, models, args.progress)
        return
    if args.agreement:
        agreement_study(args.work, models, args.progress)
        return
    results = run_cases(args.work, models, args.progress, args.only, args.reuse, args.draw)
    lines = tables(results)
    report = {"command": " ".join(["python", *sys.argv]), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "defaults": Tolerance().__dict__,
              "seconds": round(time.perf_counter() - start), "results": results}
    if args.only is None or args.draw != REPORT_SEED:
        name = "dedup_real" if args.draw == REPORT_SEED else f"dedup_real_draw{args.draw}"
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        which = "report halves" if args.draw == REPORT_SEED else f"report halves, fresh draw {args.draw}"
        header = [(f"Near-duplicates of real images: precision / recall per edit (100 planted copies each; "
                  f"{which}, default tolerances)"), "", f"`{report['command']}`", ""]
        (RESULTS / f"{name}.md").write_text("\n".join(header + lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
