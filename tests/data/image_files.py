"""Small image files and folders the data tests write, and how they read warnings."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def _pixel(image: Image.Image, x: int, y: int) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(image)[y, x])


def _close(got: tuple[int, ...], want: tuple[int, ...], tol: int = 1) -> bool:
    return all(abs(g - w) <= tol for g, w in zip(got, want)) and len(got) == len(want)


def _tiny_png(path: Path, shade: int = 0, size: tuple[int, int] = (6, 5)) -> Path:
    """A small RGB PNG whose colour depends on `shade` (so files differ)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (shade % 256, (3 * shade) % 256, 90)).save(path)
    return path


def _class_tree(root: Path, counts: dict[str, int], start: int = 0) -> dict[str, list[Path]]:
    """root/<class>/img_NN.png with counts[class] images each; returns the written paths."""
    written: dict[str, list[Path]] = {}
    shade = start
    for name, count in counts.items():
        written[name] = []
        for i in range(count):
            written[name].append(_tiny_png(root / name / f"img_{i:02d}.png", shade))
            shade += 1
    return written


def _skip_warnings(records) -> list[str]:
    return [str(w.message) for w in records if "unreadable image" in str(w.message)]


def _truncated_png(path: Path) -> Path:
    noise = np.random.default_rng(5).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


def _truncated_jpeg(path: Path) -> Path:
    """A JPEG whose header is intact (so it opens) but whose scan data is cut short."""
    noise = np.random.default_rng(6).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path
