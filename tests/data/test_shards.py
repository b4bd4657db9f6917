"""Webdataset shards (`pack`, `ShardSet`, `ShardStream`), the `pack` verb, and procedural glyphs.

Every image, manifest and shard is written inside the test (tmp_path); nothing is downloaded.
Images are small noise patterns, so each one is unique and a decoded sample can be traced back
to its source file by its pixels.
"""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from bigtransfer.cli import main
from bigtransfer.data.procedural import FAMILIES, class_templates, glyphs, render
from bigtransfer.data.shards import (
    FORMAT,
    ShardSet,
    ShardStream,
    _buffer_shuffle,
    is_shard_dir,
    pack,
)
from bigtransfer.data.sources import load_source
from bigtransfer.data.transforms import upstream_transform
from bigtransfer.errors import BigTransferError

SIDE = 8  # every generated image is SIDE x SIDE
CLASSES = ("cat", "dog", "fox")

# --------------------------------------------------------------------------- helpers


def _noise(seed: int, side: int = SIDE) -> Image.Image:
    rng = np.random.default_rng([seed, 777])
    return Image.fromarray(rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8))


def _key(pixels) -> bytes:
    """Identity of a decoded image: its raw uint8 CHW bytes."""
    array = pixels.numpy() if isinstance(pixels, torch.Tensor) else np.asarray(pixels)
    assert array.dtype == np.uint8
    return array.tobytes()


def _source_key(path: Path) -> bytes:
    """The source file decoded like the shard reader does it (PIL -> RGB), as CHW bytes."""
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"))
    return np.ascontiguousarray(rgb.transpose(2, 0, 1)).tobytes()


def _write_folder(root: Path, per_class_train: int, per_class_val: int, extensions: tuple[str, ...]) -> dict:
    """root/train/<class>/NN.<ext> and root/val/<class>/NN.<ext>, extensions taken in turn.

    Returns {split: [(path, label), ...]} in the order the folder source lists them (class, name).
    """
    written: dict[str, list[tuple[Path, int]]] = {"train": [], "test": []}
    seed = 0
    for split, folder, count in (("train", "train", per_class_train), ("test", "val", per_class_val)):
        for label, name in enumerate(CLASSES):
            class_dir = root / folder / name
            class_dir.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                path = class_dir / f"{i:02d}{extensions[(seed + i) % len(extensions)]}"
                image = _noise(seed * 100 + i)
                if path.suffix in (".jpg", ".jpeg"):
                    image.save(path, quality=90)
                else:
                    image.save(path)
                written[split].append((path, label))
            seed += 1
    return written


def _raw() -> v2.PILToTensor:
    return v2.PILToTensor()  # uint8 CHW, deterministic


def _take(loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first n batches of a DataLoader (copied), then stop its workers."""
    batches = []
    for pixels, targets in loader:
        batches.append((pixels.clone(), targets.clone()))
        if len(batches) == n:
            break
    return batches


def _assert_same_batches(got, want) -> None:
    """`got` equals the first len(got) batches of `want` (which must have that many)."""
    assert len(got) <= len(want)
    for i, ((gx, gy), (wx, wy)) in enumerate(zip(got, want)):
        assert torch.equal(gy, wy), f"labels of batch {i} differ: {gy.tolist()} vs {wy.tolist()}"
        assert torch.equal(gx, wx), f"pixels of batch {i} differ"


def _flat(batches) -> list[tuple[bytes, int]]:
    return [(_key(x), int(y)) for pixels, targets in batches for x, y in zip(pixels, targets)]


# --------------------------------------------------------------------------- a packed dataset shared by the stream tests
TRAIN_PER_CLASS, SHARD = 8, 6  # 24 training images in 4 shards of 6
N_TRAIN = TRAIN_PER_CLASS * len(CLASSES)
MICRO = 4
PER_EPOCH = N_TRAIN // MICRO  # 6 micro-batches per epoch


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    written = _write_folder(root / "data", TRAIN_PER_CLASS, 1, (".png", ".jpg"))
    pack(load_source(str(root / "data"), progress=False), root / "shards", shard_size=SHARD, progress=False)
    truth = {_source_key(path): label for path, label in written["train"]}
    assert len(truth) == N_TRAIN  # the images are all different
    return root / "shards", truth


def _stream(out: Path, seed: int = 0, transform=None) -> ShardStream:
    return ShardStream(ShardSet(out), "train", transform or _raw(), train=True, seed=seed)


def _batches(out: Path, n: int, *, start_step: int = 0, workers: int = 0, seed: int = 0, transform=None,
             chunks: int = 1, same_layout: bool = True, rank: int = 0, world: int = 1):
    loader = _stream(out, seed, transform).loader(start_step=start_step, rank=rank, world=world, micro_batch=MICRO,
                                                  chunks_per_step=chunks, workers=workers, pin_memory=False,
                                                  same_layout=same_layout)
    return _take(loader, n)


# --------------------------------------------------------------------------- 1. round trips
def test_pack_image_folder_round_trip(tmp_path):
    written = _write_folder(tmp_path / "data", 5, 2, (".png", ".jpg", ".jpeg", ".bmp"))
    splits = load_source(str(tmp_path / "data"), progress=False)
    out = tmp_path / "shards"
    meta = pack(splits, out, shard_size=4, progress=False)

    train_urls = [f"{out}/train-{i:06d}.tar" for i in range(4)]  # 15 images: 4 + 4 + 4 + 3
    test_urls = [f"{out}/test-{i:06d}.tar" for i in range(2)]  # 6 images: 4 + 2
    assert meta["format"] == FORMAT
    assert meta["splits"]["train"] == {"shards": [Path(u).name for u in train_urls], "count": 15}
    assert meta["splits"]["test"] == {"shards": [Path(u).name for u in test_urls], "count": 6}
    assert json.loads((out / "dataset.json").read_text()) == meta
    # the shards, their index, and our marker, lock and record (the folder is claimed as a pack output)
    assert sorted(p.name for p in out.iterdir()) == sorted([".bigtransfer.json", ".bigtransfer.lock", ".bigtransfer.written", "dataset.json"]
                                                           + [Path(u).name for u in train_urls + test_urls])
    assert is_shard_dir(out) and not is_shard_dir(tmp_path / "data")

    shards = ShardSet(out)
    assert shards.classes == list(CLASSES) and shards.multilabel is False
    assert shards.urls("train") == train_urls and shards.urls("test") == test_urls
    assert (shards.count("train"), shards.count("test"), shards.count("validation")) == (15, 6, 0)
    assert shards.urls("validation") == []
    assert ShardSet(str(out) + "/").urls("train") == train_urls

    for split in ("train", "test"):
        stream = ShardStream(shards, split, _raw(), train=False)
        assert len(stream) == len(written[split])
        got = [(_key(pixels), target) for pixels, target in stream]
        want = [(_source_key(path), label) for path, label in written[split]]
        assert all(isinstance(target, int) for _, target in got)
        assert Counter(got) == Counter(want)
        assert got == want  # evaluation reads each sample once, in packing order

    # JPEG and PNG bytes are copied as they are (.jpeg stored as .jpg); the BMP is encoded as PNG
    with tarfile.open(train_urls[0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert sorted(members) == [f"{i:09d}.{ext}" for i in range(4) for ext in
                               ("cls", ("png", "jpg", "jpg", "png")[i])]
    first_four = [path for path, _ in written["train"][:4]]
    assert [p.suffix for p in first_four] == [".png", ".jpg", ".jpeg", ".bmp"]
    assert members["000000000.png"] == first_four[0].read_bytes()
    assert members["000000001.jpg"] == first_four[1].read_bytes()
    assert members["000000002.jpg"] == first_four[2].read_bytes()
    assert members["000000003.png"].startswith(b"\x89PNG") and members["000000003.png"] != first_four[3].read_bytes()
    assert [members[f"{i:09d}.cls"] for i in range(4)] == [b"0", b"0", b"0", b"0"]


def test_pack_in_memory_glyphs_round_trip(tmp_path):
    splits = load_source("glyphs:classes=4,per_class=5,test_per_class=2,size=16")
    out = tmp_path / "glyph_shards"
    pack(splits, out, shard_size=7, progress=False)
    shards = ShardSet(out)
    assert shards.classes == splits.classes == [f"strokes{c:03d}" for c in range(4)]
    assert [Path(u).name for u in shards.urls("train")] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [Path(u).name for u in shards.urls("test")] == ["test-000000.tar", "test-000001.tar"]
    with tarfile.open(shards.urls("train")[0]) as tar:
        assert sorted({Path(n).suffix for n in tar.getnames()}) == [".cls", ".png"]
    for split, images in (("train", splits.train), ("test", splits.test)):
        got = list(ShardStream(shards, split, _raw(), train=False))
        assert len(got) == len(images) == {"train": 20, "test": 8}[split]
        for i, (pixels, target) in enumerate(got):
            assert pixels.dtype == torch.uint8 and pixels.shape == (3, 16, 16)
            assert torch.equal(pixels, torch.from_numpy(images.pixels[i]).permute(2, 0, 1)), f"{split} image {i}"
            assert target == i % 4


def test_shard_index_errors(tmp_path):
    with pytest.raises(BigTransferError, match="cannot read the shard index"):
        ShardSet(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(BigTransferError, match="cannot read the shard index"):
        ShardSet(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"format": "something-else", "classes": []}))
    with pytest.raises(BigTransferError, match="not a bigtransfer shard index"):
        ShardSet(tmp_path)
    with pytest.raises(BigTransferError, match="--shard-size must be at least 1, got 0"):
        pack(load_source("glyphs:classes=2,per_class=1,test_per_class=0,size=8"), tmp_path / "x", shard_size=0,
             progress=False)
    assert not (tmp_path / "x").exists()

    out = tmp_path / "train_only"
    meta = pack(load_source("glyphs:classes=2,per_class=3,test_per_class=0,size=8"), out, shard_size=4,
                progress=False)
    assert list(meta["splits"]) == ["train"] and meta["splits"]["train"]["count"] == 6
    shards = ShardSet(out)
    assert shards.urls("test") == [] and shards.count("test") == 0
    with pytest.raises(BigTransferError, match="no test shards"):
        ShardStream(shards, "test", _raw(), train=False)


# --------------------------------------------------------------------------- 2. multi-label
def test_multilabel_manifest_packs_multi_hot_targets(tmp_path):
    rows = [("0.png", "cat;dog", "train"), ("1.png", "dog", "train"), ("2.jpg", "bird;cat;dog", "train"),
            ("3.png", " bird ", "train"), ("4.png", "cat", "test"), ("5.jpg", "dog;bird", "val")]
    images = tmp_path / "imgs"
    images.mkdir()
    for i, (name, _, _) in enumerate(rows):
        _noise(500 + i).save(images / name)
    csv_path = tmp_path / "tags.csv"
    csv_path.write_text("path,labels,split\n" + "".join(f"imgs/{n},{labels},{s}\n" for n, labels, s in rows))
    # classes sort alphabetically: bird=0, cat=1, dog=2
    hot = {"0.png": [0, 1, 1], "1.png": [0, 0, 1], "2.jpg": [1, 1, 1], "3.png": [1, 0, 0],
           "4.png": [0, 1, 0], "5.jpg": [1, 0, 1]}

    out = tmp_path / "shards"
    meta = pack(load_source(str(csv_path), progress=False), out, shard_size=3, progress=False)
    assert meta["multilabel"] is True and meta["classes"] == ["bird", "cat", "dog"]
    assert meta["splits"]["train"]["count"] == 4 and meta["splits"]["test"]["count"] == 2
    with tarfile.open(out / "train-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert json.loads(members["000000000.labels.json"]) == [1, 2]  # cat;dog
    assert json.loads(members["000000002.labels.json"]) == [0, 1, 2]
    assert members["000000000.cls"] == b"1" and members["000000001.cls"] == b"2"  # the first label

    shards = ShardSet(out)
    assert shards.multilabel is True and shards.classes == ["bird", "cat", "dog"]
    by_pixels = {_source_key(images / name): hot[name] for name in hot}
    for split, names in (("train", ["0.png", "1.png", "2.jpg", "3.png"]), ("test", ["4.png", "5.jpg"])):
        stream = ShardStream(shards, split, _raw(), train=False)
        assert stream.multilabel is True
        got = list(stream)
        assert [_key(p) for p, _ in got] == [_source_key(images / n) for n in names]
        for (_, target), name in zip(got, names):
            assert target.dtype == torch.uint8 and target.shape == (3,)
            assert target.tolist() == hot[name], name

    # the training stream batches multi-hot targets as uint8 [batch, classes]
    loader = ShardStream(shards, "train", _raw(), train=True, seed=3).loader(
        start_step=0, rank=0, world=1, micro_batch=2, chunks_per_step=1, workers=0, pin_memory=False)
    batches = _take(loader, 2)  # one epoch of 4
    seen = []
    for pixels, targets in batches:
        assert targets.dtype == torch.uint8 and targets.shape == (2, 3)
        for x, t in zip(pixels, targets):
            assert t.tolist() == by_pixels[_key(x)]
            seen.append(_key(x))
    assert sorted(seen) == sorted(_source_key(images / n) for n in ("0.png", "1.png", "2.jpg", "3.png"))


# --------------------------------------------------------------------------- 3. the pack verb
def test_pack_cli(tmp_path, capsys):
    _write_folder(tmp_path / "data", 4, 1, (".png", ".jpg"))
    out = tmp_path / "shards"
    code = main(["pack", "--data", str(tmp_path / "data"), "--out", str(out), "--shard-size", "5", "--quiet"])
    stdout, _ = capsys.readouterr()
    assert code == 0
    assert stdout.splitlines() == ["train: 12 images in 3 shard(s)", "test: 3 images in 1 shard(s)",
                                   f"wrote {out}/dataset.json"]
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["splits"]["train"]["shards"] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert ShardSet(out).count("train") == 12

    glyph_out = tmp_path / "glyphs"
    code = main(["pack", "--data", "glyphs:classes=3,per_class=2,test_per_class=0,size=8", "--out", str(glyph_out),
                 "--quiet"])
    stdout, _ = capsys.readouterr()
    assert code == 0 and stdout.splitlines() == ["train: 6 images in 1 shard(s)", f"wrote {glyph_out}/dataset.json"]

    bad = tmp_path / "bad"
    code = main(["pack", "--data", str(tmp_path / "data"), "--out", str(bad), "--shard-size", "0", "--quiet"])
    stdout, stderr = capsys.readouterr()
    assert code == 2 and stdout == ""
    assert stderr.strip() == "bigtransfer: error: --shard-size must be at least 1, got 0"
    assert not bad.exists()

    code = main(["pack", "--data", str(tmp_path / "missing"), "--out", str(bad), "--quiet"])
    _, stderr = capsys.readouterr()
    assert code == 2 and "no such file or folder" in stderr


# --------------------------------------------------------------------------- 4. training stream determinism
@pytest.mark.parametrize("workers", [0, 2])
def test_training_stream_is_deterministic(packed, workers):
    out, _ = packed
    transform = upstream_transform(SIDE)  # random crops and flips: seeded per sample
    first = _batches(out, 8, workers=workers, seed=5, transform=transform)
    again = _batches(out, 8, workers=workers, seed=5, transform=transform)
    assert len(first) == 8 and first[0][0].shape == (MICRO, 3, SIDE, SIDE) and first[0][0].dtype == torch.float32
    _assert_same_batches(again, first)

    raw_a = _flat(_batches(out, 6, workers=workers, seed=5))
    raw_b = _flat(_batches(out, 6, workers=workers, seed=6))
    assert [k for k, _ in raw_a] != [k for k, _ in raw_b]  # another seed: another order
    assert Counter(raw_a) == Counter(raw_b)  # ...of the same epoch's samples (4 equal shards)


def test_every_epoch_covers_every_sample_once(packed):
    out, truth = packed
    epochs = 3
    samples = _flat(_batches(out, epochs * PER_EPOCH, workers=0, seed=1))
    assert len(samples) == epochs * N_TRAIN
    orders = []
    for e in range(epochs):
        epoch = samples[e * N_TRAIN:(e + 1) * N_TRAIN]
        assert Counter(k for k, _ in epoch) == Counter(list(truth)), f"epoch {e}"
        assert all(truth[k] == label for k, label in epoch)
        orders.append([k for k, _ in epoch])
    assert orders[0] != orders[1] and orders[1] != orders[2]  # each epoch has its own order
    assert orders[0] != list(truth)  # shuffled, not packing order


def test_epoch_coverage_is_split_over_workers_and_ranks(packed):
    out, truth = packed
    # 2 workers, each dealt 2 of the 4 shards: the first epoch's 6 batches hold every sample once
    two_workers = _flat(_batches(out, PER_EPOCH, workers=2, seed=2))
    assert Counter(k for k, _ in two_workers) == Counter(list(truth))
    assert all(truth[k] == label for k, label in two_workers)
    # 2 processes (ranks) of 1 stream each: their first epochs are disjoint halves of the data
    halves = [_flat(_batches(out, PER_EPOCH // 2, workers=0, seed=2, rank=r, world=2)) for r in (0, 1)]
    keys = [{k for k, _ in half} for half in halves]
    assert len(keys[0]) == len(keys[1]) == N_TRAIN // 2 and not keys[0] & keys[1]
    assert keys[0] | keys[1] == set(truth)


@pytest.mark.parametrize(("workers", "world"), [
    (2, 1), (2, 2), (2, 3),
    pytest.param(3, 1, marks=pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker")),
])
def test_evaluation_stream_reads_each_sample_once_over_workers_and_ranks(packed, workers, world):
    """As evaluate_model uses it: rank/world set on the stream, a plain DataLoader with workers.
    (2 workers x 3 ranks = 6 streams for 4 shards: two streams read nothing.)"""
    out, truth = packed
    seen = []
    for rank in range(world):
        stream = ShardStream(ShardSet(out), "train", _raw(), train=False)
        stream.rank, stream.world = rank, world
        seen += _flat(torch.utils.data.DataLoader(stream, batch_size=5, num_workers=workers))
    assert Counter(seen) == Counter(truth.items())


def test_buffer_shuffle_with_small_buffer():
    items = list(range(20))
    first = list(_buffer_shuffle(iter(items), np.random.default_rng(4), size=3))
    again = list(_buffer_shuffle(iter(items), np.random.default_rng(4), size=3))
    other = list(_buffer_shuffle(iter(items), np.random.default_rng(5), size=3))
    assert sorted(first) == items and first == again and first != items and other != first
    assert list(_buffer_shuffle(iter([]), np.random.default_rng(0), size=3)) == []


# --------------------------------------------------------------------------- 5. resuming


@pytest.mark.parametrize(("workers", "start_step", "chunks"), [
    (0, 5, 1), (2, 4, 1), (2, 3, 2),
    (2, 5, 1),  # resuming mid-round of the workers: the new loader's workers take over the roles
    (3, 4, 1),
])
@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core machine: fine here
def test_resume_same_layout_continues_exactly(packed, workers, start_step, chunks):
    out, _ = packed
    transform = upstream_transform(SIDE)  # augmentation must continue exactly too
    skip = start_step * chunks  # micro-batches consumed before the interruption
    after = 2 * PER_EPOCH + 1 - skip  # run past the next epoch boundary (and the one after)
    whole = _batches(out, skip + after, workers=workers, seed=7, transform=transform)
    resumed = _batches(out, after, start_step=start_step, chunks=chunks, workers=workers, seed=7,
                       transform=transform)
    _assert_same_batches(resumed, whole[skip:])


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize(("start_step", "epoch"), [(5, 0), (7, 1), (13, 2)])
def test_resume_other_layout_restarts_the_epoch(packed, workers, start_step, epoch):
    """start_epoch = start_step * chunks * micro_batch * world // len(train) = 7*1*4*1 // 24 = 1, etc.

    Every stream restarts at that epoch's beginning; with 4 equal shards and 24 / 4 = 6 batches
    per epoch (for 1 or 2 workers alike), that is batch 6 * epoch of an uninterrupted stream.
    """
    out, _ = packed
    n = PER_EPOCH + 2
    whole = _batches(out, start_step + n, workers=workers, seed=9)  # start_step >= 6 * epoch
    resumed = _batches(out, n, start_step=start_step, workers=workers, seed=9, same_layout=False)
    _assert_same_batches(resumed, whole[epoch * PER_EPOCH:])
    if start_step % PER_EPOCH:
        assert _flat(resumed) != _flat(whole[start_step:start_step + n])  # not an exact continuation


# --------------------------------------------------------------------------- 6. too few shards
def test_too_few_shards_for_the_streams(tmp_path):
    out = tmp_path / "one"
    pack(load_source("glyphs:classes=2,per_class=3,test_per_class=0,size=8"), out, shard_size=100, progress=False)
    assert len(ShardSet(out).urls("train")) == 1
    stream = ShardStream(ShardSet(out), "train", _raw(), train=True)
    # 2 DataLoader workers: raised in a worker, re-raised in this process
    loader = stream.loader(start_step=0, rank=0, world=1, micro_batch=2, chunks_per_step=1, workers=2,
                           pin_memory=False)
    batches = iter(loader)
    with pytest.raises(BigTransferError, match="pack with a smaller --shard-size") as err:
        next(batches)
    assert "1 train shards cannot feed 2 streams" in str(err.value)
    # Stop the workers now: left to the garbage collector (the traceback holds the iterator),
    # torch's shutdown waits out its 2 x 5 s join timeouts in whichever test runs next.
    batches._shutdown_workers()
    # 2 processes without workers: raised in the main process
    loader = stream.loader(start_step=0, rank=1, world=2, micro_batch=2, chunks_per_step=1, workers=0,
                           pin_memory=False)
    with pytest.raises(BigTransferError, match=r"1 train shards cannot feed 2 streams .*--shard-size"):
        next(iter(loader))
    # evaluation is not affected: each sample once, whatever the streams
    assert [t for _, t in ShardStream(ShardSet(out), "train", _raw(), train=False)] == [0, 1, 0, 1, 0, 1]


# --------------------------------------------------------------------------- 7. procedural glyphs
def test_glyphs_shapes_labels_and_names():
    splits = glyphs(classes=5, per_class=4, test_per_class=2, size=16, seed=0)
    train, test = splits.train, splits.test
    assert train.pixels.shape == (20, 16, 16, 3) and train.pixels.dtype == np.uint8
    assert test.pixels.shape == (10, 16, 16, 3)
    assert train.labels.tolist() == [i % 5 for i in range(20)]
    assert test.labels.tolist() == [i % 5 for i in range(10)]
    assert splits.classes == [f"strokes{c:03d}" for c in range(5)]
    assert np.array_equal(train.pixels[..., 0], train.pixels[..., 2])  # grey rendered as RGB
    assert all(train.pixels[i].std() > 0 for i in range(20)) and all(test.pixels[i].std() > 0 for i in range(10))
    assert not np.array_equal(train.pixels[:10], test.pixels)

    ten = glyphs(classes=10, per_class=1, test_per_class=0, size=8, seed=0)
    assert ten.test is None
    assert ten.classes == [f"strokes{c:03d}" for c in range(5)] + ["shapes005", "shapes006", "shapes007",
                                                                   "textures008", "textures009"]
    assert [t.family for t in class_templates(10, 0)] == [FAMILIES[0]] * 5 + [FAMILIES[1]] * 3 + [FAMILIES[2]] * 2


def test_glyphs_are_a_function_of_the_seed():
    a = glyphs(classes=5, per_class=4, test_per_class=2, size=16, seed=0)
    b = glyphs(classes=5, per_class=4, test_per_class=2, size=16, seed=0)
    c = glyphs(classes=5, per_class=4, test_per_class=2, size=16, seed=1)
    assert np.array_equal(a.train.pixels, b.train.pixels) and np.array_equal(a.test.pixels, b.test.pixels)
    assert not np.array_equal(a.train.pixels, c.train.pixels)
    assert class_templates(12, 3) == class_templates(12, 3) and class_templates(12, 3) != class_templates(12, 4)
    template = class_templates(10, 0)[8]  # a texture
    one = render(template, np.random.default_rng(11), 24)
    assert one.shape == (24, 24) and one.dtype == np.uint8
    assert np.array_equal(one, render(template, np.random.default_rng(11), 24))


def test_glyph_deformation_moves_each_examples_shape_and_zero_changes_nothing():
    strokes, shape = class_templates(10, 0)[0], class_templates(10, 0)[5]
    for template in (strokes, shape):
        plain = render(template, np.random.default_rng(7), 32)
        assert np.array_equal(plain, render(template, np.random.default_rng(7), 32, deform=0.0))
        moved = render(template, np.random.default_rng(7), 32, deform=0.05)
        assert not np.array_equal(plain, moved)
    a = load_source("glyphs:classes=3,per_class=2,test_per_class=0,deform=3")
    b = load_source("glyphs:classes=3,per_class=2,test_per_class=0,deform=3")
    assert np.array_equal(a.train.pixels, b.train.pixels)  # still a function of the seed
    assert not np.array_equal(a.train.pixels, load_source("glyphs:classes=3,per_class=2,test_per_class=0").train.pixels)
    with pytest.raises(BigTransferError, match="deform"):
        glyphs(classes=3, per_class=2, test_per_class=0, deform=40)


@pytest.mark.parametrize("kwargs", [{"classes": 1}, {"size": 4}, {"per_class": 0}, {"test_per_class": -1}])
def test_glyphs_bad_parameters(kwargs):
    params = {"classes": 3, "per_class": 2, "test_per_class": 1, "size": 16, **kwargs}
    with pytest.raises(BigTransferError, match="glyphs: need classes >= 2"):
        glyphs(**params)


def test_glyphs_data_spec():
    splits = load_source("glyphs:classes=3,per_class=2")
    assert splits.train.pixels.shape == (6, 32, 32, 3)  # size 32 by default
    assert splits.test.pixels.shape == (60, 32, 32, 3)  # test_per_class 20 by default
    assert splits.classes == ["strokes000", "strokes001", "strokes002"]
    seeded = load_source("glyphs:classes=3,per_class=2,test_per_class=0,size=8,seed=4")
    assert seeded.test is None
    assert np.array_equal(seeded.train.pixels, glyphs(classes=3, per_class=2, test_per_class=0, size=8,
                                                      seed=4).train.pixels)
    for spec, item in (("glyphs:colour=3", "colour=3"), ("glyphs:classes=x", "classes=x"),
                       ("glyphs:classes", "classes")):
        with pytest.raises(BigTransferError, match="expected classes=N") as err:
            load_source(spec)
        assert f"--data {spec}:" in str(err.value) and repr(item) in str(err.value)
    with pytest.raises(BigTransferError, match=r"glyphs: need classes >= 2, .*\(got 1, 2, 20, 32\)"):
        load_source("glyphs:classes=1,per_class=2")
