"""Import a Hugging Face dataset saved to disk (`Dataset.save_to_disk`) as an image folder.

The `datasets` library reads the Arrow files; we write DEST/train/<class>/*.png and
DEST/test/<class>/*.png, the layout every bigtransfer command reads (VTAB-1k tasks included).
A `validation` split becomes the test split when there is no `test` split; beside one, it is
kept as DEST/validation/ (VTAB-1k's given val200). VTAB-1k's `train800`/`val200` splits keep
their names; `train800val200` (their union) is not written again.

A class name becomes a folder name usable on every OS; distinct names that would share a folder
(`a/b` and `a?b`, `cat` and `cat!`, `Cat` and `cat` on a case-insensitive disk) each get a suffix
from a hash of the name instead of being merged, and a warning says so.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path

from .. import rundir
from ..atomic import flush_to_disk, write_image
from ..errors import BigTransferError, BigTransferWarning
from ..safe_text import quoted
from .images import to_rgb

SPLIT_TARGETS = {"train": "train", "test": "test", "validation": "test", "val": "test",
                 "train800": "train800", "val200": "val200"}
DUPLICATES = ("train800val200",)  # the union of two other splits


def _safe_name(name: str) -> str:
    """A class name usable as a folder name on every OS."""
    cleaned = re.sub(r"[^\w.+-]+", "_", name).strip("._")
    return cleaned or "_"


def class_folders(names: list[str]) -> dict[str, str]:
    """Each distinct class name's folder name: `_safe_name`, with a hash suffix for names that would
    otherwise share a folder (compared case-insensitively); a warning names the first few."""
    groups: dict[str, list[str]] = {}
    for name in dict.fromkeys(names):
        groups.setdefault(_safe_name(name).casefold(), []).append(name)
    folders = {}
    for members in groups.values():
        for name in members:
            digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
            folders[name] = _safe_name(name) if len(members) == 1 else f"{_safe_name(name)}-{digest}"
    if len({f.casefold() for f in folders.values()}) != len(folders):
        raise BigTransferError("class names that differ only in characters a folder name cannot hold collide "
                               "even with a hash suffix; rename the classes")
    shared = [name for members in groups.values() if len(members) > 1 for name in members]
    if shared:
        shown = ", ".join(f"{quoted(n)} -> {folders[n]}" for n in shared[:6])
        warnings.warn(f"{len(shared)} class names would share a folder; each got a suffix instead: {shown}"
                      + (", ..." if len(shared) > 6 else ""), BigTransferWarning, stacklevel=3)
    return folders


def import_hf_dataset(source: Path, dest: Path, *, image_column: str = "image", label_column: str = "label",
                      progress: bool = True) -> dict[str, int]:
    """Write the dataset's images as PNG files by split and class; returns images written per split."""
    with rundir.owned(Path(dest), "import", flag="--root/--task"):
        return _import(source, Path(dest), image_column, label_column, progress)


def _import(source: Path, dest: Path, image_column: str, label_column: str, progress: bool) -> dict[str, int]:
    try:
        import datasets
    except ImportError:
        raise BigTransferError("importing a Hugging Face dataset needs the `datasets` library: "
                               "pip install 'bigtransfer[hf]'") from None
    from tqdm.auto import tqdm

    try:
        loaded = datasets.load_from_disk(str(source))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise BigTransferError(f"{source}: not a Hugging Face dataset saved with save_to_disk ({err})") from None
    splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    chosen = {}
    for name, split in splits.items():
        target = SPLIT_TARGETS.get(name)
        if name in DUPLICATES:
            continue
        if target == "test" and name != "test" and "test" in splits:
            target = "validation"  # kept apart from the test split, not dropped
        if target is None:
            raise BigTransferError(f"{source}: unknown split {quoted(name)} (expected train, validation or test)")
        chosen[target] = split
    if "train" not in chosen and "train800" not in chosen:
        raise BigTransferError(f"{source}: no 'train' split")
    for split in chosen.values():
        for column in (image_column, label_column):
            if column not in split.column_names:
                raise BigTransferError(f"{source}: no column {quoted(column)} (columns: {', '.join(split.column_names)}); "
                                       "use --image-column/--label-column")
    folders = class_folders([name for split in chosen.values() for name in _class_names(split, label_column)])
    written = {}
    for target, split in chosen.items():
        names = getattr(split.features[label_column], "names", None)  # a ClassLabel has names
        for i, row in enumerate(tqdm(split, desc=f"{source.name}:{target}", unit="img", disable=not progress)):
            label = row[label_column]
            folder = dest / target / folders[names[label] if names else str(label)]
            image = row[image_column]
            if not hasattr(image, "save"):
                raise BigTransferError(f"{source}: column {quoted(image_column)} does not hold images")
            write_image(folder / f"{i:07d}.png", to_rgb(image), durable=False)  # one flush at the end
        written[target] = len(split)
    flush_to_disk()
    return written


def _class_names(split, label_column: str) -> list[str]:
    """A split's class names: a ClassLabel's names, or the distinct values of a plain int/string column."""
    names = getattr(split.features[label_column], "names", None)
    return list(names) if names else [str(v) for v in split.unique(label_column)]
