"""Reading image files as 8-bit RGB, whatever their mode, and checking them cheaply."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Everything PIL raises for a file that is not a readable image.
IMAGE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: grey, palette, alpha (over white), CMYK, 16/32-bit, float."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16-bit PNG/TIFF arrive as these
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if values.max(initial=0) > 255 or image.mode.startswith("I;16") else 255.0
        return Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        low, high = values.min(initial=0.0), values.max(initial=1.0)
        scaled = (values - low) / (high - low if high > low else 1.0) * 255.0
        return Image.fromarray(scaled.astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def load_rgb(path: str | Path) -> Image.Image:
    """Decode a file into an 8-bit RGB image (raises one of IMAGE_ERRORS if it cannot)."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


def probe(path: str | Path) -> tuple[int, int]:
    """(width, height) after checking the file's structure, without decoding the pixels."""
    with Image.open(path) as image:
        size = image.size
        image.verify()  # walks the file: catches truncation in PNG and most corrupt headers
    return size
