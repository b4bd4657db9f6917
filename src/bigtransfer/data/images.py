"""Reading image files as 8-bit RGB, whatever their mode, and checking them cheaply.

Every image is opened through `open_image`, which refuses one whose header declares more pixels
than the limit (`--max-pixels`, default 100 million: twice a 50-megapixel photo) before a pixel is
decoded: a 0.5 MB PNG can declare 13000x13000 pixels and cost gigabytes once decoded. Such a
file is an unreadable image like any other: skipped with a count, or an error under --strict.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_PIXELS_ENV = "BIGTRANSFER_MAX_PIXELS"  # set by --max-pixels; inherited by loader processes
DEFAULT_MAX_PIXELS = 100_000_000


class ImageTooLarge(Image.DecompressionBombError):
    """The image declares more pixels than the limit (a decompression bomb, or a huge scan)."""


# Everything PIL raises for a file that is not a readable image.
IMAGE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def max_pixels() -> int:
    """The largest image (width x height) this process decodes."""
    value = os.environ.get(MAX_PIXELS_ENV, "")
    return int(value) if value.isdigit() and int(value) > 0 else DEFAULT_MAX_PIXELS


def open_image(source: str | Path | bytes) -> Image.Image:
    """`Image.open` of a path or bytes, refused (ImageTooLarge) above the pixel limit before decoding.

    Pillow's own, lower limit still raises above twice its MAX_IMAGE_PIXELS (an unreadable image,
    too); the CLI raises it to --max-pixels when asked for more."""
    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    width, height = image.size
    limit = max_pixels()
    if width * height > limit:
        image.close()
        raise ImageTooLarge(f"{width}x{height} pixels is more than the limit of {limit:,} (--max-pixels)")
    return image


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


def load_rgb(source: str | Path | bytes) -> Image.Image:
    """Decode a file (or its bytes) into an 8-bit RGB image (raises one of IMAGE_ERRORS if it cannot)."""
    with open_image(source) as image:
        image.load()
        return to_rgb(image)


def probe(path: str | Path) -> tuple[int, int]:
    """(width, height) after checking the file's structure and size, without decoding the pixels."""
    with open_image(path) as image:
        size = image.size
        image.verify()  # walks the file: catches truncation in PNG and most corrupt headers
    return size
