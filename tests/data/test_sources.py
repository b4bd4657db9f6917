"""Labelled image sources (data/sources.py): image folders, unreadable files, structural
errors, CSV manifests, CIFAR archives and the built-in digits.

Every image and archive here is generated inside the test (tmp_path); nothing is downloaded.
"""

from __future__ import annotations

import os
import pickle
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from image_files import _class_tree, _pixel, _skip_warnings, _tiny_png, _truncated_png

from bigtransfer.data.sources import load_source
from bigtransfer.errors import BigTransferError

# --------------------------------------------------------------------------- image folders


@pytest.mark.parametrize("held_out_name", ["val", "test"])
def test_folder_with_train_and_held_out_split(tmp_path, held_out_name):
    root = tmp_path / "data"
    # written out of alphabetical order on purpose
    train = _class_tree(root / "train", {"cherry": 2, "apple": 3, "banana": 1})
    held = _class_tree(root / held_out_name, {"banana": 2, "apple": 1, "cherry": 1}, start=50)
    (root / "train" / "apple" / "notes.txt").write_text("not an image")  # ignored, no warning
    _tiny_png(root / "train" / "banana" / "nested" / "deep.png", 200)  # nested files count

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        splits = load_source(str(root))

    assert splits.classes == ["apple", "banana", "cherry"]
    assert len(splits.train) == 7 and len(splits.test) == 4
    assert splits.skipped == []
    for images in (splits.train, splits.test):
        assert images.classes == ["apple", "banana", "cherry"]
        for path, label in zip(images.paths, images.labels):
            class_name = Path(path).relative_to(root).parts[1]
            assert images.classes[label] == class_name
    assert sorted(map(str, train["apple"])) == sorted(
        p for p, lab in zip(splits.train.paths, splits.train.labels) if lab == 0)
    assert {Path(p).name for p in splits.test.paths} == {p.name for ps in held.values() for p in ps}
    assert list(splits.train.class_counts()) == [3, 2, 2]
    assert list(splits.test.class_counts()) == [1, 2, 1]
    assert splits.train.load(0).mode == "RGB"


def test_flat_folder_without_val_fraction_asks_for_it(tmp_path):
    _class_tree(tmp_path / "flat", {"a": 3, "b": 3})
    with pytest.raises(BigTransferError, match="--val-fraction"):
        load_source(str(tmp_path / "flat"))


def _flat_split(root: Path, seed: int):
    splits = load_source(str(root), val_fraction=0.25, seed=seed)
    return splits, [Path(p).name + "/" + Path(p).parent.name for p in splits.test.paths]


def test_flat_folder_with_val_fraction_is_split_per_class(tmp_path):
    root = tmp_path / "flat"
    written = _class_tree(root, {"x": 8, "y": 8, "z": 4})
    splits, held_names = _flat_split(root, seed=0)

    assert splits.classes == ["x", "y", "z"]
    assert list(splits.test.class_counts()) == [2, 2, 1]  # 25 % of each class
    assert list(splits.train.class_counts()) == [6, 6, 3]
    train_paths, test_paths = set(splits.train.paths), set(splits.test.paths)
    assert not train_paths & test_paths
    assert train_paths | test_paths == {str(p) for ps in written.values() for p in ps}
    for images in (splits.train, splits.test):
        for path, label in zip(images.paths, images.labels):
            assert images.classes[label] == Path(path).parent.name

    again, held_again = _flat_split(root, seed=0)
    assert held_again == held_names
    assert again.train.paths == splits.train.paths
    _, held_other = _flat_split(root, seed=1)
    assert held_other != held_names


@pytest.mark.parametrize("fraction", [-0.5, 1.0, 1.5])
def test_val_fraction_out_of_range_is_rejected(tmp_path, fraction):
    _class_tree(tmp_path / "flat", {"a": 3, "b": 3})
    with pytest.raises(BigTransferError, match="--val-fraction must be between 0 and 1"):
        load_source(str(tmp_path / "flat"), val_fraction=fraction)

# --------------------------------------------------------------------------- unreadable files


def _folder_with_bad_files(root: Path) -> list[Path]:
    _class_tree(root / "train", {"a": 3, "b": 3})
    _class_tree(root / "val", {"a": 1, "b": 1}, start=40)
    bad = [root / "train" / "a" / "garbage.jpg", root / "train" / "a" / "zz_cut.png",
           root / "val" / "b" / "empty.png"]
    bad[0].write_bytes(np.random.default_rng(9).bytes(600))
    _truncated_png(bad[1])
    bad[2].write_bytes(b"")
    return bad


def test_unreadable_files_are_skipped_with_one_warning(tmp_path):
    root = tmp_path / "data"
    bad = _folder_with_bad_files(root)
    with pytest.warns(UserWarning, match=r"skipped 3 unreadable image\(s\)") as record:
        splits = load_source(str(root))
    messages = _skip_warnings(record)
    assert len(messages) == 1
    for path in bad:
        assert str(path) in messages[0]
    assert sorted(splits.skipped) == sorted(map(str, bad))
    assert len(splits.train) == 6 and len(splits.test) == 2
    assert not {str(p) for p in bad} & set(splits.train.paths + splits.test.paths)


def test_many_unreadable_files_name_only_the_first_five(tmp_path):
    root = tmp_path / "data"
    _class_tree(root / "train", {"a": 2, "b": 2})
    _class_tree(root / "val", {"a": 1, "b": 1}, start=30)
    bad = []
    for i in range(7):
        bad.append(root / "train" / "b" / f"junk_{i}.jpg")
        bad[-1].write_bytes(b"definitely not a jpeg " * (i + 1))
    with pytest.warns(UserWarning) as record:
        load_source(str(root))
    messages = _skip_warnings(record)
    assert len(messages) == 1
    assert "skipped 7 unreadable" in messages[0]
    named = [p for p in bad if str(p) in messages[0]]
    assert named == bad[:5]
    assert messages[0].endswith(", ...")


def test_strict_mode_raises_on_the_first_unreadable_file(tmp_path):
    root = tmp_path / "data"
    bad = _folder_with_bad_files(root)
    with pytest.raises(BigTransferError, match="not a readable image") as err:
        load_source(str(root), strict=True)
    assert str(bad[0]) in str(err.value)
    assert "--strict" in str(err.value)


def test_class_whose_every_image_is_unreadable_is_an_error(tmp_path):
    root = tmp_path / "data"
    _class_tree(root / "train", {"good": 2})
    (root / "train" / "broken").mkdir()
    (root / "train" / "broken" / "x.png").write_bytes(b"\x89PNG nope")
    _class_tree(root / "val", {"good": 1}, start=10)
    with (pytest.warns(UserWarning, match="skipped 1 unreadable"),
          pytest.raises(BigTransferError, match="class 'broken' has no training images")):
        load_source(str(root))

# --------------------------------------------------------------------------- structural errors


def test_empty_class_folder_is_named(tmp_path):
    root = tmp_path / "data"
    _class_tree(root / "train", {"full": 2})
    empty = root / "train" / "hollow"
    empty.mkdir()
    (empty / "readme.txt").write_text("no pictures here")
    _class_tree(root / "val", {"full": 1})
    with pytest.raises(BigTransferError, match="empty class folder") as err:
        load_source(str(root))
    assert str(empty) in str(err.value)


def test_single_class_with_held_out_split_is_rejected(tmp_path):
    root = tmp_path / "data"
    _class_tree(root / "train", {"lonely": 3})
    _class_tree(root / "val", {"lonely": 1})
    with pytest.raises(BigTransferError, match="classification needs two or more"):
        load_source(str(root))


def test_single_class_flat_folder_with_val_fraction_is_rejected(tmp_path):
    _class_tree(tmp_path / "flat", {"lonely": 4})
    with pytest.raises(BigTransferError, match="only one class"):
        load_source(str(tmp_path / "flat"), val_fraction=0.5)


def test_missing_data_path(tmp_path):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(BigTransferError, match="no such file or folder") as err:
        load_source(str(missing))
    assert str(missing) in str(err.value)
    assert "digits" in str(err.value)  # the message lists the built-ins


def test_folder_without_any_class_folder(tmp_path):
    (tmp_path / "bare").mkdir()
    _tiny_png(tmp_path / "bare" / "loose.png")
    with pytest.raises(BigTransferError, match="bare"):
        load_source(str(tmp_path / "bare"), val_fraction=0.5)


def test_held_out_class_unknown_to_training_split(tmp_path):
    root = tmp_path / "data"
    _class_tree(root / "train", {"a": 2, "b": 2})
    _class_tree(root / "val", {"a": 1, "stranger": 1})
    with pytest.raises(BigTransferError, match="'stranger' does not exist in the training split"):
        load_source(str(root))


def test_unsupported_single_file(tmp_path):
    odd = tmp_path / "data.json"
    odd.write_text("{}")
    with pytest.raises(BigTransferError, match="expected an image folder"):
        load_source(str(odd))


def test_image_folder_with_a_meta_subfolder_is_not_cifar(tmp_path):
    root = tmp_path / "data"
    _class_tree(root / "train", {"a": 2, "b": 2})
    _class_tree(root / "test", {"a": 1, "b": 1}, start=20)
    (root / "meta").mkdir()
    (root / "meta" / "notes.txt").write_text("where the photos came from")
    splits = load_source(str(root))
    assert splits.classes == ["a", "b"]
    assert len(splits.train) == 4 and len(splits.test) == 2

# --------------------------------------------------------------------------- CSV manifests


def _manifest_images(root: Path, count: int) -> list[str]:
    names = []
    for i in range(count):
        _tiny_png(root / "pics" / f"p{i}.png", i * 7)
        names.append(f"pics/p{i}.png")
    return names


def test_manifest_with_split_column_and_numeric_labels(tmp_path, monkeypatch):
    root = tmp_path / "set"
    names = _manifest_images(root, 8)
    rows = [
        (names[0], "10", "train"), (names[1], "2", "train"), (names[2], "1", "Train"),
        (names[3], "10", "train"), (names[4], "2", "val"), (names[5], "1", "test"),
        (names[6], "10", "validation"), (names[7], "2", ""),
    ]
    text = "path,label,split\n" + "".join(f"{p},{lab},{s}\n" for p, lab, s in rows)
    (root / "manifest.csv").write_text(text)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # paths resolve against the CSV's folder, not the cwd

    splits = load_source(str(root / "manifest.csv"))
    assert splits.classes == ["1", "2", "10"]
    assert len(splits.train) == 5 and len(splits.test) == 3

    def by_name(images):
        return {Path(p).name: images.classes[lab] for p, lab in zip(images.paths, images.labels)}

    assert by_name(splits.train) == {"p0.png": "10", "p1.png": "2", "p2.png": "1",
                                     "p3.png": "10", "p7.png": "2"}
    assert by_name(splits.test) == {"p4.png": "2", "p5.png": "1", "p6.png": "10"}
    assert all(Path(p).is_absolute() or Path(p).exists() for p in splits.train.paths)
    assert splits.train.load(0).mode == "RGB"


def test_manifest_text_labels_sort_alphabetically_and_val_fraction_splits(tmp_path):
    names = _manifest_images(tmp_path, 6)
    labels = ["zebra", "ant", "moth", "ant", "zebra", "moth"]
    (tmp_path / "m.csv").write_text(
        "path,label\n" + "".join(f"{n},{lab}\n" for n, lab in zip(names, labels)))
    with pytest.raises(BigTransferError, match="--val-fraction"):
        load_source(str(tmp_path / "m.csv"))
    splits = load_source(str(tmp_path / "m.csv"), val_fraction=0.5)
    assert splits.classes == ["ant", "moth", "zebra"]
    assert list(splits.test.class_counts()) == [1, 1, 1]
    assert list(splits.train.class_counts()) == [1, 1, 1]


def test_manifest_missing_file_names_csv_and_line(tmp_path):
    names = _manifest_images(tmp_path, 2)
    csv_path = tmp_path / "list.csv"
    csv_path.write_text(f"path,label\n{names[0]},a\n{names[1]},b\npics/ghost.png,b\n")
    with pytest.raises(BigTransferError) as err:
        load_source(str(csv_path), val_fraction=0.5)
    message = str(err.value)
    assert str(csv_path) in message
    assert "line 4" in message
    assert "ghost.png" in message


def test_manifest_line_number_counts_blank_lines(tmp_path):
    names = _manifest_images(tmp_path, 2)
    csv_path = tmp_path / "list.csv"
    # line 1 header, 2 row, 3 blank, 4 row, 5 the missing file
    csv_path.write_text(f"path,label\n{names[0]},a\n\n{names[1]},b\npics/ghost.png,b\n")
    with pytest.raises(BigTransferError, match="line 5"):
        load_source(str(csv_path), val_fraction=0.5)


def test_manifest_header_must_name_path_and_label(tmp_path):
    names = _manifest_images(tmp_path, 2)
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text(f"file,class\n{names[0]},a\n{names[1]},b\n")
    with pytest.raises(BigTransferError, match="header must name columns 'path' and 'label'"):
        load_source(str(csv_path), val_fraction=0.5)


def test_manifest_unknown_split_value(tmp_path):
    names = _manifest_images(tmp_path, 3)
    csv_path = tmp_path / "s.csv"
    csv_path.write_text(f"path,label,split\n{names[0]},a,train\n{names[1]},b,train\n"
                        f"{names[2]},b,holdout\n")
    with pytest.raises(BigTransferError, match="unknown split 'holdout'") as err:
        load_source(str(csv_path))
    assert "line 4" in str(err.value)


def test_manifest_empty_and_blank_fields(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("path,label\n")
    with pytest.raises(BigTransferError, match="no rows"):
        load_source(str(empty), val_fraction=0.5)
    names = _manifest_images(tmp_path, 1)
    blank = tmp_path / "blank.csv"
    blank.write_text(f"path,label\n{names[0]},\n")
    with pytest.raises(BigTransferError, match="line 2: empty path or label"):
        load_source(str(blank), val_fraction=0.5)


def test_manifest_unreadable_file_is_skipped_with_warning(tmp_path):
    names = _manifest_images(tmp_path, 4)
    (tmp_path / "pics" / "broken.png").write_bytes(b"")
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("path,label,split\n" + f"{names[0]},a,train\n{names[1]},b,train\n"
                        f"pics/broken.png,a,train\n{names[2]},a,test\n{names[3]},b,test\n")
    with pytest.warns(UserWarning, match="skipped 1 unreadable") as record:
        splits = load_source(str(csv_path))
    assert len(_skip_warnings(record)) == 1
    assert "broken.png" in _skip_warnings(record)[0]
    assert len(splits.train) == 2
    with pytest.raises(BigTransferError, match="broken.png"):
        load_source(str(csv_path), strict=True)


def test_manifest_with_byte_order_mark(tmp_path):
    names = _manifest_images(tmp_path, 4)
    csv_path = tmp_path / "excel.csv"
    text = "path,label,split\n" + "".join(
        f"{n},{lab},{s}\n" for n, lab, s in zip(names, "abab", ("train", "train", "test", "test")))
    csv_path.write_text(text, encoding="utf-8-sig")
    splits = load_source(str(csv_path))
    assert splits.classes == ["a", "b"]

# --------------------------------------------------------------------------- CIFAR archives


def _dump_like_cifar(path: Path, obj) -> None:
    """Pickle with protocol 2, naming numpy's module the way the released files do."""
    data = pickle.dumps(obj, protocol=2)
    data = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    path.write_bytes(data)


CIFAR10_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer",
                 b"dog", b"frog", b"horse", b"ship", b"truck"]


def _fake_cifar10(parent: Path, per_batch: int = 3, n_test: int = 4) -> tuple[Path, dict]:
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(123)
    # every class needs training images: a shuffled 0..9 followed by random extras
    all_labels = [int(v) for v in rng.permutation(10)]
    all_labels += [int(v) for v in rng.integers(0, 10, 5 * per_batch - 10)]
    train_pixels, train_labels = [], []
    for b in range(1, 6):
        pixels = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = all_labels[(b - 1) * per_batch:b * per_batch]
        _dump_like_cifar(folder / f"data_batch_{b}", {
            b"batch_label": f"training batch {b} of 5".encode(), b"labels": labels,
            b"data": pixels, b"filenames": [f"img{b}_{i}.png".encode() for i in range(per_batch)],
        })
        train_pixels.append(pixels)
        train_labels += labels
    test_pixels = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    test_labels = [int(v) for v in rng.integers(0, 10, n_test)]
    _dump_like_cifar(folder / "test_batch", {b"batch_label": b"testing batch 1 of 1",
                                             b"labels": test_labels, b"data": test_pixels})
    _dump_like_cifar(folder / "batches.meta", {b"label_names": CIFAR10_NAMES,
                                               b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    truth = {"train_pixels": np.concatenate(train_pixels), "train_labels": train_labels,
             "test_pixels": test_pixels, "test_labels": test_labels}
    return folder, truth


def _as_hwc(row: np.ndarray) -> np.ndarray:
    """One CIFAR row (R plane, G plane, B plane, each 32x32 row-major) as an HxWx3 image."""
    out = np.empty((32, 32, 3), dtype=np.uint8)
    for channel in range(3):
        plane = row[channel * 1024:(channel + 1) * 1024]
        for y in range(32):
            out[y, :, channel] = plane[y * 32:(y + 1) * 32]
    return out


def _check_cifar10(splits, truth) -> None:
    assert splits.classes == [n.decode() for n in CIFAR10_NAMES]
    assert len(splits.train) == 15 and len(splits.test) == 4
    assert splits.train.labels.tolist() == truth["train_labels"]
    assert splits.test.labels.tolist() == truth["test_labels"]
    # the first image of data_batch_2 is training item 3
    image = splits.train.load(3)
    assert image.mode == "RGB" and image.size == (32, 32)
    np.testing.assert_array_equal(np.asarray(image), _as_hwc(truth["train_pixels"][3]))
    row = truth["train_pixels"][3]
    assert _pixel(image, 5, 2) == (row[2 * 32 + 5], row[1024 + 2 * 32 + 5], row[2048 + 2 * 32 + 5])
    np.testing.assert_array_equal(np.asarray(splits.test.load(3)), _as_hwc(truth["test_pixels"][3]))


def test_cifar10_folder(tmp_path):
    folder, truth = _fake_cifar10(tmp_path)
    splits = load_source(str(folder))
    _check_cifar10(splits, truth)
    assert splits.train.median_area() == 32 * 32


def test_cifar10_tar_gz(tmp_path):
    folder, truth = _fake_cifar10(tmp_path / "src")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    splits = load_source(str(archive))
    _check_cifar10(splits, truth)


def test_cifar100_folder(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(7)
    fine_names = [f"fine{i:02d}".encode() for i in range(100)]
    train_labels = [int(v) for v in rng.permutation(100)] + [42, 7]  # every class present
    train_pixels = rng.integers(0, 256, (len(train_labels), 3072), dtype=np.uint8)
    test_pixels = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
    test_labels = [99, 3]
    _dump_like_cifar(folder / "train", {b"data": train_pixels, b"fine_labels": train_labels,
                                        b"coarse_labels": [v // 5 for v in train_labels]})
    _dump_like_cifar(folder / "test", {b"data": test_pixels, b"fine_labels": test_labels,
                                       b"coarse_labels": [19, 2]})
    _dump_like_cifar(folder / "meta", {b"fine_label_names": fine_names,
                                       b"coarse_label_names": [f"c{i}".encode() for i in range(20)]})
    splits = load_source(str(folder))
    assert len(splits.classes) == 100
    assert splits.classes[0] == "fine00" and splits.classes[99] == "fine99"
    assert len(splits.train) == 102 and len(splits.test) == 2
    assert splits.train.labels.tolist() == train_labels
    assert splits.test.labels.tolist() == test_labels
    np.testing.assert_array_equal(np.asarray(splits.train.load(101)), _as_hwc(train_pixels[101]))
    np.testing.assert_array_equal(np.asarray(splits.test.load(1)), _as_hwc(test_pixels[1]))


class _EvalPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').close()",)


class _SystemPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.mark.parametrize("payload", [_EvalPayload, _SystemPayload])
def test_cifar_pickle_with_foreign_global_is_refused_without_running_it(tmp_path, payload):
    folder, _ = _fake_cifar10(tmp_path)
    marker = tmp_path / "MARKER"
    with open(folder / "data_batch_2", "wb") as fh:
        pickle.dump({b"data": payload(marker), b"labels": [1, 2, 3]}, fh, protocol=2)
    with pytest.raises(BigTransferError, match="data_batch_2") as err:
        load_source(str(folder))
    assert "refusing to load" in str(err.value)
    assert not marker.exists()


def test_cifar_corrupt_member_is_a_user_error(tmp_path):
    folder, _ = _fake_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(b"\x80\x02}q\x00(")  # a pickle cut short
    with pytest.raises(BigTransferError, match="test_batch"):
        load_source(str(folder))

# --------------------------------------------------------------------------- digits


def test_builtin_digits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no file called 'digits' can shadow the built-in
    first = load_source("digits")
    second = load_source("digits", val_fraction=0.5, seed=99)  # the split is fixed
    assert first.classes == [str(d) for d in range(10)]
    assert len(first.train) + len(first.test) == 1797
    assert 0.25 < len(first.test) / 1797 < 0.35
    assert set(first.test.labels.tolist()) == set(range(10))
    np.testing.assert_array_equal(first.test.rows, second.test.rows)
    np.testing.assert_array_equal(first.test.labels, second.test.labels)
    assert not set(first.train.rows.tolist()) & set(first.test.rows.tolist())
    image = first.test.load(0)
    assert image.mode == "RGB" and image.size == (8, 8)
    pixels = np.asarray(image)
    assert pixels.dtype == np.uint8
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    assert pixels.max() > 200  # 0..16 grey levels are stretched to 0..255
    assert first.train.median_area() == 64.0
