"""Sharded tar archives (webdataset format) for data that does not fit one disk or must stream.

`pack` writes any source as `train-000000.tar, ...` (+ `test-*.tar`) and a `dataset.json`
naming the classes, shards and counts; JPEG/PNG files are copied byte for byte, other images
are encoded as PNG. Shard URLs may be local paths, http(s) or `pipe:` commands (webdataset's
opener).

Reading for training is deterministic and resumable, without random access:
  * every epoch has its own seeded shard order; the shards are dealt to `processes x workers`
    streams, and each stream shuffles its samples through a seeded buffer;
  * the DataLoader takes micro-batches from its workers in turn, so after S steps every
    stream has produced a known number of samples: a resumed run skips exactly those (reading,
    not decoding them) and continues where the interrupted one stopped.
Resuming with a different number of processes or workers changes the streams; the checkpoint
records the layout, and the run then restarts its stream at the interrupted epoch's start.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import BigTransferError
from .dataset import seeded_cpu_rng
from .images import to_rgb
from .sources import ImageSet, Splits

META = "dataset.json"
FORMAT = "bigtransfer-shards-1"
SHUFFLE_BUFFER = 1000


# --------------------------------------------------------------------------- writing
def _encoded(images: ImageSet, i: int) -> tuple[str, bytes]:
    """(extension, bytes): original JPEG/PNG bytes when the image is a file, else a PNG."""
    if images.paths is not None:
        path = Path(images.paths[i])
        ext = path.suffix.lower().lstrip(".")
        if ext in ("jpg", "jpeg", "png"):
            return ("jpg" if ext == "jpeg" else ext), path.read_bytes()
    buffer = io.BytesIO()
    images.load(i).save(buffer, format="PNG")
    return "png", buffer.getvalue()


def pack(splits: Splits, out: Path, *, shard_size: int = 1000, progress: bool = True) -> dict:
    """Write `splits` as webdataset shards under `out`; returns (and writes) the dataset.json."""
    import webdataset as wds
    from tqdm.auto import tqdm

    if shard_size < 1:
        raise BigTransferError(f"--shard-size must be at least 1, got {shard_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "classes": splits.classes, "multilabel": splits.train.multilabel, "splits": {}}
    for name, images in (("train", splits.train), ("test", splits.test)):
        if images is None:
            continue
        shards: list[str] = []
        with wds.ShardWriter(str(out / f"{name}-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
            for i in tqdm(range(len(images)), desc=f"packing {name}", unit="img", disable=not progress):
                ext, data = _encoded(images, i)
                sample = {"__key__": f"{i:09d}", ext: data, "cls": int(images.labels[i])}
                if images.multilabel:
                    sample["labels.json"] = json.dumps(list(images.label_sets[i])).encode()
                sink.write(sample)
                if sink.fname and Path(sink.fname).name not in shards:
                    shards.append(Path(sink.fname).name)
        meta["splits"][name] = {"shards": shards, "count": len(images)}
    tmp = out / f".{META}.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(out / META)
    return meta


# --------------------------------------------------------------------------- reading
def is_shard_dir(path: Path) -> bool:
    return (Path(path) / META).is_file()


class ShardSet:
    """A packed dataset: its classes and the shard URLs of each split."""

    def __init__(self, root: str | Path):
        self.root = str(root).rstrip("/")
        try:
            meta = json.loads((Path(self.root) / META).read_text())
        except (OSError, ValueError) as err:
            raise BigTransferError(f"{self.root}/{META}: cannot read the shard index ({err})") from None
        if meta.get("format") != FORMAT:
            raise BigTransferError(f"{self.root}/{META}: not a bigtransfer shard index")
        self.classes: list[str] = meta["classes"]
        self.multilabel: bool = meta["multilabel"]
        self.splits = meta["splits"]

    def urls(self, split: str) -> list[str]:
        return [f"{self.root}/{name}" for name in self.splits.get(split, {}).get("shards", [])]

    def count(self, split: str) -> int:
        return int(self.splits.get(split, {}).get("count", 0))


def _decode(sample: dict, num_classes: int, multilabel: bool):
    data = next(sample[k] for k in ("jpg", "png", "jpeg") if k in sample)
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        rgb = to_rgb(image)
    if multilabel:
        hot = torch.zeros(num_classes, dtype=torch.uint8)
        hot[json.loads(sample["labels.json"])] = 1
        return rgb, hot
    return rgb, int(sample["cls"])


def _samples(urls: list[str]) -> Iterator[dict]:
    from webdataset import tariterators

    yield from tariterators.tarfile_samples([{"url": u} for u in urls])


class ShardStream(IterableDataset):
    """Training: an endless, seeded, resumable stream. Evaluation: each sample once, in order."""

    def __init__(self, shards: ShardSet, split: str, transform, *, train: bool, seed: int = 0):
        self.shards, self.split, self.transform, self.train, self.seed = shards, split, transform, train, seed
        self.urls = shards.urls(split)
        if not self.urls:
            raise BigTransferError(f"{shards.root}: no {split} shards")
        # Where a resumed run picks up (set by `loader`): plain attributes, so that workers
        # started by 'spawn' as well as 'fork' receive them.
        self.rank, self.world, self.start_epoch = 0, 1, 0
        self.consumed_batches, self.micro_batch = 0, 1

    def __len__(self) -> int:
        return self.shards.count(self.split)

    @property
    def multilabel(self) -> bool:
        return self.shards.multilabel

    def _stream_id(self) -> tuple[int, int, int, int]:
        """(stream, streams, worker role, workers). A DataLoader takes batch j from worker j % W;
        after a resume at micro-batch c a fresh loader starts at worker 0, so worker w plays the
        role of the interrupted run's worker (w + c) % W to keep the batch order."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        role = (worker + self.consumed_batches) % workers
        return self.rank * workers + role, self.world * workers, role, workers

    def __iter__(self):
        stream, streams, worker, workers = self._stream_id()
        if not self.train:
            yield from self._evaluation(stream, streams)
            return
        if len(self.urls) < streams:
            raise BigTransferError(
                f"{self.shards.root}: {len(self.urls)} {self.split} shards cannot feed {streams} streams "
                f"(processes x workers); pack with a smaller --shard-size"
            )
        # The DataLoader takes micro-batches from its workers in turn: worker w made every
        # workers-th one, starting with the w-th.
        skip = self.micro_batch * max(0, math.ceil((self.consumed_batches - worker) / workers))
        position = 0
        for epoch in range(self.start_epoch, 10**9):
            order = np.random.default_rng([self.seed, epoch, 11]).permutation(len(self.urls))
            mine = [self.urls[i] for i in order[stream::streams]]
            rng = np.random.default_rng([self.seed, epoch, stream, 12])
            for sample in _buffer_shuffle(_samples(mine), rng):
                position += 1
                if position <= skip:
                    continue  # consumed before the resume: read, not decoded
                image, target = _decode(sample, len(self.shards.classes), self.multilabel)
                with seeded_cpu_rng(int(np.random.SeedSequence([self.seed, stream, position]).generate_state(1)[0])):
                    pixels = self.transform(image)
                yield pixels, target

    def _evaluation(self, stream: int, streams: int):
        for sample in _samples(self.urls[stream::streams]):
            image, target = _decode(sample, len(self.shards.classes), self.multilabel)
            yield self.transform(image), target

    def loader(self, start_step: int, rank: int, world: int, micro_batch: int, chunks_per_step: int,
               workers: int, pin_memory: bool, same_layout: bool = True) -> DataLoader:
        """A DataLoader of this process's micro-batches from step `start_step` on.

        `same_layout`: the run being resumed had the same processes and workers, so every
        stream can skip exactly what it produced; otherwise the streams restart at the start of
        the epoch the run was in.
        """
        self.rank, self.world, self.micro_batch = rank, world, micro_batch
        consumed = start_step * chunks_per_step  # micro-batches this process took before the resume
        if same_layout:
            self.start_epoch, self.consumed_batches = 0, consumed
        else:
            self.start_epoch, self.consumed_batches = consumed * micro_batch * world // max(1, len(self)), 0
        return DataLoader(self, batch_size=micro_batch, num_workers=workers, pin_memory=pin_memory,
                          persistent_workers=False)


def _buffer_shuffle(samples: Iterator[dict], rng: np.random.Generator, size: int = SHUFFLE_BUFFER):
    """A seeded shuffle through a bounded buffer (the stream is never held whole)."""
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = int(rng.integers(len(buffer)))
        buffer[i], sample = sample, buffer[i]
        yield sample
    rng.shuffle(buffer)
    yield from buffer
