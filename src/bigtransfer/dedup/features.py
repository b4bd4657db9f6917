"""Every image decoded once into what dedup compares: its canonical grey thumbnail and, when a
model is given, its embedding (unit length).

The embedding can come from an earlier stage of the network than the pre-logits: a network
trained on classes makes its last layers agree on everything of one class, while earlier stages
still tell two images of a class apart. It only proposes candidates; pixels decide (verify.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.images import IMAGE_ERRORS, load_rgb
from ..data.imageset import ImageSet
from ..data.transforms import eval_transform
from ..errors import BigTransferError
from .pixels import CANONICAL, grey_thumbnail

PRE_LOGITS = "pre-logits"


@dataclass
class Features:
    """What dedup keeps of a set of images, in the set's order."""

    thumbnails: np.ndarray  # uint8 [N, C, C]
    embeddings: np.ndarray | None  # float32 [N, D], unit length; None without a model
    readable: np.ndarray  # bool [N]: False for a file that could not be decoded
    sides: np.ndarray  # int64 [N]: each image's shorter side in pixels (0 if unreadable)

    def __len__(self) -> int:
        return len(self.thumbnails)


class Embedder:
    """A model's pooled features at one layer, L2-normalised: `layer` is 'pre-logits' or 'stageN'."""

    def __init__(self, model: torch.nn.Module, layer: str, resolution: int, device: torch.device):
        stages = len(model.stages)
        names = [PRE_LOGITS] + [f"stage{n}" for n in range(1, stages + 1)]
        if layer not in names:
            raise BigTransferError(f"--embedding-layer: expected one of {', '.join(names)}, got {layer!r}")
        self.model, self.layer, self.device = model.eval(), layer, device
        self.transform = eval_transform(resolution)
        self.dim = self(torch.zeros(1, 3, resolution, resolution)).shape[1]

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        x = batch.to(self.device)
        if self.layer == PRE_LOGITS:
            pooled = self.model.forward_features(x)
        else:
            if x.device.type == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)  # oneDNN's faster layout, as forward_features
            x = self.model.root(x)
            for stage in self.model.stages[:int(self.layer.removeprefix("stage"))]:
                x = stage(x)
            pooled = x.mean(dim=(2, 3))
        return torch.nn.functional.normalize(pooled.float(), dim=1).cpu().numpy()


class _Decoded(Dataset):
    """(model input or an empty tensor, thumbnail, readable, shorter side) for each image of a set
    or each blob."""

    def __init__(self, images: ImageSet | list[bytes], transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        try:
            image = load_rgb(self.images[i]) if isinstance(self.images, list) else self.images.load(i)
        except IMAGE_ERRORS:
            return torch.zeros(0), torch.zeros(CANONICAL, CANONICAL, dtype=torch.uint8), False, 0
        pixels = torch.zeros(0) if self.transform is None else self.transform(image)
        return pixels, torch.from_numpy(grey_thumbnail(image)), True, min(image.size)


def _collate(items):
    readable = torch.tensor([ok for _, _, ok, _ in items])
    thumbs = torch.stack([t for _, t, _, _ in items])
    sides = torch.tensor([side for _, _, _, side in items], dtype=torch.int64)
    template = next((p for p, _, ok, _ in items if ok), None)  # an unreadable image has no model input
    pixels = None if template is None else \
        torch.stack([p if ok else torch.zeros_like(template) for p, _, ok, _ in items])
    return pixels, thumbs, readable, sides


def batches(images: ImageSet | list[bytes], embedder: Embedder | None, *, batch: int = 64, workers: int = 0,
            progress: bool = False, desc: str = "images") -> Iterator[Features]:
    """Features of consecutive batches of `images` (an image set, or encoded images as bytes)."""
    from tqdm.auto import tqdm

    data = _Decoded(images, embedder.transform if embedder else None)
    loader = DataLoader(data, batch_size=batch, num_workers=workers, collate_fn=_collate)
    with tqdm(total=len(data), desc=desc, unit="img", disable=not progress) as bar:
        for pixels, thumbs, readable, sides in loader:
            vectors = None
            if embedder is not None:
                if pixels is None:  # nothing in this batch decoded
                    vectors = np.zeros((len(thumbs), embedder.dim), dtype=np.float32)
                else:
                    vectors = embedder(pixels)
                    vectors[~readable.numpy()] = 0
            yield Features(thumbs.numpy(), vectors, readable.numpy(), sides.numpy())
            bar.update(len(thumbs))


def extract(images: ImageSet | list[bytes], embedder: Embedder | None, **kwargs) -> Features:
    """All features of `images` at once (downstream sets and planted copies: they are small)."""
    parts = list(batches(images, embedder, **kwargs))
    if not parts:
        return Features(np.zeros((0, CANONICAL, CANONICAL), np.uint8),
                        None if embedder is None else np.zeros((0, embedder.dim), np.float32), np.zeros(0, bool),
                        np.zeros(0, np.int64))
    embeddings = None if embedder is None else np.concatenate([p.embeddings for p in parts])
    return Features(np.concatenate([p.thumbnails for p in parts]), embeddings,
                    np.concatenate([p.readable for p in parts]), np.concatenate([p.sides for p in parts]))
