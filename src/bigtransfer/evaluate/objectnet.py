"""ObjectNet-style evaluation of an ILSVRC-2012 classifier (as in the BiT paper).

Only ObjectNet classes that overlap ILSVRC-2012 are scored, through a user-supplied mapping from
each ObjectNet class to one or more ILSVRC classes (many-to-one). The model's logits are
restricted to the mapped ILSVRC classes (`restrict=False` keeps them all; a prediction of an
unmapped class is then simply wrong). A prediction is right when the ObjectNet class of the best
ILSVRC class is the true one (top-1), or when the truth is among the ObjectNet classes of the five
best ILSVRC classes (top-5); an ILSVRC class listed under two ObjectNet classes counts as either.
Images: shorter side to 512, central 480 crop.

Mapping file, JSON: `{"objectnet class": ["ilsvrc class", ...]}` (a single entry may stand
alone); or CSV with the header `objectnet_class,ilsvrc_class`, one row per pair. An ILSVRC entry
is a class name of the model (checkpoint metadata `class_names`; the authors' `.npz` files have
none, so their names are "0".."999") or an integer index into its head; a string that names no
class but reads as an integer is taken as an index.

The data is any labelled source `bigtransfer.data.sources.load_source` reads, its classes named
as ObjectNet classes; its val/test split is used when it has one, otherwise all its images.

Bounding boxes (optional), CSV with the header `path,x0,y0,x1,y1`: pixel coordinates of the
original image, x1/y1 exclusive, non-integers rounded. `path` is the image's path relative to the
data root (the image folder given as data, e.g. `chair/0001.png` or `val/chair/0001.png`; for a
CSV manifest the manifest's folder, as in the manifest), or an absolute path. An image with a box
is cropped to it before preprocessing; an image without one is used whole.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from .. import rundir
from ..data.dataset import TransformedImages
from ..data.images import probe
from ..data.sources import ImageSet, load_source
from ..data.transforms import objectnet_transform
from ..errors import BigTransferError, BigTransferWarning
from ..safe_text import load_json, quoted

Box = tuple[int, int, int, int]
TOP_K = 5


# --------------------------------------------------------------------------- mapping file
def load_class_mapping(path: str | Path) -> dict[str, list[str | int]]:
    """Read a mapping file (.json or .csv): ObjectNet class -> its ILSVRC class names or indices."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix not in (".json", ".csv"):
        raise BigTransferError(f"--mapping {path}: expected a .json or .csv file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets write a BOM
    except (OSError, UnicodeDecodeError) as err:
        raise BigTransferError(f"--mapping {path}: cannot read the file ({err})") from None
    mapping = _mapping_from_json(text, path) if suffix == ".json" else _mapping_from_csv(text, path)
    if not mapping:
        raise BigTransferError(f"--mapping {path}: the mapping is empty")
    return mapping


def _mapping_from_json(text: str, path: Path) -> dict[str, list[str | int]]:
    def no_duplicates(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise BigTransferError(f"{path}: key {quoted(key)} appears twice")
            seen[key] = value
        return seen

    try:
        raw = load_json(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as err:
        raise BigTransferError(f"{path} line {err.lineno}: not valid JSON ({err.msg})") from None
    except ValueError as err:  # nested too deeply
        raise BigTransferError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise BigTransferError(f'{path}: expected an object {{"objectnet class": ["ilsvrc class", ...]}}')
    mapping: dict[str, list[str | int]] = {}
    for key, value in raw.items():
        entries = value if isinstance(value, list) else [value]
        for entry in entries:
            # bool is an int subclass, but `true` is no class index
            if isinstance(entry, bool) or not isinstance(entry, (str, int)) or entry == "":
                raise BigTransferError(
                    f"{path}: key {quoted(key)}: {quoted(entry)} is neither an ILSVRC class name nor an integer index")
        if not entries:
            raise BigTransferError(f"{path}: key {quoted(key)} maps to no ILSVRC class")
        mapping[key] = list(entries)
    return mapping


def _mapping_from_csv(text: str, path: Path) -> dict[str, list[str | int]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))  # newline="": quoted cells may hold line breaks
    try:
        columns = [c.strip() for c in (reader.fieldnames or [])]
        if "objectnet_class" not in columns or "ilsvrc_class" not in columns:
            raise BigTransferError(
                f"{path}: the header must name columns 'objectnet_class' and 'ilsvrc_class' (got {columns})")
        mapping: dict[str, list[str | int]] = {}
        for row in reader:
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            if not row["objectnet_class"] or not row["ilsvrc_class"]:
                raise BigTransferError(f"{path} line {reader.line_num}: empty objectnet_class or ilsvrc_class")
            # CSV cells are all strings: whether "7" is a name or an index is settled against the model
            mapping.setdefault(row["objectnet_class"], []).append(row["ilsvrc_class"])
    except csv.Error as err:
        raise BigTransferError(f"{path} line {reader.line_num}: malformed CSV ({err})") from None
    return mapping


# --------------------------------------------------------------------------- mapping x model
@dataclass
class ResolvedMapping:
    """A mapping bound to a model's head: `member[i, j]` says head output i counts as ObjectNet class j."""

    objectnet: list[str]
    member: torch.Tensor  # bool [model classes, ObjectNet classes]

    @property
    def mapped(self) -> torch.Tensor:
        """Indices of the head outputs that count as some ObjectNet class."""
        return self.member.any(dim=1).nonzero().flatten()


def resolve_mapping(mapping: dict[str, list[str | int]], model_classes: list[str],
                    where: str | Path = "--mapping") -> ResolvedMapping:
    """Bind the mapping's ILSVRC entries to the model's head outputs, by name or index."""
    names = {name: i for i, name in enumerate(model_classes)}
    objectnet = list(mapping)
    member = torch.zeros(len(model_classes), len(objectnet), dtype=torch.bool)
    for j, key in enumerate(objectnet):
        for entry in mapping[key]:
            member[_head_index(entry, names, len(model_classes), key, where), j] = True
    return ResolvedMapping(objectnet, member)


def _head_index(entry: str | int, names: dict[str, int], n: int, key: str, where: str | Path) -> int:
    if isinstance(entry, str):
        if entry in names:  # a name wins over reading it as a number
            return names[entry]
        try:
            index = int(entry)
        except ValueError:
            unnamed = list(names) == [str(i) for i in range(n)]
            hint = f" (the model has no class names; use indices 0..{n - 1})" if unnamed else ""
            raise BigTransferError(
                f"{where}: ILSVRC class {quoted(entry)} (for {quoted(key)}) is not one of the model's {n} classes{hint}") from None
    else:
        index = entry
    if not 0 <= index < n:
        raise BigTransferError(
            f"{where}: ILSVRC index {quoted(entry)} (for {quoted(key)}) is outside the model's head (0..{n - 1})")
    return index


# --------------------------------------------------------------------------- bounding boxes
def load_boxes(path: str | Path, images: ImageSet, root: str | Path) -> list[Box | None]:
    """Each image's box from a `path,x0,y0,x1,y1` CSV (None where it has none), checked against its size."""
    path = Path(path).expanduser()
    if images.paths is None:
        raise BigTransferError(f"--boxes {path}: boxes need image files (an image folder or a CSV manifest)")
    where = {os.path.abspath(p): i for i, p in enumerate(images.paths)}
    boxes: list[Box | None] = [None] * len(images)
    line_of: dict[int, int] = {}
    unmatched: list[str] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            if not {"path", "x0", "y0", "x1", "y1"} <= set(columns):
                raise BigTransferError(f"{path}: the header must name columns path,x0,y0,x1,y1 (got {columns})")
            for row in reader:
                row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
                line = reader.line_num
                if not row["path"]:
                    raise BigTransferError(f"{path} line {line}: empty path")
                i = where.get(os.path.abspath(Path(root) / Path(row["path"]).expanduser()))
                if i is None:
                    unmatched.append(row["path"])
                    continue
                if i in line_of:
                    raise BigTransferError(f"{path} line {line}: a second box for {quoted(row['path'])} "
                                           f"(the first is on line {line_of[i]})")
                line_of[i] = line
                size = images.sizes[i] if images.sizes is not None else probe(images.paths[i])
                boxes[i] = _checked_box(row, size, f"{path} line {line}")
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise BigTransferError(f"{path}: cannot read the boxes ({err})") from None
    if unmatched:
        warnings.warn(f"{path}: {len(unmatched)} box row(s) name no image of the data (first: {quoted(unmatched[0])}); "
                      f"paths are relative to {root}", BigTransferWarning, stacklevel=2)
    return boxes


def _checked_box(row: dict[str, str], size: tuple[int, int], where: str) -> Box:
    try:
        values = [float(row[k]) for k in ("x0", "y0", "x1", "y1")]
    except ValueError:
        raise BigTransferError(f"{where}: box coordinates must be numbers") from None
    if not all(math.isfinite(v) for v in values):
        raise BigTransferError(f"{where}: box coordinates must be finite numbers")
    x0, y0, x1, y1 = (round(v) for v in values)
    width, height = size
    if x1 <= x0 or y1 <= y0:
        raise BigTransferError(f"{where}: empty box ({x0},{y0})-({x1},{y1}); x1 must exceed x0 and y1 exceed y0")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise BigTransferError(f"{where}: box ({x0},{y0})-({x1},{y1}) lies outside the {width}x{height} image")
    return x0, y0, x1, y1


class BoxedImages(TransformedImages):
    """(image tensor, label) pairs where each image is first cropped to its box, if it has one."""

    def __init__(self, images: ImageSet, transform, boxes: list[Box | None]):
        super().__init__(images, transform)
        self.boxes = boxes

    def _decode(self, index: int):
        i, image = super()._decode(index)  # i may move past an undecodable file: crop by i's box
        box = self.boxes[i]
        return i, image if box is None else image.crop(box)


# --------------------------------------------------------------------------- scoring
def objectnet_hits(logits: torch.Tensor, truth: torch.Tensor, mapping: ResolvedMapping,
                   restrict: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 hit, top-5 hit) booleans per image; `truth` holds ObjectNet class indices."""
    candidates = mapping.mapped if restrict else torch.arange(logits.shape[1])
    k = min(TOP_K, len(candidates))
    best = candidates[logits[:, candidates].float().topk(k, dim=1).indices]  # head indices [N, k], best first
    # a head output mapped to no ObjectNet class has an all-False row, so predicting it is a miss
    hit = mapping.member[best, truth[:, None]]
    return hit[:, 0], hit.any(dim=1)


def score_dataset(logits_of: Callable[[torch.Tensor], torch.Tensor], dataset, mapping: ResolvedMapping, *,
                  restrict: bool = True, batch: int = 32, workers: int = 0,
                  progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-ObjectNet-class (images, top-1 hits, top-5 hits) over (image, class index) pairs, given the
    model's forward pass (`Predictor.logits`)."""
    from tqdm.auto import tqdm

    n = len(mapping.objectnet)
    counts, top1, top5 = (np.zeros(n, dtype=np.int64) for _ in range(3))
    loader = DataLoader(dataset, batch_size=batch, num_workers=workers)
    with torch.inference_mode():
        for images, labels in tqdm(loader, desc="objectnet", unit="batch", disable=not progress):
            hit1, hit5 = objectnet_hits(logits_of(images).cpu(), labels, mapping, restrict)
            counts += np.bincount(labels.numpy(), minlength=n)
            top1 += np.bincount(labels.numpy(), weights=hit1.numpy(), minlength=n).astype(np.int64)
            top5 += np.bincount(labels.numpy(), weights=hit5.numpy(), minlength=n).astype(np.int64)
    return counts, top1, top5


# --------------------------------------------------------------------------- entry point
def evaluate_objectnet(model_spec: str | Path, data: str, mapping: str | Path, *, boxes: str | Path | None = None,
                       restrict: bool = True, skip_unmapped: bool = False, resize: int = 512, crop: int = 480,
                       batch: int = 32, workers: int = 0, device: str = "auto", out: str | Path | None = None,
                       progress: bool = True) -> dict:
    """ObjectNet top-1/top-5 and per-class top-1 of an ILSVRC model; writes reports to `out` if given."""
    with rundir.maybe_owned(out, "objectnet"):
        return _evaluate_objectnet(model_spec, data, mapping, boxes=boxes, restrict=restrict,
                                   skip_unmapped=skip_unmapped, resize=resize, crop=crop, batch=batch,
                                   workers=workers, device=device, out=out, progress=progress)


def _evaluate_objectnet(model_spec, data, mapping, *, boxes, restrict, skip_unmapped, resize, crop, batch, workers,
                        device, out, progress) -> dict:
    from ..inference.predictor import load_predictor

    if resize < 1:
        raise BigTransferError(f"--resize must be at least 1, got {resize}")
    if not 1 <= crop <= resize:
        raise BigTransferError(f"--crop ({crop}) must be at least 1 and at most --resize ({resize})")
    if batch < 1:
        raise BigTransferError(f"--batch must be at least 1, got {batch}")
    classes = load_class_mapping(mapping)
    loaded = load_predictor(model_spec, device=device, resolution=crop)
    resolved = resolve_mapping(classes, loaded.class_names, Path(mapping))

    splits = load_source(data, progress=progress, require_test=False)
    images = splits.test if splits.test is not None else splits.train
    if images.multilabel:
        raise BigTransferError(f"--data {data}: multi-label data cannot be scored on ObjectNet")
    root = Path(data).expanduser()
    box_list = load_boxes(boxes, images, root.parent if root.is_file() else root) if boxes else [None] * len(images)
    column = {name: j for j, name in enumerate(resolved.objectnet)}
    report_order = [column[c] for c in images.classes if c in column]  # per-class results in the data's order
    images, box_list, dropped = _to_objectnet_labels(images, box_list, resolved, data, mapping, skip_unmapped)

    dataset = BoxedImages(images, objectnet_transform(resize, crop), box_list)
    counts, top1, top5 = score_dataset(loaded.logits, dataset, resolved, restrict=restrict, batch=batch,
                                       workers=workers, progress=progress)
    total = int(counts.sum())
    present = [j for j in report_order if counts[j]]
    result = {
        "top1": int(top1.sum()) / total,
        "top5": int(top5.sum()) / total,
        "images": total,
        "per_class_accuracy": {resolved.objectnet[j]: round(float(top1[j] / counts[j]), 6) for j in present},
        "per_class_top5": {resolved.objectnet[j]: round(float(top5[j] / counts[j]), 6) for j in present},
        "per_class_images": {resolved.objectnet[j]: int(counts[j]) for j in present},
        "settings": {
            "model": str(loaded.source), "data": str(data), "mapping": str(mapping),
            "boxes": None if boxes is None else str(boxes), "cropped_images": sum(b is not None for b in box_list),
            "restrict": restrict, "skip_unmapped": skip_unmapped, "skipped_images": dropped,
            "resize": resize, "crop": crop, "objectnet_classes": len(resolved.objectnet),
            "mapped_ilsvrc_classes": len(resolved.mapped),
        },
    }
    if out is not None:
        write_objectnet(Path(out), result)
    return result


def _to_objectnet_labels(images: ImageSet, boxes: list[Box | None], mapping: ResolvedMapping, data: str,
                         mapping_file: str | Path, skip_unmapped: bool) -> tuple[ImageSet, list[Box | None], int]:
    """Relabel the images by ObjectNet class index; unmapped classes are an error or, if asked, dropped."""
    column = {name: j for j, name in enumerate(mapping.objectnet)}
    unmapped = [c for c in images.classes if c not in column]
    keep = np.arange(len(images))
    if unmapped:
        if not skip_unmapped:
            raise BigTransferError(
                f"--data {data}: class {quoted(unmapped[0])} is not in --mapping {mapping_file} ({len(unmapped)} of "
                f"{len(images.classes)} data classes are unmapped; --skip-unmapped drops their images)")
        mapped_labels = [i for i, c in enumerate(images.classes) if c in column]
        keep = np.flatnonzero(np.isin(images.labels, mapped_labels))
        warnings.warn(f"--data {data}: dropped {len(images) - len(keep)} image(s) of {len(unmapped)} class(es) "
                      f"not in the mapping (first: {quoted(unmapped[0])})", BigTransferWarning, stacklevel=3)
    if not len(keep):
        raise BigTransferError(f"--data {data}: no images to evaluate" + (" of mapped classes" if unmapped else ""))
    to_column = np.array([column.get(c, -1) for c in images.classes], dtype=np.int64)
    kept = images.subset(keep)
    return (kept.relabeled(mapping.objectnet, to_column[kept.labels]), [boxes[i] for i in keep],
            len(images) - len(keep))


def write_objectnet(out: Path, result: dict) -> None:
    """`objectnet.json` (everything), `per_class_accuracy.csv` (class, top1, top5, images) and
    `report.html` in `out` (with `protocol.json`, so `bigtransfer report OUT` can rebuild the page)."""
    from ..atomic import write_csv, write_json
    from ..report.protocols.objectnet import write_objectnet_report

    write_json(out / "protocol.json", {"protocol": "objectnet", **result["settings"]})
    write_json(out / "objectnet.json", result)
    write_csv(out / "per_class_accuracy.csv", ["class", "top1", "top5", "images"],
              ([name, f"{result['per_class_accuracy'][name]:.6f}", f"{result['per_class_top5'][name]:.6f}", n]
               for name, n in result["per_class_images"].items()))
    write_objectnet_report(out, result)
