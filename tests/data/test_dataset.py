"""The augmenting dataset (data/dataset.py) and BiT's transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from image_files import _tiny_png, _truncated_jpeg

from bigtransfer.data.dataset import TransformedImages
from bigtransfer.data.sampler import ChunkSampler, StepBatches
from bigtransfer.data.sources import ImageSet
from bigtransfer.data.transforms import eval_transform, train_transform
from bigtransfer.errors import BigTransferError


def _memory_images(count: int = 4, size: int = 48) -> ImageSet:
    pixels = np.random.default_rng(21).integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    return ImageSet(["p", "q"], [i % 2 for i in range(count)], pixels=pixels, origin="memory")


def test_seeded_items_are_reproducible_and_leave_global_rng_alone():
    data = TransformedImages(_memory_images(), train_transform(40, 32))
    first, label = data[(1, 1234)]
    assert label == 1
    assert first.shape == (3, 32, 32) and first.dtype == torch.float32
    assert first.min() >= -1.0 and first.max() <= 1.0

    torch.manual_seed(0)
    data[(2, 77)]
    data[3]  # unseeded call uses (and moves) the global RNG
    torch.rand(5)
    again, _ = data[(1, 1234)]
    assert torch.equal(first, again)

    state = torch.get_rng_state()
    data[(0, 42)]
    assert torch.equal(torch.get_rng_state(), state)

    variants = {data[(1, seed)][0].numpy().tobytes() for seed in range(12)}
    assert len(variants) > 1  # different seeds give different crops / flips


def test_eval_transform_is_deterministic_and_maps_to_model_range():
    pixels = np.zeros((2, 20, 30, 3), dtype=np.uint8)
    pixels[..., 0] = 255
    pixels[..., 2] = 51
    images = ImageSet(["a", "b"], [0, 1], pixels=pixels)
    data = TransformedImages(images, eval_transform(32))
    x, label = data[1]
    assert label == 1
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x[0], torch.ones(32, 32))
    assert torch.allclose(x[1], -torch.ones(32, 32))
    assert torch.allclose(x[2], torch.full((32, 32), 51 / 255 * 2 - 1), atol=1e-6)
    assert torch.equal(data[0][0], data[0][0])
    assert torch.equal(data[(0, 1)][0], data[(0, 999)][0])


def test_dataloader_with_chunk_sampler_gives_the_chosen_items():
    images = _memory_images(count=6, size=40)
    data = TransformedImages(images, train_transform(36, 32))
    batches = StepBatches(6, 4, seed=0, chunks=2)
    sampler = ChunkSampler(batches, 2, 4, [0, 1])
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=0)
    got = list(loader)
    assert len(got) == 4
    for (x, y), pairs in zip(got, sampler):
        assert x.shape == (2, 3, 32, 32)
        assert y.tolist() == [int(images.labels[i]) for i, _ in pairs]
        assert torch.equal(x[0], data[pairs[0]][0])


def test_undecodable_file_is_replaced_with_a_warning_or_raises_when_strict(tmp_path):
    bad = _truncated_jpeg(tmp_path / "a" / "cut.jpg")
    good = _tiny_png(tmp_path / "a" / "fine.png", 10)
    images = ImageSet(["a", "b"], [0, 0], paths=[str(bad), str(good)], origin=str(tmp_path))
    data = TransformedImages(images, eval_transform(8))
    with pytest.warns(UserWarning, match="cannot decode image"):
        x, _ = data[0]
    assert torch.equal(x, data[1][0])
    with pytest.raises(BigTransferError, match="cut.jpg"):
        TransformedImages(images, eval_transform(8), strict=True)[0]


def test_replacement_image_keeps_its_own_label(tmp_path):
    bad = _truncated_jpeg(tmp_path / "cut.jpg")
    good = _tiny_png(tmp_path / "fine.png", 10)
    images = ImageSet(["a", "b"], [0, 1], paths=[str(bad), str(good)])
    data = TransformedImages(images, eval_transform(8))
    with pytest.warns(UserWarning, match="cannot decode image"):
        _, label = data[0]
    assert label == 1


def test_sixteen_consecutive_failures_give_up(tmp_path):
    paths = []
    for i in range(3):
        path = tmp_path / f"junk{i}.png"
        path.write_bytes(b"")
        paths.append(str(path))
    images = ImageSet(["a", "b"], [0, 1, 0], paths=paths, origin="junkyard")
    with (pytest.warns(UserWarning, match="cannot decode image"),
          pytest.raises(BigTransferError, match="junkyard: 3 images in a row failed")):
        TransformedImages(images, eval_transform(8))[0]
