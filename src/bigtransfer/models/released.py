"""The authors' released models as data, the local cache both download sources share, and what a
downloaded file must be before it is accepted.

`zoo.py` (the authors' bucket) and `hub.py` (the Hugging Face hub) both build on this module, and
neither on the other's internals.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import BigTransferError
from .checkpoint import summarize
from .resnetv2 import RELEASED_ARCHS, ArchSpec, parameter_count, parse_arch

ILSVRC_CLASSES = 1000
IMAGENET21K_CLASSES = 21843

# VTAB-1k tasks as named in the released files, with their class counts.
VTAB_TASK_CLASSES = {
    "caltech101": 102, "cifar100": 100, "dtd": 47, "oxford_flowers102": 102,
    "oxford_iiit_pet": 37, "sun397": 397, "svhn": 10,
    "patch_camelyon": 2, "eurosat": 10, "resisc45": 45, "diabetic_retinopathy": 5,
    "clevr-count": 8, "clevr-distance": 6, "dmlab": 6, "kitti-distance": 4,
    "dsprites-xpos": 16, "dsprites-orientation": 16,
    "smallnorb-azimuth": 18, "smallnorb-elevation": 9,
}  # fmt: skip
# The release has VTAB fine-tunes for every architecture but R152x2.
VTAB_ARCHS = ("R50x1", "R101x1", "R50x3", "R101x3", "R152x4")
VTAB_RUNS = 3


@dataclass(frozen=True)
class ZooEntry:
    """One released file: its name, what it holds, and where it lives in the bucket."""

    name: str
    arch_name: str
    num_classes: int
    relpath: str
    group: str  # upstream | ilsvrc2012 | vtab | distill
    description: str

    @property
    def arch(self) -> ArchSpec:
        return parse_arch(self.arch_name)


def _build_registry() -> dict[str, ZooEntry]:
    entries: list[ZooEntry] = []
    for arch in RELEASED_ARCHS:
        entries.append(ZooEntry(f"BiT-S-{arch}", arch, ILSVRC_CLASSES, f"BiT-S-{arch}.npz", "upstream",
                                "pre-trained on ILSVRC-2012"))
        entries.append(ZooEntry(f"BiT-M-{arch}", arch, IMAGENET21K_CLASSES, f"BiT-M-{arch}.npz", "upstream",
                                "pre-trained on ImageNet-21k"))
        entries.append(ZooEntry(f"BiT-M-{arch}-ILSVRC2012", arch, ILSVRC_CLASSES,
                                f"BiT-M-{arch}-ILSVRC2012.npz", "ilsvrc2012",
                                "BiT-M fine-tuned on ILSVRC-2012"))
    for arch in VTAB_ARCHS:
        for run in range(VTAB_RUNS):
            for task, classes in VTAB_TASK_CLASSES.items():
                name = f"BiT-M-{arch}-run{run}-{task}"
                entries.append(ZooEntry(name, arch, classes, f"vtab/{name}.npz", "vtab",
                                        f"BiT-M fine-tuned on VTAB-1k {task} (run {run})"))
    for name, arch, note in (
        ("R50x1_224", "R50x1", "distilled from BiT-M-R152x2, 224 px (82.8% ILSVRC top-1)"),
        ("R50x1_160", "R50x1", "distilled from BiT-M-R152x2, 160 px (80.5% ILSVRC top-1)"),
        ("R152x2_T_224", "R152x2", "distillation teacher, 224 px"),
        ("R152x2_T_384", "R152x2", "distillation teacher, 384 px"),
    ):
        entries.append(ZooEntry(f"distill/{name}", arch, ILSVRC_CLASSES, f"distill/{name}.npz", "distill", note))
    return {e.name: e for e in entries}


REGISTRY = _build_registry()


def known_models(include_vtab: bool = False) -> list[ZooEntry]:
    """The released models (the 285 VTAB-1k fine-tunes only when asked)."""
    return [e for e in REGISTRY.values() if include_vtab or e.group != "vtab"]


def lookup(name: str) -> ZooEntry | None:
    """The entry for a released name (`BiT-M-R50x1`, `vtab/BiT-M-...`, with or without `.npz`)."""
    key = name.strip().removesuffix(".npz")
    key = key.removeprefix("vtab/")
    return REGISTRY.get(key)


# --------------------------------------------------------------------------- the local cache
def cache_dir() -> Path:
    """Our cache folder: BIGTRANSFER_HOME, or ~/.cache/bigtransfer."""
    return Path(os.environ.get("BIGTRANSFER_HOME") or Path.home() / ".cache" / "bigtransfer")


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- what a download must be
FLOAT32_BYTES = 4
# The released files hold float32 weights and nothing else; half as much again leaves room for
# whatever a re-export adds without letting a server fill the disk.
SIZE_MARGIN = 1.5
ARCHIVE_OVERHEAD = 16 << 20  # zip directory / safetensors header: ~500 arrays' names and offsets need under 1 MB


def size_ceiling(entry: ZooEntry) -> int:
    """The most bytes a file of `entry` can take: float32 weights of its architecture and head, with margin."""
    weights = parameter_count(entry.arch, entry.num_classes) * FLOAT32_BYTES
    return int(weights * SIZE_MARGIN) + ARCHIVE_OVERHEAD


def check_contents(entry: ZooEntry, path: Path, formats: tuple[str, ...], source: str) -> None:
    """Refuse `path` unless it parses as `entry`: one of `formats`, the same architecture and head.

    `source` names where the bytes came from ('bucket', 'hub'), for the message."""
    try:
        summary = summarize(path)
    except BigTransferError as err:
        raise BigTransferError(f"{entry.name}: the {source} file is not BiT weights ({err})") from None
    if summary.source_format not in formats:
        raise BigTransferError(f"{entry.name}: the {source} file is in the {summary.source_format} layout, not "
                               f"{' or '.join(formats)} as released")
    if (summary.arch, summary.num_classes) != (entry.arch, entry.num_classes):
        raise BigTransferError(f"{entry.name}: the {source} file is {summary.describe()}, but {entry.name} is "
                               f"{entry.arch_name} ({entry.num_classes} classes)")
