"""Decode once, reuse many times: images decoded and resized to one square side, kept as uint8.

A few-shot sweep fine-tunes dozens of times on subsets of the same images. Decoding a JPEG and
resizing it costs far more than the random crop and flip that follow, so the sweep decodes
every image it will need once per resolution into a `[n, side, side, 3]` uint8 array (a `.npy`
file on disk, memory-mapped, so DataLoader workers and later runs share it) and hands the
training loop a pixel-backed `ImageSet`.

The cached pixels are exactly what the transforms would have computed (the same `ToImage` +
antialiased `Resize`), and the HyperRule transform's own resize is then a no-op, so a cached run
sees bit-identical inputs. The original sizes travel along: the HyperRule measures resolution
from them, not from the cached side.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torchvision.transforms import v2

from ..atomic import write_atomically, write_text
from ..errors import BigTransferError, BigTransferWarning
from .images import IMAGE_ERRORS
from .sources import ImageSet, Splits


def decoded(images: ImageSet, side: int, *, needed: Sequence[int] | None = None, cache_dir: Path | None = None,
            strict: bool = False, progress: bool = True) -> ImageSet:
    """The same images (same length, order and labels) backed by pixels at `side` x `side`.

    Only the items in `needed` (default: all) are decoded; the others must not be read (their
    rows point past the end of the array, so a read is an IndexError, not wrong pixels). With
    `cache_dir` the array is kept on disk, and later runs and other processes reuse it.
    """
    needed = np.arange(len(images)) if needed is None else np.unique(np.asarray(needed, dtype=np.int64))
    if len(needed) == 0:
        raise BigTransferError(f"{images.origin}: nothing to decode")
    if cache_dir is None:
        pixels, sizes = _decode(images, needed, side, strict, progress)
    else:
        pixels, sizes = _load_or_decode(images, needed, side, Path(cache_dir), strict, progress)
    rows = np.full(len(images), len(needed), dtype=np.int64)
    rows[needed] = np.arange(len(needed))
    if images.sizes is not None:
        all_sizes = list(images.sizes)
    else:
        all_sizes = [None] * len(images)
        for i, size in zip(needed.tolist(), sizes):
            all_sizes[i] = size
    return ImageSet(images.classes, images.labels, pixels=pixels, rows=rows, sizes=all_sizes, origin=images.origin,
                    label_sets=images.label_sets)


def _decode(images: ImageSet, needed: np.ndarray, side: int, strict: bool, progress: bool,
            pixels: np.ndarray | None = None) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(pixels [len(needed), side, side, 3], original (w, h) of each), written into `pixels` if given."""
    from tqdm.auto import tqdm

    resize = v2.Compose([v2.ToImage(), v2.Resize((side, side), antialias=True)])
    if pixels is None:
        pixels = np.empty((len(needed), side, side, 3), dtype=np.uint8)
    sizes: list = [None] * len(needed)
    for row, i in enumerate(tqdm(needed.tolist(), desc=f"decoding at {side}px", unit="img", disable=not progress)):
        try:
            image = images.load_for_transform(i)
        except IMAGE_ERRORS as err:
            if strict:
                raise BigTransferError(f"{images.describe_item(i)}: cannot decode image ({err})") from None
            continue
        sizes[row] = image.size if images.paths is not None else (int(image.shape[2]), int(image.shape[1]))
        pixels[row] = resize(image).permute(1, 2, 0).numpy()
    failed = [row for row, size in enumerate(sizes) if size is None]
    if len(failed) == len(needed):
        raise BigTransferError(f"{images.origin}: none of the {len(needed)} images could be decoded")
    if failed:
        # As the on-the-fly path does: an undecodable image is replaced by the next one that decoded.
        warnings.warn(f"{len(failed)} image(s) failed to decode and were replaced by the next image, "
                      f"e.g. {images.describe_item(int(needed[failed[0]]))}", BigTransferWarning, stacklevel=3)
        good = [row for row, size in enumerate(sizes) if size is not None]
        for row in failed:
            source = next((g for g in good if g > row), good[0])
            pixels[row], sizes[row] = pixels[source], sizes[source]
    return pixels, sizes


def _cache_key(images: ImageSet, needed: np.ndarray, side: int) -> str:
    """A name that changes when the images, their files, the selection or the side change."""
    digest = hashlib.sha256(f"{side}|{images.origin}|".encode())
    digest.update(needed.tobytes())
    if images.paths is not None:
        for i in needed.tolist():
            stat = os.stat(images.paths[i])
            digest.update(f"{images.paths[i]}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    else:
        digest.update(np.ascontiguousarray(images.rows[needed]).tobytes())
    return digest.hexdigest()[:20]


def _load_or_decode(images: ImageSet, needed: np.ndarray, side: int, cache_dir: Path, strict: bool, progress: bool):
    stem = cache_dir / f"{side}px-{_cache_key(images, needed, side)}"
    array_path, sizes_path = stem.with_suffix(".npy"), stem.with_suffix(".json")
    if not (array_path.is_file() and sizes_path.is_file()):
        # Decoded straight into the file (a big test split need not fit in memory), written whole
        # under a temporary name: a killed process or two racing workers never leave half a cache.
        sizes: list = []
        write_atomically(array_path, lambda fh: sizes.extend(_decode_into(fh, images, needed, side, strict, progress)),
                         what="decoded image cache")
        write_text(sizes_path, json.dumps({"origin": images.origin, "sizes": sizes}), what="decoded image cache")
    sizes = [tuple(s) for s in json.loads(sizes_path.read_text())["sizes"]]
    # Copy-on-write mapping: pages shared between processes, yet writable, which torch.from_numpy wants.
    return np.load(array_path, mmap_mode="c"), sizes


def _decode_into(fh, images: ImageSet, needed: np.ndarray, side: int, strict: bool, progress: bool) -> list:
    """Decode into `fh` as a .npy file, through a memory map of it; returns the original sizes."""
    shape = (len(needed), side, side, 3)
    np.lib.format.write_array_header_1_0(fh, {"descr": "|u1", "fortran_order": False, "shape": shape})
    fh.flush()
    offset = fh.tell()
    if hasattr(os, "posix_fallocate"):  # the space is taken now: a full disk is an error here, not a SIGBUS later
        os.posix_fallocate(fh.fileno(), 0, offset + int(np.prod(shape)))
    pixels = np.memmap(fh, dtype=np.uint8, mode="r+", offset=offset, shape=shape)
    _, sizes = _decode(images, needed, side, strict, progress, pixels=pixels)
    pixels.flush()
    del pixels
    return sizes


def decoded_splits(splits: Splits, train_side: int, test_side: int, *, needed: Sequence[int] | None = None,
                   cache_dir: Path | None = None, strict: bool = False, progress: bool = True) -> Splits:
    """`decoded` for both splits: training images at the train resize, test images at the crop."""
    train = decoded(splits.train, train_side, needed=needed, cache_dir=cache_dir, strict=strict, progress=progress)
    test = splits.test and decoded(splits.test, test_side, cache_dir=cache_dir, strict=strict, progress=progress)
    return Splits(train, test, splits.skipped)
