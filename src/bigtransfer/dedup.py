"""Near-duplicates between an upstream collection and downstream test sets (paper Supp. C).

Two signals, each with a nearest-neighbour index from faiss so that millions of upstream images
stay tractable:

* a 64-bit perceptual hash (imagehash's pHash) in a binary index searched by Hamming radius: the
  cheap pre-filter, which catches resized and re-encoded copies;
* BiT pre-logit embeddings, L2-normalised, in an inner-product index (exact, or HNSW for large
  collections) searched for each test image's nearest upstream neighbours: catches crops and
  colour changes the hash misses.

A pair (test image, upstream image) is a near-duplicate when any of these holds:

* the upstream image is the test image's nearest neighbour, their cosine similarity reaches
  `cosine` and beats the second-nearest by `margin`: a match that stands out from the crowd of
  merely similar images (photos of the same kind of object are all close in embedding space);
* the cosine similarity reaches `identical`, whatever the rank (several copies of one image);
* the hashes are within `hash_bits` and the cosine still reaches `hash_cosine` (the hash
  proposes, the embedding confirms: simple images collide in pHash).

Outputs in OUT: pairs.csv (every near-duplicate pair with both scores and the rule that fired),
upstream_filtered.csv (the upstream manifest without the duplicates, ready for `pretrain`),
contact_sheet.png and contact_sheet.html (side-by-side thumbnails for review), summary.json.
"""

from __future__ import annotations

import base64
import csv
import html
import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data.dataset import TransformedImages
from .data.images import load_rgb
from .data.sources import ImageSet, load_source
from .data.transforms import eval_transform
from .errors import BigTransferError
from .evaluate.report import write_csv
from .train.checkpointing import write_json_atomic

HNSW_ABOVE = 200_000  # upstream images: exact search below, HNSW above


def _library(name: str):
    """faiss / imagehash, or a clear error saying how to install them."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise BigTransferError(f"bigtransfer dedup needs {name}: pip install 'bigtransfer[dedup]'") from None


@dataclass
class DedupOptions:
    upstream: str
    downstream: tuple[str, ...]
    out: Path = Path("runs/dedup")
    model: str = "BiT-M-R50x1"
    resolution: int = 128
    # Defaults chosen on a planted set (seed 0, 3k images: benchmarks/dedup_planted.py --tune)
    # and measured on a separate 10k-image one (seed 1).
    cosine: float = 0.90  # a nearest neighbour at least this similar ...
    margin: float = 0.03  # ... and this much closer than the second nearest
    identical: float = 0.98  # this similar: a duplicate at any rank
    hash_bits: int = 4  # pHash Hamming radius of the pre-filter (of 64 bits)
    hash_cosine: float = 0.95  # embeddings must still agree this much for a hash match
    neighbours: int = 5  # nearest upstream images looked at per test image
    sheet_pairs: int = 48
    batch: int = 64
    workers: int = 0
    device: str = "auto"
    progress: bool = True


def image_files(spec: str, *, test_only: bool) -> tuple[ImageSet, list[str]]:
    """The images of a source that have files (and which split each came from); `test_only`: its
    test split, or all its images when it has none."""
    splits = load_source(spec, require_test=False, progress=False)
    parts = [("test", splits.test)] if test_only and splits.test is not None else \
        [("train", splits.train), ("test", splits.test)]
    parts = [(name, images) for name, images in parts if images is not None]
    if any(images.paths is None for _, images in parts):
        raise BigTransferError(f"{spec}: dedup needs image files (an image folder or a CSV manifest)")
    paths = [p for _, images in parts for p in images.paths]
    labels = [images.classes[label] for _, images in parts for label in images.labels]
    split_names = [name for name, images in parts for _ in range(len(images))]
    index = {c: i for i, c in enumerate(sorted(set(labels)))}
    merged = ImageSet(sorted(index), [index[c] for c in labels], paths=paths, origin=spec)
    return merged, split_names


def perceptual_hashes(images: ImageSet, progress: bool) -> np.ndarray:
    """uint8 [N, 8]: each image's 64-bit pHash, as faiss's binary indexes want it."""
    imagehash = _library("imagehash")
    from tqdm.auto import tqdm

    out = np.zeros((len(images), 8), dtype=np.uint8)
    for i in tqdm(range(len(images)), desc="hashing", unit="img", disable=not progress):
        bits = imagehash.phash(load_rgb(images.paths[i])).hash.flatten()
        out[i] = np.packbits(bits)
    return out


def embeddings(model, images: ImageSet, opts: DedupOptions, device: torch.device) -> np.ndarray:
    """float32 [N, D] L2-normalised pre-logits."""
    from .train.linear_probe import extract_features

    features, _ = extract_features(model, TransformedImages(images, eval_transform(opts.resolution)), device,
                                   batch=opts.batch, workers=opts.workers, progress=opts.progress)
    return torch.nn.functional.normalize(features, dim=1).numpy().astype(np.float32)


def _embedding_index(vectors: np.ndarray):
    faiss = _library("faiss")

    if len(vectors) > HNSW_ABOVE:
        index = faiss.IndexHNSWFlat(vectors.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 128
    else:
        index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index


def duplicate_rule(cos: float, rank: int, margin: float, hash_distance: int, opts: DedupOptions) -> str | None:
    """Which rule makes a candidate pair a near-duplicate (None: it is not one); see the module doc.
    `rank` is the upstream image's place among the test image's neighbours (0 = nearest), `margin`
    how much closer it is than the second nearest (for rank 0)."""
    if cos >= opts.identical or (rank == 0 and cos >= opts.cosine and margin >= opts.margin):
        return "embedding"
    if hash_distance <= opts.hash_bits and cos >= opts.hash_cosine:
        return "hash+embedding"
    return None


def scored_candidates(up_vec, up_hash, down_vec, down_hash, opts: DedupOptions):
    """(i, j, cosine, rank, margin, hash distance) for each test image i's nearest upstream images j
    and every j within the hash radius."""
    faiss = _library("faiss")

    k = min(max(2, opts.neighbours), len(up_vec))
    scores, neighbours = _embedding_index(up_vec).search(down_vec, k)
    hash_index = faiss.IndexBinaryFlat(64)
    hash_index.add(up_hash)
    lims, _, ids = hash_index.range_search(down_hash, opts.hash_bits + 1)  # the radius is exclusive
    for i in range(len(down_vec)):
        second = float(scores[i, 1]) if k > 1 else -1.0
        ranked = {int(j): rank for rank, j in enumerate(neighbours[i]) if j >= 0}
        for j in dict.fromkeys([*ranked, *(int(j) for j in ids[lims[i]:lims[i + 1]])]):
            cos = float(down_vec[i] @ up_vec[j])
            distance = int(np.unpackbits(np.bitwise_xor(down_hash[i], up_hash[j])).sum())
            yield i, j, cos, ranked.get(j, k), cos - second, distance


def candidate_pairs(up_vec, up_hash, down_vec, down_hash, opts: DedupOptions) -> list[tuple[int, int, float, int, str]]:
    """(downstream i, upstream j, cosine, hash distance, rule) for every near-duplicate pair."""
    found = []
    for i, j, cos, rank, margin, distance in scored_candidates(up_vec, up_hash, down_vec, down_hash, opts):
        rule = duplicate_rule(cos, rank, margin, distance, opts)
        if rule:
            found.append((i, j, cos, distance, rule))
    return sorted(found, key=lambda p: -p[2])


def embedding_model(spec: str, device: torch.device) -> torch.nn.Module:
    """The model whose pre-logits embed the images: a released name, a run, a weights file, or an
    architecture (randomly initialised, seed 0: only for tests)."""
    from .models.factory import create_model, model_source

    name, weights = model_source(spec, None)
    torch.manual_seed(0)
    return create_model(name, weights=weights).to(device).eval()


def run_dedup(opts: DedupOptions) -> dict:
    """Find the pairs, write the reports and the filtered upstream manifest; returns the summary."""
    import time

    from .inference import resolve_device

    start = time.perf_counter()
    if not 0 < opts.cosine <= 1 or not 0 <= opts.hash_bits <= 64 or opts.neighbours < 1:
        raise BigTransferError("--cosine must be in (0, 1], --hash-bits in [0, 64], --neighbours at least 1")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    upstream, up_splits = image_files(opts.upstream, test_only=False)
    device = resolve_device(opts.device)
    model = embedding_model(opts.model, device)
    up_vec, up_hash = embeddings(model, upstream, opts, device), perceptual_hashes(upstream, opts.progress)
    rows, duplicate_upstream = [], set()
    for spec in opts.downstream:
        down, _ = image_files(spec, test_only=True)
        down_vec, down_hash = embeddings(model, down, opts, device), perceptual_hashes(down, opts.progress)
        for i, j, cos, distance, rule in candidate_pairs(up_vec, up_hash, down_vec, down_hash, opts):
            rows.append({"downstream": spec, "downstream_path": down.paths[i], "upstream_path": upstream.paths[j],
                         "cosine": round(cos, 5), "hash_distance": distance, "rule": rule})
            duplicate_upstream.add(j)
    write_csv(out / "pairs.csv", ["downstream", "downstream_path", "upstream_path", "cosine", "hash_distance",
                                   "rule"], [list(r.values()) for r in rows])
    kept = [j for j in range(len(upstream)) if j not in duplicate_upstream]
    write_csv(out / "upstream_filtered.csv", ["path", "label", "split"],
               [[upstream.paths[j], upstream.classes[upstream.labels[j]], up_splits[j]] for j in kept])
    contact_sheet(rows[:opts.sheet_pairs], out)
    summary = {"pairs": len(rows), "upstream_images": len(upstream), "upstream_duplicates": len(duplicate_upstream),
               "upstream_kept": len(kept), "seconds": round(time.perf_counter() - start, 1),
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}}
    write_json_atomic(out / "summary.json", summary)
    return summary


def _thumbnail(path: str, side: int = 96) -> Image.Image:
    image = load_rgb(path)
    image.thumbnail((side, side))
    return image


def contact_sheet(rows: list[dict], out: Path) -> None:
    """contact_sheet.png and .html: each pair side by side with its scores, most similar first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = []
    for r in rows:
        pair = [_thumbnail(r["downstream_path"]), _thumbnail(r["upstream_path"])]
        encoded = []
        for image in pair:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            encoded.append(base64.b64encode(buffer.getvalue()).decode())
        cells.append((r, pair, encoded))
    columns = 4
    grid_rows = max(1, -(-len(cells) // columns))
    fig, axes = plt.subplots(grid_rows, 2 * columns, figsize=(2 * columns * 1.3, grid_rows * 1.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, (r, pair, _) in enumerate(cells):
        row, col = divmod(k, columns)
        for side, image in enumerate(pair):
            axes[row][2 * col + side].imshow(image)
        axes[row][2 * col].set_title(f"cos {r['cosine']:.2f}, hash {r['hash_distance']}", fontsize=7, loc="left")
    fig.suptitle("test image (left) and its upstream near-duplicate (right)" if cells else "no near-duplicates")
    fig.tight_layout()
    fig.savefig(out / "contact_sheet.png", dpi=100)
    plt.close(fig)
    items = "".join(
        f"<figure><img src='data:image/png;base64,{a}'><img src='data:image/png;base64,{b}'><figcaption>"
        f"cos {r['cosine']:.3f} · hash {r['hash_distance']} · {html.escape(r['rule'])}<br>"
        f"{html.escape(Path(r['downstream_path']).name)} ~ {html.escape(Path(r['upstream_path']).name)}"
        f"</figcaption></figure>" for r, _, (a, b) in cells)
    (out / "contact_sheet.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>Near-duplicates</title><style>"
        "body{font-family:system-ui,sans-serif}figure{display:inline-block;margin:6px;text-align:center}"
        "img{width:96px;height:96px;object-fit:contain;border:1px solid #ccc;margin:1px}"
        "figcaption{font-size:11px;color:#444}</style></head><body><h1>Near-duplicates: test image, upstream image"
        f"</h1><p>{len(rows)} pairs shown, most similar first.</p>{items}</body></html>\n")


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
    from .data.procedural import glyphs

    rng = np.random.default_rng(seed)
    upstream = glyphs(classes, upstream_per_class, 0, size, seed=seed + 1, progress=progress).train
    test = glyphs(classes, 1, test_per_class, size, seed=seed + 2, progress=progress).test
    # A folder of class folders: a downstream set without a test split counts all its images.
    for name, images, folder in (("up", upstream, root / "upstream"), ("test", test, root / "test")):
        for i in range(len(images)):
            target = folder / images.classes[images.labels[i]]
            target.mkdir(parents=True, exist_ok=True)
            images.load(i).save(target / f"{name}{i:06d}.png")
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
        path.parent.mkdir(parents=True, exist_ok=True)
        copy.save(path, quality=int(rng.integers(40, 81)))
        truth.add((str(root / "test" / label / f"test{i:06d}.png"), str(path)))
    return truth
