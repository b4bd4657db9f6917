"""The authors' released model files: names, the local cache, and downloading.

Files come from the authors' public bucket (`https://storage.googleapis.com/bit_models/`,
override with BIGTRANSFER_BASE_URL for a mirror) into BIGTRANSFER_HOME
(default `~/.cache/bigtransfer`), keeping the bucket's relative paths. Many of them are on the
Hugging Face hub too (`hub.py`); a released name uses whichever copy has been downloaded.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import BigTransferError
from .resnetv2 import RELEASED_ARCHS, ArchSpec, parse_arch

DEFAULT_BASE_URL = "https://storage.googleapis.com/bit_models"
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
    return [e for e in REGISTRY.values() if include_vtab or e.group != "vtab"]


def lookup(name: str) -> ZooEntry | None:
    """The entry for a released name (`BiT-M-R50x1`, `vtab/BiT-M-...`, with or without `.npz`)."""
    key = name.strip().removesuffix(".npz")
    key = key.removeprefix("vtab/")
    return REGISTRY.get(key)


def cache_dir() -> Path:
    return Path(os.environ.get("BIGTRANSFER_HOME") or Path.home() / ".cache" / "bigtransfer")


def cached_path(entry: ZooEntry) -> Path:
    return cache_dir() / entry.relpath


def base_url() -> str:
    return (os.environ.get("BIGTRANSFER_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")


def cached_file(entry: ZooEntry) -> tuple[Path, str] | None:
    """The downloaded file for `entry` and where it came from ('bucket' or 'hub'), if there is one."""
    from . import hub  # hub.py builds on this module

    path = cached_path(entry)
    if path.is_file():
        return path, "bucket"
    hub_file = hub.cached_file(entry.name)
    return (hub_file, "hub") if hub_file is not None else None


def require_cached(entry: ZooEntry) -> Path:
    """The cached file for `entry` (the bucket's or the hub's), or an error naming the command that fetches it."""
    from . import hub

    found = cached_file(entry)
    if found is None:
        copy = hub.hub_copy(entry.name)
        also = f"; the Hugging Face hub has it too ({copy.repo_id}: add --source hub)" if copy else ""
        raise BigTransferError(
            f"{entry.name} is not in the cache ({cached_path(entry)}){also}; fetch it with: "
            f"bigtransfer download {entry.name}"
        )
    return found[0]


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def recorded_sha256(entry: ZooEntry) -> str | None:
    sidecar = _sidecar(cached_path(entry))
    return sidecar.read_text().split()[0] if sidecar.is_file() else None


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def download(entry: ZooEntry, *, force: bool = False, progress: bool = True, timeout: float = 60.0) -> Path:
    """Fetch `entry` into the cache: resumes a partial `.part` file, renames atomically, records SHA-256."""
    from tqdm.auto import tqdm

    dest = cached_path(entry)
    if dest.is_file() and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    url = f"{base_url()}/{entry.relpath}"
    offset = part.stat().st_size if part.is_file() else 0
    response = _open(url, offset, timeout)
    if response.status == 416:  # the .part is already whole (or stale): start over
        response.close()
        part.unlink()
        offset = 0
        response = _open(url, 0, timeout)
    if offset and response.status != 206:  # server ignored the Range header
        offset = 0
    total = _total_size(response, offset)
    try:
        with response, open(part, "ab" if offset else "wb") as out, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=entry.name, disable=not progress,
        ) as bar:
            while block := response.read(1 << 20):
                out.write(block)
                bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
    except (OSError, urllib.error.URLError, http.client.HTTPException) as err:
        raise BigTransferError(
            f"download of {entry.name} broke off ({err}); run the same command again to resume"
        ) from None
    size = part.stat().st_size
    if total is not None and size != total:
        raise BigTransferError(
            f"download of {entry.name} stopped at {size} of {total} bytes; run the same command again to resume"
        )
    digest = sha256_of(part)
    os.replace(part, dest)
    _write_atomic(_sidecar(dest), f"{digest}  {dest.name}\n")
    return dest


def verify(entry: ZooEntry) -> bool:
    """True if the cached file still has the SHA-256 recorded when it was downloaded."""
    recorded = recorded_sha256(entry)
    return recorded is not None and sha256_of(cached_path(entry)) == recorded


def _open(url: str, offset: int, timeout: float):
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416:
            return err
        raise BigTransferError(f"could not download {url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise BigTransferError(
            f"could not reach {url} ({reason}); check the network or set BIGTRANSFER_BASE_URL to a mirror"
        ) from None


def _total_size(response, offset: int) -> int | None:
    """Full file size from Content-Range (partial reply) or Content-Length, if the server says."""
    content_range = response.headers.get("Content-Range")  # e.g. "bytes 100-999/1000"
    if response.status == 206 and content_range and not content_range.endswith("/*"):
        return int(content_range.rsplit("/", 1)[1])
    length = response.headers.get("Content-Length")
    return None if length is None else int(length) + offset
