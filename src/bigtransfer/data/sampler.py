"""Which examples form each optimisation step's batch: a pure function of (seed, step).

That one property gives three things the training loop needs:
  * resume: step s's batch is known without replaying steps 0..s-1;
  * sharding: the global batch is cut into `world * split` equal chunks; process r loads
    chunks r*split .. r*split+split-1, so the global batch is the same for any process count;
  * augmentation: every sample carries its own seed, so random crops and flips do not depend on
    which worker process happens to load it.
The data is walked in epochs (a fresh permutation each), or, when the training set is smaller
than one batch, sampled with replacement, as in the authors' release.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from ..errors import BigTransferError


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in keys])


class StepBatches:
    """The global batch of every step, and its split into per-process chunks."""

    def __init__(self, num_examples: int, batch: int, seed: int, *, chunks: int = 1,
                 replacement: bool | None = None):
        if num_examples < 1:
            raise BigTransferError("the training set is empty")
        if batch % chunks:
            raise BigTransferError(
                f"--batch {batch} must divide evenly into {chunks} micro-batches (processes x --batch-split)"
            )
        self.num_examples = num_examples
        self.batch = batch
        self.seed = seed
        self.chunks = chunks
        self.chunk_size = batch // chunks
        self.replacement = num_examples < batch if replacement is None else replacement
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = _rng(self.seed, epoch, 1).permutation(self.num_examples)
            self._perm_epoch = epoch
        return self._perm

    def indices(self, step: int) -> np.ndarray:
        """Dataset indices of step `step`'s global batch."""
        if self.replacement:
            return _rng(self.seed, step, 2).integers(0, self.num_examples, self.batch)
        positions = step * self.batch + np.arange(self.batch)
        out = np.empty(self.batch, dtype=np.int64)
        for epoch in np.unique(positions // self.num_examples):
            mask = positions // self.num_examples == epoch
            out[mask] = self._permutation(int(epoch))[positions[mask] % self.num_examples]
        return out

    def sample_seeds(self, step: int) -> np.ndarray:
        return _rng(self.seed, step, 3).integers(0, 2**31 - 1, self.batch)

    def chunk(self, step: int, chunk: int) -> list[tuple[int, int]]:
        """[(index, sample_seed), ...] of chunk `chunk` of step `step`."""
        lo, hi = chunk * self.chunk_size, (chunk + 1) * self.chunk_size
        return list(zip(self.indices(step)[lo:hi].tolist(), self.sample_seeds(step)[lo:hi].tolist()))


class ChunkSampler(Sampler):
    """Batch sampler for a DataLoader: this process's chunks of steps start..end-1, in order."""

    def __init__(self, batches: StepBatches, start_step: int, end_step: int, chunk_ids: list[int]):
        self.batches = batches
        self.start_step = start_step
        self.end_step = end_step
        self.chunk_ids = chunk_ids

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.end_step):
            for chunk in self.chunk_ids:
                yield self.batches.chunk(step, chunk)

    def __len__(self) -> int:
        return (self.end_step - self.start_step) * len(self.chunk_ids)
