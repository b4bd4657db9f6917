"""Import a Hugging Face dataset saved to disk (`Dataset.save_to_disk`) as an image folder.

The `datasets` library reads the Arrow files; we write DEST/train/<class>/*.png and
DEST/test/<class>/*.png, the layout every bigtransfer command reads (VTAB-1k tasks included).
A `validation` split becomes the test split when there is no `test` split; beside one, it is
kept as DEST/validation/ (VTAB-1k's given val200). VTAB-1k's `train800`/`val200` splits keep
their names; `train800val200` (their union) is not written again.
"""

from __future__ import annotations

import re
from pathlib import Path

from .. import rundir
from ..atomic import flush_to_disk, write_image
from ..errors import BigTransferError
from .images import to_rgb

SPLIT_TARGETS = {"train": "train", "test": "test", "validation": "test", "val": "test",
                 "train800": "train800", "val200": "val200"}
DUPLICATES = ("train800val200",)  # the union of two other splits


def _safe_name(name: str) -> str:
    """A class name usable as a folder name on every OS."""
    cleaned = re.sub(r"[^\w.+-]+", "_", name).strip("._")
    return cleaned or "_"


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
            raise BigTransferError(f"{source}: unknown split {name!r} (expected train, validation or test)")
        chosen[target] = split
    if "train" not in chosen and "train800" not in chosen:
        raise BigTransferError(f"{source}: no 'train' split")
    written = {}
    for target, split in chosen.items():
        for column in (image_column, label_column):
            if column not in split.column_names:
                raise BigTransferError(f"{source}: no column {column!r} (columns: {', '.join(split.column_names)}); "
                                       "use --image-column/--label-column")
        feature = split.features[label_column]
        names = getattr(feature, "names", None)  # a ClassLabel has names; plain ints/strings name themselves
        for i, row in enumerate(tqdm(split, desc=f"{source.name}:{target}", unit="img", disable=not progress)):
            label = row[label_column]
            folder = dest / target / _safe_name(names[label] if names else str(label))
            image = row[image_column]
            if not hasattr(image, "save"):
                raise BigTransferError(f"{source}: column {image_column!r} does not hold images")
            write_image(folder / f"{i:07d}.png", to_rgb(image), durable=False)  # one flush at the end
        written[target] = len(split)
    flush_to_disk()
    return written
