"""COCO-format detection data: read and check annotations, a training dataset, write files.

Annotations are the COCO json layout (`images`, `annotations`, `categories`; boxes as
[x, y, width, height] in pixels). Everything is checked up front and a problem is reported with
the file, the annotation's index and what is wrong, never as a raw traceback halfway through
training. Category ids map to model labels 1..K in id order (0 is the background).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from ..atomic import write_image, write_text
from ..data.images import IMAGE_ERRORS, load_rgb
from ..errors import BigTransferError
from ..safe_text import load_json, quoted


@dataclass
class CocoSet:
    path: Path
    image_root: Path
    images: list[dict]  # id, file_name, width, height
    boxes: dict[int, np.ndarray]  # image id -> [n, 4] x0, y0, x1, y1
    labels: dict[int, np.ndarray]  # image id -> [n] model labels 1..K
    category_ids: list[int]  # label l is category_ids[l - 1]
    category_names: list[str]

    @property
    def num_classes(self) -> int:
        """Model outputs, background included."""
        return len(self.category_ids) + 1


def _fail(path: Path, what: str) -> BigTransferError:
    return BigTransferError(f"{path}: {what}")


def read_coco(path: str | Path, image_root: str | Path | None = None) -> CocoSet:
    """Read and check a COCO json file; images are looked up under `image_root` (default: its folder)."""
    path = Path(path).expanduser()
    try:
        data = load_json(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise _fail(path, f"cannot read the annotations ({err})") from None
    except json.JSONDecodeError as err:
        raise _fail(path, f"not valid JSON (line {err.lineno}: {err.msg})") from None
    except ValueError as err:  # nested too deeply
        raise _fail(path, f"not valid JSON ({err})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations",
                                                                                     "categories")):
        raise _fail(path, "expected a COCO object with 'images', 'annotations' and 'categories' lists")
    root = Path(image_root).expanduser() if image_root else path.parent
    try:
        categories = sorted((int(c["id"]), str(c["name"])) for c in data["categories"])
        images = [{"id": int(im["id"]), "file_name": str(im["file_name"]), "width": int(im["width"]),
                   "height": int(im["height"])} for im in data["images"]]
    except (KeyError, TypeError, ValueError) as err:
        raise _fail(path, f"an image or category entry lacks a field or has a bad value ({err})") from None
    if not categories:
        raise _fail(path, "no categories")
    label_of = {cid: i + 1 for i, (cid, _) in enumerate(categories)}
    size_of = {im["id"]: (im["width"], im["height"]) for im in images}
    boxes: dict[int, list] = {im["id"]: [] for im in images}
    labels: dict[int, list] = {im["id"]: [] for im in images}
    for n, ann in enumerate(data["annotations"]):
        where = f"annotation {n}"
        if not isinstance(ann, dict) or not {"image_id", "category_id", "bbox"} <= set(ann):
            raise _fail(path, f"{where}: needs image_id, category_id and bbox")
        if ann["image_id"] not in size_of:
            raise _fail(path, f"{where}: image_id {quoted(ann['image_id'])} is not among the images")
        if ann["category_id"] not in label_of:
            raise _fail(path, f"{where}: category_id {quoted(ann['category_id'])} is not among the categories")
        bbox = ann["bbox"]
        if (not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox)
                or not all(np.isfinite(bbox))):
            raise _fail(path, f"{where}: bbox must be [x, y, width, height] numbers, got {quoted(bbox)}")
        x, y, w, h = (float(v) for v in bbox)
        width, height = size_of[ann["image_id"]]
        if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > width + 1 or y + h > height + 1:
            raise _fail(path, f"{where}: bbox {bbox} is empty or outside the {width}x{height} image")
        if ann.get("iscrowd"):
            continue  # crowd regions are ignored in training; COCOeval handles them in evaluation
        boxes[ann["image_id"]].append([x, y, x + w, y + h])
        labels[ann["image_id"]].append(label_of[ann["category_id"]])
    return CocoSet(path, root, images,
                   {i: np.asarray(b, dtype=np.float32).reshape(-1, 4) for i, b in boxes.items()},
                   {i: np.asarray(v, dtype=np.int64) for i, v in labels.items()},
                   [c for c, _ in categories], [name for _, name in categories])


class CocoTraining(Dataset):
    """(image in [0, 1] CHW, target) with the paper's augmentation: random flips and scale jitter
    (the image and its boxes scaled by a random factor in `jitter`). Without `train`, unchanged."""

    def __init__(self, coco: CocoSet, *, train: bool, jitter: tuple[float, float] = (0.8, 1.25)):
        self.coco, self.train, self.jitter = coco, train, jitter

    def __len__(self) -> int:
        return len(self.coco.images)

    def __getitem__(self, index):
        image_id, seed = index if isinstance(index, tuple) else (index, None)
        info = self.coco.images[image_id]
        file = self.coco.image_root / info["file_name"]
        try:
            image = TF.to_dtype(TF.to_image(load_rgb(file)), torch.float32, scale=True)
        except IMAGE_ERRORS as err:
            raise BigTransferError(f"{file}: cannot decode image ({err})") from None
        boxes = torch.from_numpy(self.coco.boxes[info["id"]].copy())
        if self.train:
            rng = np.random.default_rng(seed)
            if rng.random() < 0.5:
                image = image.flip(-1)
                boxes[:, [0, 2]] = image.shape[-1] - boxes[:, [2, 0]]
            scale = float(rng.uniform(*self.jitter))
            h, w = image.shape[-2:]
            image = TF.resize(image, [max(8, round(h * scale)), max(8, round(w * scale))], antialias=True)
            boxes = boxes * torch.tensor([image.shape[-1] / w, image.shape[-2] / h] * 2)
        return image, {"boxes": boxes, "labels": torch.from_numpy(self.coco.labels[info["id"]]),
                       "image_id": info["id"]}


def collate(batch):
    return [image for image, _ in batch], [target for _, target in batch]


def write_rectangles(root: Path, images: int, *, size: int = 96, seed: int = 0,
                     colours: dict[str, tuple[int, int, int]] | None = None) -> Path:
    """A tiny COCO-format set: 1-3 coloured rectangles on noise per image; returns the json path."""
    colours = colours or {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 70, 230)}
    rng = np.random.default_rng(seed)
    entries, annotations = [], []
    for i in range(images):
        pixels = rng.integers(0, 110, (size, size, 3), dtype=np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            c = int(rng.integers(len(colours)))
            w, h = (int(v) for v in rng.integers(size // 6, size // 2, 2))
            x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            pixels[y:y + h, x:x + w] = np.clip(np.array(list(colours.values())[c]) + rng.integers(-20, 20, 3), 0, 255)
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": c + 1,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        write_image(root / f"{i:05d}.png", Image.fromarray(pixels), durable=False)  # test data
        entries.append({"id": i, "file_name": f"{i:05d}.png", "width": size, "height": size})
    path = root / "annotations.json"
    write_text(path, json.dumps({"images": entries, "annotations": annotations,
                                 "categories": [{"id": k + 1, "name": n} for k, n in enumerate(colours)]}))
    return path
