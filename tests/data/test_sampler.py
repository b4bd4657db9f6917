"""The step sampler (data/sampler.py): batches as a pure function of seed and step."""

from __future__ import annotations

import numpy as np
import pytest

from bigtransfer.data.sampler import ChunkSampler, StepBatches
from bigtransfer.errors import BigTransferError


def test_step_indices_are_a_pure_function_of_seed_and_step():
    forward = StepBatches(10, 4, seed=5)
    backward = StepBatches(10, 4, seed=5)
    steps = [0, 1, 2, 3, 7, 12]
    got_forward = {s: forward.indices(s).tolist() for s in steps}
    got_backward = {s: backward.indices(s).tolist() for s in reversed(steps)}
    assert got_forward == got_backward
    assert forward.indices(3).tolist() == got_forward[3]  # asking again changes nothing
    assert StepBatches(10, 4, seed=6).indices(0).tolist() != got_forward[0]
    np.testing.assert_array_equal(forward.sample_seeds(7), backward.sample_seeds(7))


def test_one_epoch_without_replacement_covers_every_example_once():
    batches = StepBatches(12, 4, seed=0)
    assert not batches.replacement
    epoch0 = np.concatenate([batches.indices(s) for s in range(3)])
    epoch1 = np.concatenate([batches.indices(s) for s in range(3, 6)])
    assert sorted(epoch0.tolist()) == list(range(12))
    assert sorted(epoch1.tolist()) == list(range(12))
    assert epoch0.tolist() != epoch1.tolist()  # a fresh permutation per epoch


def test_epochs_that_straddle_a_batch_still_cover_each_example_once():
    batches = StepBatches(10, 4, seed=3)
    stream = np.concatenate([batches.indices(s) for s in range(5)])  # 20 positions = 2 epochs
    assert sorted(stream[:10].tolist()) == list(range(10))
    assert sorted(stream[10:].tolist()) == list(range(10))


def test_small_dataset_samples_with_replacement():
    batches = StepBatches(3, 8, seed=1)
    assert batches.replacement
    for step in range(5):
        idx = batches.indices(step)
        assert len(idx) == 8
        assert idx.min() >= 0 and idx.max() < 3
    np.testing.assert_array_equal(StepBatches(3, 8, seed=1).indices(4), batches.indices(4))


def test_chunks_partition_the_global_batch():
    whole = StepBatches(50, 12, seed=9)
    sharded = StepBatches(50, 12, seed=9, chunks=4)
    assert sharded.chunk_size == 3
    for step in (0, 4, 9):
        pieces = [sharded.chunk(step, c) for c in range(4)]
        assert all(len(p) == 3 for p in pieces)
        flat = [pair for piece in pieces for pair in piece]
        assert [i for i, _ in flat] == sharded.indices(step).tolist()
        assert [s for _, s in flat] == sharded.sample_seeds(step).tolist()
        # the global batch does not depend on how it is cut
        assert sharded.indices(step).tolist() == whole.indices(step).tolist()
        assert all(isinstance(i, int) and isinstance(s, int) for i, s in flat)


@pytest.mark.parametrize("batch, chunks", [(10, 4), (7, 2)])
def test_batch_must_divide_into_chunks(batch, chunks):
    with pytest.raises(BigTransferError, match=f"--batch {batch} must divide evenly into {chunks}"):
        StepBatches(100, batch, seed=0, chunks=chunks)


def test_empty_training_set_is_rejected():
    with pytest.raises(BigTransferError, match="empty"):
        StepBatches(0, 4, seed=0)


def test_chunk_sampler_resumes_from_a_start_step():
    batches = StepBatches(20, 8, seed=3, chunks=4)
    sampler = ChunkSampler(batches, start_step=5, end_step=8, chunk_ids=[1, 3])
    assert len(sampler) == 6
    expected = [batches.chunk(step, c) for step in (5, 6, 7) for c in (1, 3)]
    assert list(sampler) == expected
    full = list(ChunkSampler(StepBatches(20, 8, seed=3, chunks=4), 0, 8, [1, 3]))
    assert len(full) == 16
    assert full[10:] == expected  # resuming at step 5 = skipping the first 5 steps
    assert len(ChunkSampler(batches, 4, 4, [0])) == 0 and list(ChunkSampler(batches, 4, 4, [0])) == []
