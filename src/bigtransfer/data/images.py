"""Reading image files as 8-bit RGB, whatever their mode, and checking them cheaply.

Every image is opened through `open_image`, which refuses one whose header declares more pixels
than the limit (`--max-pixels`, default 100 million: twice a 50-megapixel photo) before a pixel is
decoded: a 0.5 MB PNG can declare 13000x13000 pixels and cost gigabytes once decoded. Such a
file is an unreadable image like any other: skipped with a count, or an error under --strict.

The limit applies to every frame, not only to the size the container declares:
- ICO and ICNS hold whole PNG (or BMP, JPEG 2000) images that Pillow decodes inside `Image.open`
  (ICO) or `load` (ICNS): each frame's own header is read first (`_check_frames`), and a JPEG 2000
  frame of an ICNS file, whose size would need its codestream parsed, is refused outright.
- Everything else Pillow checks itself before decoding (GIF frames that overflow the screen,
  TIFF tiles, MPO and animated WebP/PNG frames, which we never seek to anyway: only the first
  frame is decoded, at the size checked here); `open_image` sets Pillow's limit so that its checks
  refuse exactly what ours does (Pillow refuses above twice its MAX_IMAGE_PIXELS, and its warnings
  between the two are silenced: the decision is ours).
"""

from __future__ import annotations

import io
import os
import struct
import warnings
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
    """`Image.open` of a path or bytes, refused (ImageTooLarge) above the pixel limit before decoding
    (any frame of it: see the module's note)."""
    limit = max_pixels()
    Image.MAX_IMAGE_PIXELS = -(-limit // 2)  # Pillow's own checks (frames, tiles) then refuse what ours does
    with io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb") as fh:
        _check_frames(fh, limit)
    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    width, height = image.size
    if width * height > limit:
        image.close()
        raise ImageTooLarge(f"{width}x{height} pixels is more than the limit of {limit:,} (--max-pixels)")
    return image


warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)  # below our limit: not a bomb

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_ICON_FRAMES = 1 << 16  # an ICO directory's count is 16 bits


def _check_frames(fh, limit: int) -> None:
    """Refuse (ImageTooLarge) an ICO or ICNS file any of whose frames declares more than `limit` pixels."""
    magic = fh.read(4)
    fh.seek(0)
    if magic == b"\x00\x00\x01\x00":
        sizes = _ico_frame_sizes(fh)
    elif magic == b"icns":
        sizes = _icns_frame_sizes(fh)
    else:
        return
    for width, height in sizes:
        if width * height > limit:
            raise ImageTooLarge(f"a frame of {width}x{height} pixels is more than the limit of {limit:,} "
                                f"(--max-pixels)")


def _embedded_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) a PNG's IHDR declares, if `head` starts a PNG."""
    if head.startswith(PNG_SIGNATURE) and len(head) >= 24:
        return struct.unpack(">II", head[16:24])
    return None


def _ico_frame_sizes(fh) -> list[tuple[int, int]]:
    """Every ICO frame's size, from its own header: a PNG's IHDR or a DIB's BITMAPINFOHEADER."""
    _, _, count = struct.unpack("<HHH", fh.read(6))
    entries = [fh.read(16) for _ in range(count)]
    sizes = []
    for entry in entries:
        if len(entry) < 16:
            break  # a truncated directory: Pillow refuses the file
        (offset,) = struct.unpack("<I", entry[12:16])
        fh.seek(offset)
        head = fh.read(24)
        png = _embedded_size(head)
        if png is not None:
            sizes.append(png)
        elif len(head) >= 12:
            (header_size,) = struct.unpack("<I", head[:4])
            width, height = struct.unpack("<HH", head[4:8]) if header_size == 12 else struct.unpack("<ii", head[4:12])
            sizes.append((abs(width), abs(height)))
    return sizes


def _icns_frame_sizes(fh) -> list[tuple[int, int]]:
    """Every ICNS frame's size that is not fixed by its type: a PNG's IHDR; JPEG 2000 is refused."""
    fh.seek(8)
    sizes = []
    while True:
        header = fh.read(8)
        if len(header) < 8:
            return sizes
        (length,) = struct.unpack(">I", header[4:8])
        start = fh.tell()
        head = fh.read(24)
        png = _embedded_size(head)
        if png is not None:
            sizes.append(png)
        elif head.startswith((b"\xff\x4f\xff\x51", b"\x0d\x0a\x87\x0a", b"\x00\x00\x00\x0cjP  ")):
            raise ImageTooLarge("an ICNS frame in JPEG 2000, whose size cannot be checked before it is decoded")
        if length < 8:
            return sizes  # a damaged block: Pillow refuses the file
        fh.seek(start + length - 8)


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
