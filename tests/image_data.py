"""Small generated image datasets for end-to-end tests (learnable in a few dozen steps)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (50, 60, 210)}


def colour_image(rng: np.random.Generator, colour, size: int = 20) -> Image.Image:
    """A noisy background with a filled rectangle of the class colour somewhere on it."""
    pixels = rng.integers(0, 90, size=(size, size, 3), dtype=np.uint8)
    h, w = rng.integers(size // 3, size, size=2)
    top, left = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
    pixels[top:top + h, left:left + w] = np.clip(np.array(colour) + rng.integers(-25, 25, 3), 0, 255)
    return Image.fromarray(pixels)


def write_colour_folder(root: Path, per_class_train: int = 16, per_class_val: int = 6, seed: int = 0) -> Path:
    """root/train/<colour>/*.png and root/val/<colour>/*.png."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class_train), ("val", per_class_val)):
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                colour_image(rng, colour).save(folder / f"{name}_{i:03d}.png")
    return root
