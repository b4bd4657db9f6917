"""The edits a web copy of an image goes through, as seeded functions: the self-test plants copies
made with them (selftest.py).

Each takes an RGB image and a random generator and returns the edited image as encoded bytes,
the way a copy would sit in a folder (PNG, or JPEG for the re-encoded one), so a planted copy is
decoded exactly like an upstream file.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _is_grey(image: Image.Image) -> bool:
    rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    return bool(np.abs(rgb - rgb[..., :1]).max() <= 2)


def copy(image: Image.Image, rng: np.random.Generator) -> bytes:
    """The same pixels under another name."""
    return _png(image)


def rescale(image: Image.Image, rng: np.random.Generator) -> bytes:
    """Upscaled by 2-4 pixels each way, then back to the original size (bicubic, the usual default)."""
    w, h = image.size
    grow = rng.integers(2, 5, size=2)
    up = image.resize((w + int(grow[0]), h + int(grow[1])), Image.BICUBIC)
    return _png(up.resize((w, h), Image.BICUBIC))


def shift(image: Image.Image, rng: np.random.Generator) -> bytes:
    """Moved by one pixel in one of eight directions; the uncovered row and column repeat the
    border, or are black or white (a copy pasted onto a canvas)."""
    dy, dx = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)][int(rng.integers(8))]
    fill = ("edge", 0, 255)[int(rng.integers(3))]
    pixels = np.asarray(image)
    pad = ((1, 1), (1, 1), (0, 0))[:pixels.ndim]
    padded = np.pad(pixels, pad, mode="edge") if fill == "edge" else np.pad(pixels, pad, constant_values=fill)
    h, w = pixels.shape[:2]
    return _png(Image.fromarray(padded[1 - dy:1 - dy + h, 1 - dx:1 - dx + w]))


def brightness(image: Image.Image, rng: np.random.Generator) -> bytes:
    """Pixel values multiplied by 1.08-1.12 (clipped at white)."""
    factor = rng.uniform(1.08, 1.12)
    pixels = np.asarray(image, dtype=np.float32) * factor
    return _png(Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8)))


def jpeg(image: Image.Image, rng: np.random.Generator) -> bytes:
    """Re-encoded as JPEG at quality 70."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=70)
    return buffer.getvalue()


def grey_rgb(image: Image.Image, rng: np.random.Generator) -> bytes:
    """A colour image converted to grey; a grey one saved as RGB."""
    return _png(image.convert("RGB") if _is_grey(image) else image.convert("L"))


def crop(image: Image.Image, rng: np.random.Generator) -> bytes:
    """Cropped by 2-8% on each side, then resized back to the original size."""
    w, h = image.size
    left, top, right, bottom = (rng.uniform(0.02, 0.08, 4) * [w, h, w, h]).round().astype(int)
    box = (int(left), int(top), max(int(left) + 1, w - int(right)), max(int(top) + 1, h - int(bottom)))
    return _png(image.crop(box).resize((w, h), Image.BILINEAR))


def combined(image: Image.Image, rng: np.random.Generator) -> bytes:
    """Rescaled, shifted, brightened, converted grey/RGB and re-encoded as JPEG."""
    edited = image
    for edit in (rescale, shift, brightness, grey_rgb):
        edited = Image.open(io.BytesIO(edit(edited, rng))).convert("RGB")
    return jpeg(edited, rng)


# The edits a web copy of an image typically has (rescaled, shifted, re-encoded...), then two more.
EDITS: dict[str, Callable[[Image.Image, np.random.Generator], bytes]] = {
    "copy": copy, "rescale": rescale, "shift": shift, "brightness": brightness, "jpeg": jpeg,
    "grey_rgb": grey_rgb, "crop": crop, "combined": combined,
}
