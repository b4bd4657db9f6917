"""torch Datasets over an ImageSet: decode, transform, label."""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch.utils.data import Dataset

from ..errors import BigTransferError, BigTransferWarning
from .images import IMAGE_ERRORS
from .sources import ImageSet


@contextlib.contextmanager
def seeded_cpu_rng(seed: int):
    """Run a block with torch's CPU generator seeded, then put its state back.

    Only the CPU generator: torch.manual_seed would also visit every accelerator, and with
    torch.random.fork_rng it costs ~0.4 ms, as much as augmenting a small image; this is ~5 us.
    """
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)


class TransformedImages(Dataset):
    """(image tensor, label) pairs; an index may be `(i, seed)` to fix the augmentation's randomness.

    A file that passed the up-front check but fails to decode here (e.g. truncated JPEG data) is
    replaced by the next item with a warning, or raises if `strict`.
    """

    def __init__(self, images: ImageSet, transform, strict: bool = False):
        self.images = images
        self.transform = transform
        self.strict = strict

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        index, image = self._decode(index)  # the index may move on past an undecodable file
        if seed is None:
            pixels = self.transform(image)
        else:
            with seeded_cpu_rng(seed):  # augmentation is a function of the seed; the caller's RNG is untouched
                pixels = self.transform(image)
        return pixels, self.target(index)

    def target(self, index: int):
        """The label (int), or for multi-label data a multi-hot uint8 vector over the classes."""
        if self.images.label_sets is None:
            return int(self.images.labels[index])
        hot = torch.zeros(len(self.images.classes), dtype=torch.uint8)
        hot[list(self.images.label_sets[index])] = 1
        return hot

    def _decode(self, index: int):
        """(index actually used, image): the first decodable item from `index` on."""
        tries = min(len(self.images), 16)
        for attempt in range(tries):
            i = (index + attempt) % len(self.images)
            try:
                return i, self.images.load_for_transform(i)
            except IMAGE_ERRORS as err:
                where = self.images.describe_item(i)
                if self.strict:
                    raise BigTransferError(f"{where}: cannot decode image ({err})") from None
                warnings.warn(f"{where}: cannot decode image ({err}); using the next image instead", BigTransferWarning, stacklevel=2)
        raise BigTransferError(f"{self.images.origin}: {tries} images in a row failed to decode")
