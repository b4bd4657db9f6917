"""Sharded tar archives (webdataset format) for data that does not fit one disk or must stream.

`pack` writes any source as `train-000000.tar, ...` (+ `test-*.tar`) and a `dataset.json`
naming the classes, shards and counts; JPEG/PNG files are copied byte for byte, other images
are encoded as PNG. Shards are plain files in the folder next to `dataset.json`, opened as local
files only: webdataset's URL opener would run a shell for a name starting with `pipe:`, so
neither a folder name nor a shard name in `dataset.json` ever reaches it.

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
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .. import rundir
from ..atomic import write_atomically, write_json
from ..errors import BigTransferError, BigTransferWarning
from ..safe_text import load_json, quoted
from .dataset import seeded_cpu_rng
from .images import IMAGE_ERRORS, load_rgb
from .sources import ImageSet, Splits

META = "dataset.json"
FORMAT = "bigtransfer-shards-1"
SHUFFLE_BUFFER = 1000
SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.tar")
NAMED_FIRST = 5  # undecodable samples named in a warning


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
    if shard_size < 1:
        raise BigTransferError(f"--shard-size must be at least 1, got {shard_size}")
    out = Path(out)
    with rundir.owned(out, "pack"):
        return _pack(splits, out, shard_size, progress)


def _pack(splits: Splits, out: Path, shard_size: int, progress: bool) -> dict:
    meta = {"format": FORMAT, "classes": splits.classes, "multilabel": splits.train.multilabel, "splits": {}}
    for name, images in (("train", splits.train), ("test", splits.test)):
        if images is not None:
            shards = _write_split(images, out, name, shard_size, progress)
            meta["splits"][name] = {"shards": shards, "count": len(images)}
    write_json(out / META, meta)
    return meta


def _write_split(images: ImageSet, out: Path, name: str, shard_size: int, progress: bool) -> list[str]:
    """`name-000000.tar, ...` of `shard_size` samples each, every shard written whole then renamed."""
    import webdataset as wds
    from tqdm.auto import tqdm

    shards: list[str] = []
    with tqdm(total=len(images), desc=f"packing {name}", unit="img", disable=not progress) as bar:
        for start in range(0, len(images), shard_size):
            items = range(start, min(start + shard_size, len(images)))

            def write(stream, items: range = items) -> None:
                with wds.TarWriter(stream) as sink:  # a file object: no URL opener
                    for i in items:
                        ext, data = _encoded(images, i)
                        sample = {"__key__": f"{i:09d}", ext: data, "cls": int(images.labels[i])}
                        if images.multilabel:
                            sample["labels.json"] = json.dumps(list(images.label_sets[i])).encode()
                        sink.write(sample)
                        bar.update()

            shard = f"{name}-{len(shards):06d}.tar"
            write_atomically(out / shard, write, what="shard")
            shards.append(shard)
    return shards


# --------------------------------------------------------------------------- reading
def is_shard_dir(path: Path) -> bool:
    return (Path(path) / META).is_file()


class ShardSet:
    """A packed dataset: its classes and the shard files of each split (checked to be plain files
    inside the folder, since `dataset.json` may come from anywhere)."""

    def __init__(self, root: str | Path):
        self.root = str(root).rstrip("/")
        index = Path(self.root) / META
        try:
            meta = load_json(index.read_text())
        except (OSError, ValueError) as err:
            raise BigTransferError(f"{index}: cannot read the shard index ({err})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise BigTransferError(f"{index}: not a bigtransfer shard index")
        classes, splits = meta.get("classes"), meta.get("splits")
        if (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)
                or not isinstance(meta.get("multilabel"), bool) or not isinstance(splits, dict)):
            raise BigTransferError(f"{index}: damaged shard index (classes, multilabel or splits)")
        for split, info in splits.items():
            shards = info.get("shards") if isinstance(info, dict) else None
            if not isinstance(shards, list) or not isinstance(info.get("count"), int) or info["count"] < 0:
                raise BigTransferError(f"{index}: damaged shard index (split {quoted(split)})")
            for name in shards:
                if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
                    raise BigTransferError(f"{index}: shard name {quoted(name)} is not a plain .tar file name")
                if not (Path(self.root) / name).is_file():
                    raise BigTransferError(f"{index}: shard {quoted(name)} is missing from {self.root}")
        self.classes: list[str] = classes
        self.multilabel: bool = meta["multilabel"]
        self.splits = splits

    def urls(self, split: str) -> list[str]:
        """The split's shard files (local paths)."""
        return [f"{self.root}/{name}" for name in self.splits.get(split, {}).get("shards", [])]

    def count(self, split: str) -> int:
        return int(self.splits.get(split, {}).get("count", 0))


def _decode(sample: dict, num_classes: int, multilabel: bool):
    data = next((sample[k] for k in ("jpg", "png", "jpeg") if k in sample), None)
    if data is None:
        raise UnidentifiedImageError("the sample holds no .jpg or .png image")
    rgb = load_rgb(data)
    if multilabel:
        hot = torch.zeros(num_classes, dtype=torch.uint8)
        hot[load_json(sample["labels.json"])] = 1
        return rgb, hot
    return rgb, int(sample["cls"])


def _samples(paths: list[str]) -> Iterator[dict]:
    """The samples of local tar shards, each file opened here (never through webdataset's opener)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    def streams():
        for path in paths:
            with open(path, "rb") as stream:
                yield {"url": path, "stream": stream}

    yield from group_by_keys(tar_file_expander(streams()))


class ShardStream(IterableDataset):
    """Training: an endless, seeded, resumable stream. Evaluation: each sample once, in order."""

    def __init__(self, shards: ShardSet, split: str, transform, *, train: bool, seed: int = 0, strict: bool = False):
        self.shards, self.split, self.transform, self.train, self.seed = shards, split, transform, train, seed
        self.strict = strict
        self.urls = shards.urls(split)
        if not self.urls:
            raise BigTransferError(f"{shards.root}: no {split} shards")
        # Where a resumed run picks up (set by `loader`): plain attributes, so that workers
        # started by 'spawn' as well as 'fork' receive them.
        self.rank, self.world, self.start_epoch = 0, 1, 0
        self.consumed_batches, self.micro_batch = 0, 1
        self.undecodable = 0  # in this process (or loader worker)

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
        waiting: list[int] = []  # positions of undecodable samples, filled by the next good one
        for epoch in range(self.start_epoch, 10**9):
            order = np.random.default_rng([self.seed, epoch, 11]).permutation(len(self.urls))
            mine = [self.urls[i] for i in order[stream::streams]]
            rng = np.random.default_rng([self.seed, epoch, stream, 12])
            decoded_any = False
            for sample in _buffer_shuffle(_samples(mine), rng):
                position += 1
                if position <= skip:
                    continue  # consumed before the resume: read, not decoded
                decoded = self._decoded(sample)
                if decoded is None:
                    waiting.append(position)
                    continue
                # One output per position, so a resumed stream still skips exactly what was consumed.
                for slot in (*waiting, position):
                    with seeded_cpu_rng(int(np.random.SeedSequence([self.seed, stream, slot]).generate_state(1)[0])):
                        yield self.transform(decoded[0]), decoded[1]
                waiting.clear()
                decoded_any = True
            if waiting and not decoded_any:
                raise BigTransferError(f"{self.shards.root}: no decodable {self.split} image in this stream's shards")

    def _evaluation(self, stream: int, streams: int):
        for sample in _samples(self.urls[stream::streams]):
            decoded = self._decoded(sample)
            if decoded is not None:
                yield self.transform(decoded[0]), decoded[1]

    def _decoded(self, sample: dict):
        """(image, target), or None for a sample that cannot be decoded (an error under `strict`)."""
        try:
            return _decode(sample, len(self.shards.classes), self.multilabel)
        except (*IMAGE_ERRORS, KeyError, IndexError) as err:
            where = f"{sample.get('__url__', self.shards.root)}: sample {sample.get('__key__', '?')}"
            if self.strict:
                raise BigTransferError(f"{where}: cannot decode image ({err})") from None
            self.undecodable += 1
            if self.undecodable <= NAMED_FIRST:
                warnings.warn(f"{where}: cannot decode image ({err}); skipped", BigTransferWarning, stacklevel=2)
            return None

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
