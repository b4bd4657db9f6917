"""Labelled images in memory: `ImageSet` (file paths decoded on demand, or a uint8 array) and the
`Splits` of a data source. Every source (folders, manifests, CIFAR, the built-ins, the procedural
glyphs) produces these; nothing here knows where images come from."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..errors import BigTransferError
from .images import load_rgb, probe


class ImageSet:
    """Images with integer labels; `classes[label]` is the class name.

    Backed by file paths or by a uint8 array [N, H, W, 3]; `subset` shares the backing store.
    Multi-label data also carries `label_sets` (every label of every image); `labels` then holds
    each image's first label, which few-shot draws and stratified splits use.
    """

    def __init__(self, classes: Sequence[str], labels: Sequence[int], *, paths: Sequence[str] | None = None,
                 pixels: np.ndarray | None = None, rows: np.ndarray | None = None,
                 sizes: Sequence[tuple[int, int]] | None = None, origin: str = "",
                 label_sets: Sequence[tuple[int, ...]] | None = None):
        if (paths is None) == (pixels is None):
            raise ValueError("an ImageSet is backed by paths or by pixels")
        self.classes = list(classes)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.paths = list(paths) if paths is not None else None
        self.pixels = pixels
        self.rows = np.arange(len(self.labels)) if rows is None else np.asarray(rows)
        self.sizes = list(sizes) if sizes is not None else None  # (w, h) per item, when known
        self.origin = origin
        self.label_sets = [tuple(ls) for ls in label_sets] if label_sets is not None else None

    @property
    def multilabel(self) -> bool:
        return self.label_sets is not None

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> Image.Image:
        """Item `i` as an 8-bit RGB PIL image."""
        if self.paths is not None:
            return load_rgb(self.paths[i])
        return Image.fromarray(self.pixels[self.rows[i]])

    def load_for_transform(self, i: int):
        """What the transforms take: a PIL image for files; for in-memory pixels a uint8 CHW tensor
        (torchvision's transforms run ~40% faster on small tensors than on PIL images)."""
        if self.paths is not None:
            return load_rgb(self.paths[i])
        import torch

        return torch.from_numpy(self.pixels[self.rows[i]]).permute(2, 0, 1)

    def describe_item(self, i: int) -> str:
        return self.paths[i] if self.paths is not None else f"{self.origin}[{int(self.rows[i])}]"

    def subset(self, indices: Sequence[int]) -> ImageSet:
        idx = np.asarray(indices, dtype=np.int64)
        return ImageSet(
            self.classes, self.labels[idx],
            paths=[self.paths[i] for i in idx] if self.paths is not None else None,
            pixels=self.pixels, rows=self.rows[idx] if self.pixels is not None else None,
            sizes=[self.sizes[i] for i in idx] if self.sizes is not None else None, origin=self.origin,
            label_sets=[self.label_sets[i] for i in idx] if self.label_sets is not None else None,
        )

    def concat(self, other: ImageSet) -> ImageSet:
        """These images followed by `other`'s (file-backed sets of the same classes)."""
        if self.paths is None or other.paths is None or self.classes != other.classes:
            raise BigTransferError(f"{self.origin}: only file-backed splits of the same classes can be joined")
        sizes = self.sizes + other.sizes if self.sizes is not None and other.sizes is not None else None
        sets = self.label_sets + other.label_sets if self.multilabel and other.multilabel else None
        return ImageSet(self.classes, np.concatenate([self.labels, other.labels]), paths=self.paths + other.paths,
                        sizes=sizes, origin=self.origin, label_sets=sets)

    def relabeled(self, classes: Sequence[str], labels: Sequence[int]) -> ImageSet:
        """The same images under another class list (e.g. a model's), with labels in its order."""
        if self.multilabel:
            raise BigTransferError(f"{self.origin}: relabeling multi-label data is not supported")
        return ImageSet(classes, labels, paths=self.paths, pixels=self.pixels,
                        rows=self.rows if self.pixels is not None else None, sizes=self.sizes, origin=self.origin)

    def median_area(self, sample: int = 1000, seed: int = 0) -> float:
        """Median pixel area over (a sample of) the images: what the HyperRule's resolution uses."""
        if self.sizes is not None:  # known sizes first: decoded caches keep the originals here
            sizes = self.sizes
        elif self.pixels is not None:
            h, w = self.pixels.shape[1:3]
            return float(h * w)
        else:
            chosen = np.random.default_rng(seed).permutation(len(self))[:sample]
            sizes = [probe(self.paths[i]) for i in chosen]
        return float(statistics.median(w * h for w, h in sizes))

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.classes))


@dataclass
class Splits:
    train: ImageSet
    test: ImageSet | None
    skipped: list[str] = field(default_factory=list)
    val: ImageSet | None = None  # a validation split beside the test split (only with separate_val)

    @property
    def classes(self) -> list[str]:
        return self.train.classes
