"""BiT's pre-processing with torchvision transforms v2.

Fine-tuning: resize to a square, random crop, random horizontal flip (either can be switched
off where it destroys the label, paper Supp. F). Pre-training: Inception-style random-resized
crop and flip. Test: resize straight to the crop size.
Pixels end up in [-1, 1], the range every BiT model expects.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

MEAN = STD = (0.5, 0.5, 0.5)  # (x / 255 - 0.5) / 0.5 maps [0, 255] onto [-1, 1]


def _to_model_range() -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]


def train_transform(resize: int, crop: int, *, random_crop: bool = True, flip: bool = True) -> v2.Compose:
    steps = [v2.ToImage()]
    if random_crop:
        steps += [v2.Resize((resize, resize), antialias=True), v2.RandomCrop(crop)]
    else:
        steps += [v2.Resize((crop, crop), antialias=True)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps + _to_model_range())


def upstream_transform(resolution: int, min_area: float = 0.08, flip: bool = True) -> v2.Compose:
    """Pre-training: Inception-style random-resized crop (8-100% of the area) and (unless off) a flip."""
    steps = [v2.ToImage(), v2.RandomResizedCrop(resolution, scale=(min_area, 1.0), antialias=True)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps + _to_model_range())


def eval_transform(crop: int) -> v2.Compose:
    return v2.Compose([v2.ToImage(), v2.Resize((crop, crop), antialias=True), *_to_model_range()])


def objectnet_transform(resize: int = 512, crop: int = 480) -> v2.Compose:
    """ObjectNet evaluation: shorter side to `resize` (aspect kept), then a central `crop` square."""
    # An int size makes Resize scale the shorter side; unlike eval_transform, nothing is squashed.
    return v2.Compose([v2.ToImage(), v2.Resize(resize, antialias=True), v2.CenterCrop(crop), *_to_model_range()])
