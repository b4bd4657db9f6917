"""The Hugging Face hub as a second source of the released weights, through huggingface_hub.

The table below is data: each released name whose weights timm republished on the hub, with the
repository timm's own registry names for it (`timm/models/resnetv2.py`: `hf_hub_id='timm/'` plus
the model name and tag). timm converted each from the authors' file named here: its earlier
registry loaded `resnetv2_50x1_bitm_in21k` from `bit_models/BiT-M-R50x1.npz`,
`resnetv2_50x1_bitm` from `BiT-M-R50x1-ILSVRC2012.npz` and `resnetv2_50x1_bit_distilled` /
`_teacher` / `_teacher_384` from `distill/R50x1_224.npz`, `R152x2_T_224.npz`, `R152x2_T_384.npz`,
and it still maps those old names to the tagged ones below. BiT-S, the VTAB-1k fine-tunes and
`distill/R50x1_160` are in the authors' bucket only.

Files land in huggingface_hub's own cache (HF_HOME / HF_HUB_CACHE), from HF_ENDPOINT, never over
the network under HF_HUB_OFFLINE=1; all three are read when the download runs. A record beside
our cache (`$BIGTRANSFER_HOME/hub/<name>.json`) keeps where the file is and its SHA-256, which must
equal the hub's ETag for the file (an LFS file's ETag is its SHA-256). While huggingface_hub
downloads, every reply it gets is checked first (`hub_guard.py`: hashes that name files, the size,
the time), and the file is recorded only if it lies inside the hub cache and is the released model.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_json
from ..errors import BigTransferError
from .hub_guard import HubGuard
from .released import ZooEntry, cache_dir, check_contents, sha256_of, size_ceiling
from .resnetv2 import RELEASED_ARCHS
from .transfer import Limits

HUB_FILENAME = "model.safetensors"  # timm's safetensors weights name on the hub
DEFAULT_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class HubCopy:
    """Where the hub holds a released model: a repository and a file in timm's state-dict layout."""

    repo_id: str
    filename: str = HUB_FILENAME
    library: str = "timm"


def _timm_name(arch: str) -> str:
    return f"resnetv2_{arch[1:]}_bit"


def _build_table() -> dict[str, HubCopy]:
    table = {}
    for arch in RELEASED_ARCHS:
        table[f"BiT-M-{arch}"] = HubCopy(f"timm/{_timm_name(arch)}.goog_in21k")
        table[f"BiT-M-{arch}-ILSVRC2012"] = HubCopy(f"timm/{_timm_name(arch)}.goog_in21k_ft_in1k")
    table["distill/R50x1_224"] = HubCopy("timm/resnetv2_50x1_bit.goog_distilled_in1k")
    table["distill/R152x2_T_224"] = HubCopy("timm/resnetv2_152x2_bit.goog_teacher_in21k_ft_in1k")
    table["distill/R152x2_T_384"] = HubCopy("timm/resnetv2_152x2_bit.goog_teacher_in21k_ft_in1k_384")
    return table


HUB_COPIES: dict[str, HubCopy] = _build_table()


def hub_copy(name: str) -> HubCopy | None:
    """The hub's copy of a released model, if the hub has one."""
    return HUB_COPIES.get(name)


# --------------------------------------------------------------------------- settings, read when used
_TRUE = {"1", "ON", "YES", "TRUE"}


def endpoint() -> str:
    """The hub's address: HF_ENDPOINT, or huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_cache() -> Path | None:
    """huggingface_hub's cache folder as the environment says now (None: its default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return None


def offline() -> bool:
    """HF_HUB_OFFLINE as set now."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


# --------------------------------------------------------------------------- the record of a download
def record_path(name: str) -> Path:
    """Where the record of `name`'s hub download lives (in our cache, beside the bucket's files)."""
    return cache_dir() / "hub" / f"{name}.json"


def read_record(name: str) -> dict | None:
    """The record of `name`'s hub download, or None if there is none."""
    path = record_path(name)
    try:
        record = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        raise BigTransferError(f"{path}: damaged download record; delete it and download again") from None
    return record if isinstance(record, dict) and isinstance(record.get("path"), str) else None


def cached_file(name: str) -> Path | None:
    """The hub file recorded for `name`, if it is still where it was downloaded to."""
    record = read_record(name)
    if record is None:
        return None
    path = Path(record["path"])
    return path if path.is_file() else None


def verify(name: str) -> bool:
    """True if the hub file recorded for `name` still has the SHA-256 it had when downloaded."""
    record, path = read_record(name), cached_file(name)
    return path is not None and sha256_of(path) == record.get("sha256")


# --------------------------------------------------------------------------- downloading
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
HUB_FORMATS = ("timm",)  # the hub's copies are timm's state dicts


def download(entry: ZooEntry, *, force: bool = False, progress: bool = True, limits: Limits | None = None) -> Path:
    """Fetch `entry` from the hub with huggingface_hub, its traffic held to our limits; accepted only
    if it is the released model, then its SHA-256 recorded."""
    copy = hub_copy(entry.name)
    if copy is None:
        raise BigTransferError(f"{entry.name} has no copy on the Hugging Face hub (only the authors' bucket has "
                               f"it): bigtransfer download {entry.name} --source bucket")
    try:
        import huggingface_hub
        from huggingface_hub import constants as hf_constants
        from huggingface_hub.errors import (
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )
        from huggingface_hub.utils import (
            are_progress_bars_disabled,
            disable_progress_bars,
            enable_progress_bars,
        )
        from huggingface_hub.utils import logging as hf_logging
    except ImportError:
        raise BigTransferError("--source hub needs huggingface_hub: pip install 'bigtransfer[hub]'") from None
    where = f"{endpoint()}/{copy.repo_id} ({copy.filename})"
    guard = HubGuard(entry.name, size_ceiling(entry), limits or Limits.resolve())
    bars_were_off = are_progress_bars_disabled()
    if not progress:
        disable_progress_bars()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its retry warnings: the outcome is our one line
    try:
        path = Path(guard.run(lambda: huggingface_hub.hf_hub_download(
            copy.repo_id, copy.filename, endpoint=endpoint(), cache_dir=hub_cache(), force_download=force,
            local_files_only=offline())))
    except BigTransferError:
        if guard.refused:
            _discard_incomplete(copy, guard.etag)
        raise
    except LocalEntryNotFoundError as err:  # offline, or the hub unreachable, and the file not in the cache
        if offline() or _hf_offline(hf_constants):
            raise BigTransferError(f"{entry.name}: HF_HUB_OFFLINE is set and {copy.repo_id} is not in the hub "
                                   f"cache; unset HF_HUB_OFFLINE to download it") from None
        raise BigTransferError(f"could not reach {where} ({_first_line(err.__cause__ or err)}); check the "
                               f"network, or set HF_ENDPOINT to a mirror") from None
    except RepositoryNotFoundError:
        raise BigTransferError(f"could not download {where}: the hub has no such repository") from None
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", "?")
        raise BigTransferError(f"could not download {where}: HTTP {status} ({_first_line(err)}); run the same "
                               f"command again to resume") from None
    except _network_errors() as err:  # a transfer that broke off, a full disk, ...
        raise BigTransferError(f"{entry.name}: download from {where} broke off ({_first_line(err)}); run the same "
                               f"command again to resume") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if not progress and not bars_were_off:
            enable_progress_bars()
    _check_inside_cache(entry, path, _hub_cache_root(hf_constants))
    digest = sha256_of(path)
    etag = path.resolve().name  # huggingface_hub stores the file under its ETag
    if _SHA256.match(etag) and etag != digest:
        raise BigTransferError(f"{path}: SHA-256 {digest} differs from the hub's {etag}; "
                               f"download again with --force")
    check_contents(entry, path, HUB_FORMATS, "hub")
    write_json(record_path(entry.name), {
        "name": entry.name, "repo_id": copy.repo_id, "filename": copy.filename, "endpoint": endpoint(),
        "revision": path.parent.name, "path": str(path), "sha256": digest,
        "downloaded": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }, what="download record")
    return path


def _hf_offline(hf_constants) -> bool:
    """huggingface_hub's own offline switch (HF_HUB_OFFLINE as read at its import)."""
    is_offline_mode = getattr(hf_constants, "is_offline_mode", None)  # not in huggingface_hub 1.0
    return is_offline_mode() if is_offline_mode else bool(getattr(hf_constants, "HF_HUB_OFFLINE", False))


def _hub_cache_root(hf_constants) -> Path:
    """The folder huggingface_hub wrote into: ours to name (HF_HOME / HF_HUB_CACHE now), else its default."""
    return hub_cache() or Path(hf_constants.HF_HUB_CACHE)


def _check_inside_cache(entry: ZooEntry, path: Path, root: Path) -> None:
    """The file huggingface_hub hands back, and what it links to, must lie inside its cache."""
    root = root.resolve()
    for where in (Path(os.path.abspath(path)), path.resolve()):
        if not where.is_relative_to(root):
            raise BigTransferError(f"{entry.name}: huggingface_hub saved the file at {where}, outside its cache "
                                   f"{root}; not using it")


def _discard_incomplete(copy: HubCopy, etag: str | None) -> None:
    """Remove the partial blob a refused reply left in huggingface_hub's cache (its resume point)."""
    if etag is None:
        return
    from huggingface_hub import constants as hf_constants

    folder = "models--" + copy.repo_id.replace("/", "--")  # huggingface_hub's documented cache layout
    partial = _hub_cache_root(hf_constants) / folder / "blobs" / f"{etag}.incomplete"
    with contextlib.suppress(OSError):
        if stat.S_ISREG(os.lstat(partial).st_mode):
            partial.unlink()


def verify_contents(entry: ZooEntry) -> None:
    """Refuse the recorded hub file for `entry` unless it is the released model."""
    path = cached_file(entry.name)
    if path is not None:
        check_contents(entry, path, HUB_FORMATS, "cached hub")


def _network_errors() -> tuple[type[BaseException], ...]:
    """What a broken transfer raises: OS errors, and the HTTP client's own (httpx for huggingface_hub)."""
    errors: list[type[BaseException]] = [OSError, ValueError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(__import__(module).HTTPError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__
