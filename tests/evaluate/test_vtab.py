"""VTAB-1k: the 800/200 split, Supp. F exceptions, score aggregation, the suite on stand-in tasks."""

import json

import numpy as np
import pytest
from PIL import Image

from bigtransfer import BigTransferError
from bigtransfer.cli import main
from bigtransfer.data.sources import load_source
from bigtransfer.evaluate import vtab
from bigtransfer.evaluate.vtab import (
    GROUPS,
    TASKS,
    VtabOptions,
    aggregate,
    augmentation,
    run_vtab,
    vtab_1k_split,
)
from bigtransfer.recipes.finetune import FinetuneOptions

TINY = "R[1,1,1,1]x0.5"


def test_nineteen_tasks_in_three_groups():
    assert len(TASKS) == len(set(TASKS)) == 19
    assert {g: len(t) for g, t in GROUPS.items()} == {"natural": 7, "specialized": 4, "structured": 8}


def test_800_200_split_is_disjoint_fixed_and_seeded():
    parts = vtab_1k_split(5000, seed=0)
    assert [len(parts[k]) for k in ("train800", "val200", "train800val200")] == [800, 200, 1000]
    assert not set(parts["train800"]) & set(parts["val200"])
    assert set(parts["train800"]) | set(parts["val200"]) == set(parts["train800val200"])
    assert parts["train800val200"].max() < 5000
    again = vtab_1k_split(5000, seed=0)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)
    assert not np.array_equal(parts["train800"], vtab_1k_split(5000, seed=1)["train800"])
    assert len(vtab_1k_split(1000)["train800val200"]) == 1000  # a local copy of exactly VTAB-1k
    with pytest.raises(BigTransferError, match="needs 1000 training images, the task has 999"):
        vtab_1k_split(999)


def test_supp_f_augmentation_exceptions():
    no_flip = {t for t in TASKS if not augmentation(t)["flip"]}
    no_crop = {t for t in TASKS if not augmentation(t)["random_crop"]}
    assert no_flip == {"dsprites-orientation", "smallnorb-azimuth", "dsprites-xpos"}
    assert no_crop == {"clevr-count", "clevr-distance", "dmlab", "kitti-distance", "dsprites-xpos"}
    assert augmentation("svhn") == {"flip": True, "random_crop": True}


def test_score_aggregation():
    scores = {"dtd": 0.6, "svhn": 0.8, "eurosat": 0.9, "dmlab": 0.4, "clevr-count": 0.5}
    result = aggregate(scores)
    assert result["groups"] == pytest.approx({"natural": 0.7, "specialized": 0.9, "structured": 0.45})
    assert result["mean"] == pytest.approx(0.64)  # over tasks, not over groups
    assert result["complete"] is False
    full = aggregate({t: 0.5 for t in TASKS})
    assert full["complete"] and full["mean"] == pytest.approx(0.5)
    with pytest.raises(BigTransferError, match="unknown VTAB task 'imagenet'"):
        aggregate({"imagenet": 0.5})


def write_task(root, task, classes=2, train=10, test=3, seed=0):
    """A learnable stand-in: class c is a bright square in corner c of a noisy 12x12 image."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("test", test)):
        for c in range(classes):
            folder = root / task / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 60, (12, 12, 3), dtype=np.uint8)
                y, x = divmod(c, 2)
                pixels[y * 6:y * 6 + 6, x * 6:x * 6 + 6] = 230
                Image.fromarray(pixels).save(folder / f"{i}.png")


def options(root, out, tasks, **kw):
    ft = FinetuneOptions(data="", model=TINY, batch=8, steps=5, resolution=(20, 16), workers=0, progress=False,
                         precision="fp32")
    return VtabOptions(finetune=ft, root=root, out=out, tasks=tasks, train_size=8, val_size=4, **kw)


def test_suite_on_stand_in_tasks(tmp_path, monkeypatch):
    root = tmp_path / "vtab"
    tasks = ("caltech101", "clevr-count", "dsprites-xpos")
    for i, task in enumerate(tasks):
        write_task(root, task, seed=i)
    out = tmp_path / "runs"
    results = run_vtab(options(root, out, tasks, validate=True))
    assert results["finished"] == results["expected"] == 3
    expected_aug = {"caltech101": (True, True), "clevr-count": (True, False), "dsprites-xpos": (False, False)}
    for task, (flip, crop) in expected_aug.items():
        config = json.loads((out / task / "train800val200" / "seed0" / "config.json").read_text())
        assert (config["plan"]["flip"], config["plan"]["random_crop"]) == (flip, crop)
        assert config["plan"]["dataset_size"] == 12
        assert config["options"]["extra"]["vtab_split"] == "train800val200"
        summary = json.loads((out / task / "train800" / "seed0" / "summary.json").read_text())
        assert (summary["train_examples"], summary["test_examples"]) == (8, 4)
        test_summary = json.loads((out / task / "train800val200" / "seed0" / "summary.json").read_text())
        assert test_summary["test_examples"] == 6
    test = results["test"]
    assert set(test["tasks"]) == set(tasks) and set(test["groups"]) == {"natural", "structured"}
    assert test["mean"] == pytest.approx(np.mean(list(test["tasks"].values())))
    assert set(results["val200"]) == set(tasks)
    html = (out / "report.html").read_text()
    assert 'src="data:image/png;base64,' in html and "not all 19 tasks" in html
    assert list((out / "cache").glob("*/*.npy"))

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished run was repeated")

    monkeypatch.setattr(vtab, "run_finetune", must_not_train)
    assert run_vtab(options(root, out, tasks, validate=True))["finished"] == 3


def test_missing_or_unknown_task_is_a_clear_error(tmp_path):
    write_task(tmp_path / "vtab", "dtd")
    with pytest.raises(BigTransferError, match="no folder for task 'svhn'"):
        run_vtab(options(tmp_path / "vtab", tmp_path / "o", ("dtd", "svhn")))
    with pytest.raises(BigTransferError, match="unknown VTAB task 'mnist'"):
        run_vtab(options(tmp_path / "vtab", tmp_path / "o", ("mnist",)))
    write_task(tmp_path / "small", "dtd", train=3)
    with pytest.raises(BigTransferError, match="needs 12 training images, the task has 6"):
        run_vtab(options(tmp_path / "small", tmp_path / "o2", ("dtd",)))


# --------------------------------------------------------------------------- Hugging Face import
def save_hf_dataset(path, label_names=("cat", "dog / wolf")):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)

    def split(n):
        images = [Image.fromarray(rng.integers(0, 255, (9, 11, 3), dtype=np.uint8)) for _ in range(n)]
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(label_names))})
        return datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(n)]}, features=features)

    datasets.DatasetDict({"train": split(14), "validation": split(4)}).save_to_disk(str(path))
    return path


def test_hf_import_then_vtab_through_the_cli(tmp_path, capsys):
    hf = save_hf_dataset(tmp_path / "hf")
    root = tmp_path / "vtab"
    assert main(["vtab-import", "--hf", str(hf), "--root", str(root), "--task", "dtd", "--quiet"]) == 0
    assert "14 train images, 4 test images" in capsys.readouterr().out
    splits = load_source(str(root / "dtd"), progress=False)
    assert splits.classes == ["cat", "dog_wolf"] and (len(splits.train), len(splits.test)) == (14, 4)
    assert main(["vtab", "--root", str(root), "--tasks", "dtd", "--model", TINY, "--steps", "3", "--batch", "8",
                 "--resolution", "20/16", "--workers", "0", "--quiet", "--out", str(tmp_path / "r")]) == 2
    assert "needs 1000 training images, the task has 14" in capsys.readouterr().err


def test_hf_import_errors(tmp_path, capsys):
    hf = save_hf_dataset(tmp_path / "hf")
    args = ["vtab-import", "--root", str(tmp_path / "v"), "--quiet"]
    assert main([*args, "--hf", str(tmp_path / "nothing"), "--task", "dtd"]) == 2
    assert "not a Hugging Face dataset" in capsys.readouterr().err
    assert main([*args, "--hf", str(hf), "--task", "dtd", "--label-column", "y"]) == 2
    assert "no column 'y'" in capsys.readouterr().err
    assert main([*args, "--hf", str(hf), "--task", "imagenet"]) == 2
    assert "unknown VTAB task" in capsys.readouterr().err


def test_user_switches_add_to_the_task_exceptions(tmp_path):
    from dataclasses import replace

    opts = options(tmp_path, tmp_path / "o", ("caltech101", "clevr-count"))
    assert vtab.job_options(opts, vtab.VtabJob("caltech101", "train800val200", 0)).flip is True
    opts.finetune = replace(opts.finetune, flip=False)
    natural = vtab.job_options(opts, vtab.VtabJob("caltech101", "train800val200", 0))
    counting = vtab.job_options(opts, vtab.VtabJob("clevr-count", "train800", 1))
    assert (natural.flip, natural.random_crop) == (False, True)
    assert (counting.flip, counting.random_crop, counting.seed) == (False, False, 1)
    assert counting.out == tmp_path / "o" / "clevr-count" / "train800" / "seed1"


def write_given_splits(root, task, train=4, val=2, test=3, train_name="train", val_name="validation"):
    """A VTAB-1k export: the task's fixed train800 and val200 (scaled down) beside its test split."""
    rng = np.random.default_rng(7)
    for split, n in ((train_name, train), (val_name, val), ("test", test)):
        for c in range(2):
            folder = root / task / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 60, (12, 12, 3), dtype=np.uint8)
                pixels[c * 6:c * 6 + 6] = 230
                Image.fromarray(pixels).save(folder / f"{split}{i}.png")


@pytest.mark.parametrize("train_name, val_name", [("train", "validation"), ("train800", "val200")])
def test_given_vtab_splits_are_used_as_given(tmp_path, train_name, val_name):
    """A standard VTAB-1k export (train800 + val200 + test) used to fail the 1000-image check (its
    validation folder was read as the test split); its splits are now used as they are."""
    root = tmp_path / "vtab"
    write_given_splits(root, "dtd", train_name=train_name, val_name=val_name)
    out = tmp_path / "runs"
    results = run_vtab(options(root, out, ("dtd",), validate=True))
    assert results["finished"] == 1
    train800 = json.loads((out / "dtd" / "train800" / "seed0" / "summary.json").read_text())
    full = json.loads((out / "dtd" / "train800val200" / "seed0" / "summary.json").read_text())
    assert (train800["train_examples"], train800["test_examples"]) == (8, 4)  # train800 -> val200
    assert (full["train_examples"], full["test_examples"]) == (12, 6)  # train800val200 -> test
    assert results["splits"]["dtd"] == {"source": "given", "train800": 8, "val200": 4, "test": 6}
    assert "given (8/4)" in (out / "report.html").read_text()


def test_drawn_splits_are_reported_as_drawn(tmp_path):
    root = tmp_path / "vtab"
    write_task(root, "dtd")
    results = run_vtab(options(root, tmp_path / "runs", ("dtd",)))
    assert results["splits"]["dtd"] == {"source": "drawn", "train800": 8, "val200": 4, "test": 6, "split_seed": 0}
    assert "drawn from train, seed 0 (8/4)" in (tmp_path / "runs" / "report.html").read_text()


def test_hf_import_keeps_a_validation_split_beside_test(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)

    def split(n):
        images = [Image.fromarray(rng.integers(0, 255, (9, 11, 3), dtype=np.uint8)) for _ in range(n)]
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
        return datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(n)]}, features=features)

    hf = tmp_path / "hf"
    datasets.DatasetDict({"train": split(8), "validation": split(4), "test": split(6)}).save_to_disk(str(hf))
    root = tmp_path / "vtab"
    assert main(["vtab-import", "--hf", str(hf), "--root", str(root), "--task", "dtd", "--quiet"]) == 0
    assert "8 train images, 4 validation images, 6 test images" in capsys.readouterr().out
    splits = load_source(str(root / "dtd"), progress=False, separate_val=True)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 4, 6)
