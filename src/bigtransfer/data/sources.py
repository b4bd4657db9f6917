"""Labelled image sources: an image folder, a CSV manifest, CIFAR-10/100, scikit-learn's digits.

Every source becomes `Splits(train, test)` of `ImageSet`s, which hold either file paths
(decoded on demand) or an in-memory uint8 array. Files that cannot be read are found up front
and skipped with one warning that counts them and names the first few (`strict=True` makes
them an error instead).
"""

from __future__ import annotations

import csv
import io
import os
import pickle
import tarfile
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import BigTransferError, BigTransferWarning
from ..safe_text import path_from_text, path_text, quoted, spreadsheet_value
from .images import IMAGE_ERRORS, probe
from .imageset import ImageSet, Splits

__all__ = ["ImageSet", "Splits", "load_source", "stratified_split"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
SPLIT_NAMES = {"train": "train", "val": "test", "valid": "test", "validation": "test", "test": "test"}
BUILTINS = ("digits", "glyphs")
NAMED_FIRST = 5  # how many skipped files a warning names


# --------------------------------------------------------------------------- entry point
def load_source(spec: str, *, val_fraction: float | None = None, seed: int = 0, strict: bool = False,
                progress: bool = True, require_test: bool = True, separate_val: bool = False,
                warn: bool = True) -> Splits:
    """Open a data source named by `spec`: a folder, a .csv manifest, a CIFAR archive, or a
    built-in (`digits`: scikit-learn's handwritten digits; `glyphs[:classes=N,per_class=N,
    test_per_class=N,size=N,seed=N,deform=N]`: the procedural upstream set).

    A validation split (val/, validation/, val200/ folders or manifest rows) is the test split
    unless `separate_val`, which keeps it apart as `Splits.val` (VTAB-1k's given 800/200).
    Unreadable images are skipped with one warning (`warn=False`: the caller reports `skipped`)."""
    path = Path(spec).expanduser()
    name, _, params = spec.partition(":")
    if name in BUILTINS and not path.exists():
        if name == "glyphs":
            from .procedural import glyphs

            return glyphs(**_builtin_params(spec, params, ("classes", "per_class", "test_per_class", "size", "seed",
                                                               "deform")),
                          progress=progress)
        if params:
            raise BigTransferError(f"--data {spec}: 'digits' takes no parameters")
        return digits()
    if not path.exists():
        raise BigTransferError(
            f"--data {spec}: no such file or folder (built-in sources: {', '.join(BUILTINS)})"
        )
    if path.suffix.lower() == ".csv":
        splits = manifest(path, strict=strict, progress=progress, separate_val=separate_val)
    elif _cifar_kind(path):
        splits = cifar(path)
    elif path.is_dir():
        splits = image_folder(path, strict=strict, progress=progress, separate_val=separate_val)
    else:
        raise BigTransferError(f"--data {spec}: expected an image folder, a .csv manifest or a CIFAR archive")
    if warn:
        warn_skipped(splits.skipped, path)
    _check_classes(splits.train, spec)
    if splits.test is None and (val_fraction or require_test):
        if not val_fraction:
            raise BigTransferError(
                f"--data {spec}: no val/test split found; pass --val-fraction (e.g. 0.2) to hold some out"
            )
        train_idx, test_idx = stratified_split(splits.train.labels, val_fraction, seed)
        splits = Splits(splits.train.subset(train_idx), splits.train.subset(test_idx), splits.skipped)
    return splits


def _builtin_params(spec: str, text: str, allowed: tuple[str, ...]) -> dict[str, int]:
    """'classes=10,per_class=20' -> {'classes': 10, 'per_class': 20}, only keys in `allowed`."""
    params = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in allowed or not value.lstrip("-").isdigit():
            raise BigTransferError(f"--data {spec}: expected {', '.join(k + '=N' for k in allowed)}, got {quoted(item)}")
        params[key] = int(value)
    return params


def _check_classes(images: ImageSet, spec: str) -> None:
    counts = images.class_counts()
    if len(images.classes) < 2:
        raise BigTransferError(f"--data {spec}: only one class ({images.classes}); classification needs two or more")
    empty = [images.classes[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        raise BigTransferError(f"--data {spec}: class {quoted(empty[0])} has no training images")


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out `fraction` of every class (at least one image of any class that has two)."""
    if not 0 < fraction < 1:
        raise BigTransferError(f"--val-fraction must be between 0 and 1, got {fraction}")
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_held = min(len(members) - 1, max(1, round(fraction * len(members)))) if len(members) > 1 else 0
        held.extend(members[:n_held])
        train.extend(members[n_held:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(held, dtype=np.int64))


# --------------------------------------------------------------------------- image folders
VAL_FOLDERS = ("val", "valid", "validation", "val200")


def image_folder(root: Path, *, strict: bool = False, progress: bool = True, separate_val: bool = False) -> Splits:
    """`root/train/<class>/*` with optional `root/val|test/<class>/*`, or just `root/<class>/*`.

    `separate_val`: `root/val|validation|val200/` is kept apart from `root/test/`, and
    `root/train800/` may stand for `root/train/` (VTAB-1k's splits)."""
    def present(*names: str) -> Path | None:
        return next((root / n for n in names if (root / n).is_dir()), None)

    train_dir = present("train", "train800") if separate_val else present("train")
    val_dir = present(*VAL_FOLDERS) if separate_val and train_dir is not None else None
    if train_dir is None:
        train_dir, test_dir = root, None
    else:
        test_dir = present("test") if separate_val else present("val", "valid", "validation", "test")
    classes, paths, labels = _scan_class_folders(train_dir)
    skipped: list[str] = []
    train = _checked_files(classes, paths, labels, skipped, strict, progress, origin=str(train_dir))
    held = []
    for folder in (test_dir, val_dir):
        if folder is not None:
            _, h_paths, h_labels = _scan_class_folders(folder, known=classes)
            held.append(_checked_files(classes, h_paths, h_labels, skipped, strict, progress, origin=str(folder)))
        else:
            held.append(None)
    return Splits(train, held[0], skipped, val=held[1])


def _class_folders(folder: Path) -> list[str]:
    """The class folders of `folder`, sorted (hidden ones left out), as torchvision's ImageFolder
    finds them; without importing torchvision, which costs seconds before any image is read."""
    try:
        classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    except OSError as err:
        raise BigTransferError(f"{folder}: cannot list the folder ({err.strerror})") from None
    if not classes:
        raise BigTransferError(f"{folder}: Couldn't find any class folder in {folder}.")
    return classes


def _scan_class_folders(folder: Path, known: list[str] | None = None) -> tuple[list[str], list[str], list[int]]:
    classes = _class_folders(folder)
    if known is not None:
        unknown = sorted(set(classes) - set(known))
        if unknown:
            raise BigTransferError(f"{folder}: class folder {quoted(unknown[0])} does not exist in the training split")
        classes = known
    index = {name: i for i, name in enumerate(classes)}
    paths, labels = [], []
    for name in classes:
        class_dir = folder / name
        if not class_dir.is_dir():
            continue  # a test split may lack some classes
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files and known is None:
            raise BigTransferError(f"{class_dir}: empty class folder (no {', '.join(IMAGE_EXTENSIONS[:4])}... files)")
        paths.extend(str(p) for p in files)
        labels.extend([index[name]] * len(files))
    return classes, paths, labels


def _checked_files(classes, paths, labels, skipped: list[str], strict: bool, progress: bool, origin: str,
                   label_sets=None) -> ImageSet:
    """Probe every file once (header + structure); drop unreadable ones, or fail if strict."""
    sizes = _probe_all(paths, progress)
    keep = [i for i, size in enumerate(sizes) if size is not None]
    bad = [paths[i] for i, size in enumerate(sizes) if size is None]
    if bad and strict:
        raise BigTransferError(f"{bad[0]}: not a readable image ({len(bad)} such file(s); --strict is on)")
    skipped.extend(bad)
    return ImageSet(classes, [labels[i] for i in keep], paths=[paths[i] for i in keep],
                    sizes=[sizes[i] for i in keep], origin=origin,
                    label_sets=[label_sets[i] for i in keep] if label_sets is not None else None)


def _probe_all(paths: Sequence[str], progress: bool) -> list[tuple[int, int] | None]:
    from tqdm.auto import tqdm

    def safe_probe(path: str):
        try:
            return probe(path)
        except IMAGE_ERRORS:
            return None

    with ThreadPoolExecutor(max_workers=8) as pool:  # file I/O bound: threads suffice
        results = pool.map(safe_probe, paths, chunksize=64)
        return list(tqdm(results, total=len(paths), desc="checking images", unit="img",
                         disable=not progress or len(paths) < 2000))


def warn_skipped(skipped: list[str], where, listed_in: Path | None = None) -> None:
    """One warning for all the unreadable images of a source: the count and the first few names
    (and where the whole list was written, if it was)."""
    if skipped:
        named = ", ".join(map(path_text, skipped[:NAMED_FIRST])) + (", ..." if len(skipped) > NAMED_FIRST else "")
        where_all = f" (all {len(skipped)}: {listed_in})" if listed_in else ""
        warnings.warn(f"{where}: skipped {len(skipped)} unreadable image(s): {named}{where_all}", BigTransferWarning,
                      stacklevel=3)


SKIPPED_LIST = "skipped_images.txt"  # a run's unreadable images, one per line (safe_text.path_text)


def report_skipped(run_dir: Path, skipped: list[str], where, warn: bool = True) -> None:
    """The whole list of a run's unreadable images into its folder; one warning line that points there."""
    from ..atomic import write_text

    if skipped:
        listed = write_text(Path(run_dir) / SKIPPED_LIST, "".join(f"{path_text(path)}\n" for path in skipped),
                            what="list of skipped images")
        if warn:
            warn_skipped(skipped, where, listed_in=listed)


# --------------------------------------------------------------------------- CSV manifests
def manifest(csv_path: Path, *, strict: bool = False, progress: bool = True, separate_val: bool = False) -> Splits:
    """A CSV with a header `path,label[,split]`; paths are relative to the CSV's folder.

    Multi-label data has a `labels` column instead, several labels separated by `;`.
    `separate_val` keeps val/validation/val200 rows apart from test rows (`Splits.val`).
    """
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:  # -sig: spreadsheets write a BOM
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            label_column = "labels" if "labels" in columns else "label"
            if "path" not in columns or label_column not in columns:
                raise BigTransferError(
                    f"{csv_path}: the header must name columns 'path' and 'label' (or 'labels') (got {columns})")
            # reader.line_num is the file's line (DictReader skips blank lines, so counting rows would drift)
            rows = [({k.strip(): (v or "").strip() for k, v in row.items() if k}, reader.line_num)
                    for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise BigTransferError(f"{csv_path}: cannot read the manifest ({err})") from None
    if not rows:
        raise BigTransferError(f"{csv_path}: the manifest has no rows")
    multilabel = label_column == "labels"

    def names_of(row) -> list[str]:
        if multilabel:
            return [spreadsheet_value(n.strip()) for n in row[label_column].split(";") if n.strip()]
        return [spreadsheet_value(row["label"])] if row["label"] else []

    classes = _sorted_labels({name for row, _ in rows for name in names_of(row)})
    index = {name: i for i, name in enumerate(classes)}
    parts: dict[str, tuple[list[str], list[int], list[tuple[int, ...]]]] = {
        "train": ([], [], []), "test": ([], [], []), "val": ([], [], [])}
    split_names = {**SPLIT_NAMES, "train800": "train", "val200": "test"}
    if separate_val:
        split_names.update({name: "val" for name in VAL_FOLDERS})
    has_split = "split" in columns
    for row, line in rows:
        names = names_of(row)
        if not row["path"] or not names:
            raise BigTransferError(f"{csv_path} line {line}: empty path or label")
        file = _manifest_file(csv_path, row["path"])
        if file is None:
            raise BigTransferError(f"{csv_path} line {line}: no such file {quoted(row['path'])}")
        split = split_names.get(row.get("split", "train").lower() or "train") if has_split else "train"
        if split is None:
            raise BigTransferError(f"{csv_path} line {line}: unknown split {quoted(row['split'])} (use train, val or test)")
        parts[split][0].append(str(file))
        parts[split][1].append(index[names[0]])
        parts[split][2].append(tuple(index[n] for n in names))
    skipped: list[str] = []
    splits = {}
    for name, (paths, labels, label_sets) in parts.items():
        if paths:
            splits[name] = _checked_files(classes, paths, labels, skipped, strict, progress, origin=str(csv_path),
                                          label_sets=label_sets if multilabel else None)
    if "train" not in splits:
        raise BigTransferError(f"{csv_path}: no training rows")
    return Splits(splits["train"], splits.get("test"), skipped, val=splits.get("val"))


def _manifest_file(csv_path: Path, cell: str) -> Path | None:
    """The file a manifest's path cell names: as written, or as one of our CSV files renders a path
    (upstream_filtered.csv: spreadsheet-guarded, unprintable characters backslash-escaped)."""
    for text in dict.fromkeys((cell, path_from_text(spreadsheet_value(cell)))):
        file = (csv_path.parent / text).expanduser()
        try:
            if file.is_file():
                return file
        except OSError:  # a name too long for the file system, ...: no such file
            continue
    return None


def _sorted_labels(labels: set[str]) -> list[str]:
    """Numeric labels sort as numbers (so '10' follows '9'); anything else alphabetically."""
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


# --------------------------------------------------------------------------- CIFAR
_CIFAR_FILES = {
    "cifar10": (["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"], ["test_batch"],
                "batches.meta", b"labels", b"label_names"),
    "cifar100": (["train"], ["test"], "meta", b"fine_labels", b"fine_label_names"),
}


def _cifar_kind(path: Path) -> str | None:
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar")):
        names = _archive_names(path)
    else:  # CIFAR's members are files; an image folder's train/ and test/ are folders
        names = {p.name for p in path.iterdir() if p.is_file()} if path.is_dir() else set()
    if "data_batch_1" in names:
        return "cifar10"
    if {"train", "test", "meta"} <= names:
        return "cifar100"
    return None


def _archive_names(path: Path) -> set[str]:
    try:
        with tarfile.open(path) as tar:
            return {Path(m.name).name for m in tar.getmembers() if m.isfile()}
    except (tarfile.TarError, OSError):
        return set()


class _ArrayUnpickler(pickle.Unpickler):
    """Reads the CIFAR python batches, which are pickles, allowing only plain numpy arrays.

    Any other global (a function or class a malicious file could use to run code) is refused.
    """

    ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    })

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        if module.startswith("numpy") and name == "_reconstruct":
            from numpy._core.multiarray import _reconstruct

            return _reconstruct
        return super().find_class(module, name)


MAX_CIFAR_MEMBER = 200 << 20  # bytes; CIFAR-100's train batch, the largest, is ~158 MB


def _read_cifar_members(path: Path, names: list[str]) -> dict[str, dict]:
    """The named CIFAR batches (pickles of numpy arrays), read in one pass over the archive.

    A member's size is checked against what a CIFAR batch can be before it is read: a small
    .tar.gz can inflate to gigabytes."""
    raw: dict[str, bytes] = {}
    try:
        if path.is_dir():
            for name in names:
                file = path / name
                _check_member_size(path, name, file.stat().st_size)
                raw[name] = file.read_bytes()
        else:
            with tarfile.open(path) as tar:
                for member in tar:
                    name = Path(member.name).name
                    if member.isfile() and name in names and name not in raw:
                        _check_member_size(path, name, member.size)
                        raw[name] = tar.extractfile(member).read()
    except (OSError, tarfile.TarError, EOFError, ValueError) as err:
        raise BigTransferError(f"{path}: cannot read the CIFAR archive ({err})") from None
    missing = [n for n in names if n not in raw]
    if missing:
        raise BigTransferError(f"{path}: cannot read CIFAR member {quoted(missing[0])} (not in the archive)")
    batches = {}
    for name, data in raw.items():
        try:
            batches[name] = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
                KeyError) as err:
            raise BigTransferError(f"{path}: cannot read CIFAR member {quoted(name)} ({err})") from None
    return batches


def _check_member_size(path: Path, name: str, size: int) -> None:
    if size > MAX_CIFAR_MEMBER:
        raise BigTransferError(f"{path}: CIFAR member {quoted(name)} is {size:,} bytes, more than a CIFAR batch can be "
                               f"({MAX_CIFAR_MEMBER:,}); not a CIFAR archive")


def cifar(path: Path) -> Splits:
    """CIFAR-10/100 from the python version: the .tar.gz or its extracted folder."""
    kind = _cifar_kind(path)
    train_files, test_files, meta_file, label_key, names_key = _CIFAR_FILES[kind]
    members = _read_cifar_members(path, [meta_file, *train_files, *test_files])
    try:
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in members[meta_file][names_key]]

        def load(files):
            pixels = np.concatenate([np.asarray(members[f][b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                                     for f in files])
            labels = np.concatenate([np.asarray(members[f][label_key], dtype=np.int64) for f in files])
            if len(labels) != len(pixels) or labels.min() < 0 or labels.max() >= len(classes):
                raise ValueError("labels do not match the images or the class list")
            return ImageSet(classes, labels, pixels=pixels.transpose(0, 2, 3, 1).copy(), origin=f"{kind}:{path.name}")

        return Splits(load(train_files), load(test_files))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise BigTransferError(f"{path}: not a CIFAR python archive ({err})") from None


# --------------------------------------------------------------------------- built-ins
DIGITS_TEST_FRACTION = 0.3


def digits() -> Splits:
    """scikit-learn's bundled handwritten digits (1797 8x8 images, 10 classes): real data, offline.

    A fixed stratified 70/30 train/test split, so the test set is the same in every run.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    grey = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    pixels = np.repeat(grey[..., None], 3, axis=-1)
    images = ImageSet([str(d) for d in range(10)], bunch.target, pixels=pixels, origin="digits")
    train_idx, test_idx = stratified_split(images.labels, DIGITS_TEST_FRACTION, seed=0)
    return Splits(images.subset(train_idx), images.subset(test_idx))


def collect_images(inputs: list[str]) -> list[Path]:
    """Image files named directly or found (recursively) in the named folders, in a stable order."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS))
        elif path.is_file():
            files.append(path)
        else:
            raise BigTransferError(f"{item}: no such image file or folder")
    if not files:
        raise BigTransferError(f"no image files found in {', '.join(inputs)}")
    return files


