"""Every image as a small grey thumbnail of one canonical size, and the descriptor searched with it.

Near-duplicates are judged on pixels, not on what a classifier thinks the image shows: a network
trained on classes maps every "1" to the same place, so it ranks a copy no better than another
"1". Both images of a pair are reduced to a CANONICAL x CANONICAL grey thumbnail (any size, any
mode: a 28 px grey digit and a 500 px colour photo alike), so every threshold is defined on that
one size and means the same thing for both. Grey, because a copy converted to grey or to RGB
keeps its luma: the thumbnail is ITU-R 601 luma (Pillow's "L"), resized in floating point with an
antialiasing filter.

The search descriptor is the thumbnail pooled to DESCRIPTOR x DESCRIPTOR, mean-removed and scaled
to unit length: the inner product of two descriptors is their normalised correlation at that
coarse size, insensitive to brightness and contrast changes and, because pooling blurs, to
shifts of a pixel. It leaves out a DESCRIPTOR_MARGIN-pixel border: that is where a shifted copy
gets its filled row or column (often black), and where a cropped one lost its pixels, so the
border is the least trustworthy part of a copy; one black row in a hazy photo otherwise moves
its descriptor further than a different photo would.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CANONICAL = 32  # side of the grey thumbnail that every check runs on
DESCRIPTOR = 16  # side of the pooled thumbnail that the candidate index holds
DESCRIPTOR_MARGIN = 2  # canonical pixels of border the descriptor leaves out (see the module doc)
# Standard deviation (grey levels, 0-255) below which a descriptor is shortened: a nearly uniform
# image has no structure to correlate, and a short vector keeps it from being anyone's neighbour.
DESCRIPTOR_FLOOR = 2.0


def grey_thumbnail(image: Image.Image, side: int = CANONICAL) -> np.ndarray:
    """uint8 [side, side]: the image's luma, resized (aspect ratio not kept) with antialiasing."""
    grey = image if image.mode == "L" else image.convert("L")
    small = grey.convert("F").resize((side, side), Image.BILINEAR)
    return np.clip(np.asarray(small) + 0.5, 0, 255).astype(np.uint8)


def _as_float(thumbnails: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(thumbnails)).float()


def descriptors(thumbnails: np.ndarray | torch.Tensor, shift: tuple[int, int] = (0, 0)) -> np.ndarray:
    """float32 [N, DESCRIPTOR**2]: unit-length, mean-removed pooled thumbnails (see the module doc).

    `shift` (dy, dx) moves the thumbnails by whole canonical pixels first (edges repeated): the
    same image seen one pixel off, to query the index with."""
    x = _as_float(thumbnails)[:, None]
    if x.shape[-1] % DESCRIPTOR or x.shape[-1] - 2 * DESCRIPTOR_MARGIN < DESCRIPTOR:
        raise ValueError(f"thumbnails of side {x.shape[-1]} do not pool to {DESCRIPTOR} "
                         f"without their {DESCRIPTOR_MARGIN}-px border")
    dy, dx = shift
    if dy or dx:
        pad = max(abs(dy), abs(dx))
        x = F.pad(x, (pad, pad, pad, pad), mode="replicate")
        side = x.shape[-1] - 2 * pad
        x = x[..., pad - dy:pad - dy + side, pad - dx:pad - dx + side]
    m, side = DESCRIPTOR_MARGIN, x.shape[-1]
    pooled = F.adaptive_avg_pool2d(x[..., m:side - m, m:side - m], DESCRIPTOR).flatten(1)
    pooled = pooled - pooled.mean(dim=1, keepdim=True)
    floor = DESCRIPTOR_FLOOR * DESCRIPTOR  # the norm of a vector whose std is DESCRIPTOR_FLOOR
    return (pooled / pooled.norm(dim=1, keepdim=True).clamp_min(floor)).numpy().astype(np.float32)


def contrast(thumbnails: np.ndarray | torch.Tensor) -> np.ndarray:
    """float32 [N]: each thumbnail's standard deviation in grey levels (0-255)."""
    return _as_float(thumbnails).flatten(1).std(dim=1, unbiased=False).numpy()
