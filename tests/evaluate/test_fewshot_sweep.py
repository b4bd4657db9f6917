"""The few-shot protocol: draws, the decode cache, the resumable sharded sweep, its report."""

import json

import numpy as np
import pytest
import torch
from image_data import write_colour_folder
from PIL import Image

from bigtransfer import BigTransferError
from bigtransfer.cli import main
from bigtransfer.data.cache import decoded
from bigtransfer.data.dataset import TransformedImages
from bigtransfer.data.fewshot import sample_per_class
from bigtransfer.data.sources import load_source
from bigtransfer.data.transforms import eval_transform, train_transform
from bigtransfer.evaluate import fewshot_sweep
from bigtransfer.evaluate.fewshot_sweep import FULL, Job, SweepOptions, parse_shots, run_sweep
from bigtransfer.recipes.finetune import FinetuneOptions
from bigtransfer.report.protocols import rebuild
from bigtransfer.report.protocols.fewshot import collect_fewshot

TINY = "R[1,1,1,1]x0.5"


# --------------------------------------------------------------------------- draws
def test_draws_are_balanced_reproducible_and_differ_between_seeds():
    labels = np.repeat(np.arange(4), 30)
    draws = [sample_per_class(labels, 5, seed) for seed in range(5)]
    for chosen in draws:
        assert np.bincount(labels[chosen], minlength=4).tolist() == [5, 5, 5, 5]
        assert len(set(chosen.tolist())) == 20
    assert np.array_equal(draws[0], sample_per_class(labels, 5, 0))
    assert len({tuple(d) for d in draws}) == 5  # every seed its own draw


def test_a_job_draws_what_finetune_k_seed_draws():
    splits = load_source("digits")
    chosen = fewshot_sweep.draw(splits, Job(5, 3))
    assert np.array_equal(chosen, sample_per_class(splits.train.labels, 5, 3, splits.classes))
    assert len(fewshot_sweep.draw(splits, Job(FULL, 0))) == len(splits.train)


def test_parse_shots():
    assert parse_shots("1,5, 10,full,5") == (1, 5, 10, FULL)
    for bad in ("", "0", "one", "1,-2"):
        with pytest.raises(BigTransferError, match="--shots"):
            parse_shots(bad)


# --------------------------------------------------------------------------- decode cache
@pytest.fixture()
def folder(tmp_path):
    """Non-square PNGs (so resizing really happens) in train/val class folders."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 3)):
        for name in ("a", "b"):
            (tmp_path / "imgs" / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (30 + i, 41, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "imgs" / split / name / f"{i}.png")
    return load_source(str(tmp_path / "imgs"), progress=False)


def test_cached_images_give_bit_identical_training_inputs(folder, tmp_path):
    cached = decoded(folder.train, 36, cache_dir=tmp_path / "cache", progress=False)
    transform = train_transform(36, 32)
    for i in range(len(folder.train)):
        original, _ = TransformedImages(folder.train, transform)[(i, 7 + i)]
        fast, label = TransformedImages(cached, transform)[(i, 7 + i)]
        assert torch.equal(original, fast)
        assert label == folder.train.labels[i]
    test = decoded(folder.test, 32, progress=False)
    assert torch.equal(TransformedImages(folder.test, eval_transform(32))[0][0],
                       TransformedImages(test, eval_transform(32))[0][0])


def test_cache_keeps_original_sizes_for_the_hyperrule(folder):
    cached = decoded(folder.train, 160, progress=False)
    assert cached.median_area() == folder.train.median_area() < 96 * 96
    assert cached.pixels.shape[1:] == (160, 160, 3)


def test_cache_is_reused_from_disk_and_decodes_only_what_is_needed(folder, tmp_path, monkeypatch):
    first = decoded(folder.train, 24, needed=[0, 5, 5, 7], cache_dir=tmp_path / "c", progress=False)
    assert first.pixels.shape[0] == 3
    with pytest.raises(IndexError):  # an item that was not decoded is never silently wrong
        first.load_for_transform(1)

    def no_decoding(self, i):
        raise AssertionError("decoded again")

    monkeypatch.setattr(type(folder.train), "load_for_transform", no_decoding)
    again = decoded(folder.train, 24, needed=[7, 0, 5], cache_dir=tmp_path / "c", progress=False)
    monkeypatch.undo()
    assert np.array_equal(np.asarray(again.pixels), np.asarray(first.pixels))
    assert torch.equal(again.subset([5]).load_for_transform(0), first.subset([5]).load_for_transform(0))
    assert len(list((tmp_path / "c").glob("*.npy"))) == 1
    decoded(folder.train, 24, needed=[0, 1], cache_dir=tmp_path / "c", progress=False)  # another selection
    assert len(list((tmp_path / "c").glob("*.npy"))) == 2


def test_undecodable_image_is_replaced_with_a_warning_or_an_error_when_strict(folder):
    broken = folder.train.paths[2]
    with open(broken, "r+b") as fh:  # a valid header (it passed the up-front check), then garbage
        fh.seek(60)
        fh.write(b"\0" * 200)
    with pytest.warns(UserWarning, match="1 image"):
        cached = decoded(folder.train, 16, progress=False)
    assert np.array_equal(np.asarray(cached.pixels[2]), np.asarray(cached.pixels[3]))
    with pytest.raises(BigTransferError, match="2.png: cannot decode"):
        decoded(folder.train, 16, strict=True, progress=False)


# --------------------------------------------------------------------------- the sweep
def sweep_options(out, **kw):
    ft = FinetuneOptions(data="digits", model=TINY, batch=20, steps=6, resolution=(28, 24), workers=0,
                         progress=False, precision="fp32")
    return SweepOptions(finetune=ft, out=out, shots=kw.pop("shots", (1, 3)), repeats=kw.pop("repeats", 2), **kw)


def test_sweep_runs_every_job_reports_and_never_repeats_a_finished_one(tmp_path, monkeypatch):
    out = tmp_path / "fs"
    results = run_sweep(sweep_options(out))
    assert results["finished"] == results["expected"] == 4
    for k in (1, 3):
        for seed in (0, 1):
            config = json.loads((out / f"{k}shot" / f"seed{seed}" / "config.json").read_text())
            assert config["examples_per_class"] == k and config["seed"] == seed
            assert config["plan"]["dataset_size"] == 10 * k
    summary = results["summary"]
    assert set(summary) == {"finetune", "linear_probe"}
    s = summary["finetune"]["3"]
    assert s["min"] <= s["median"] <= s["max"] and s["runs"] == 2
    assert summary["linear_probe"]["3"]["median"] > 0.3  # 10 classes: chance is 10%
    csv_rows = (out / "results.csv").read_text().splitlines()
    assert csv_rows[0] == "method,examples_per_class,seed,top1,top5" and len(csv_rows) == 1 + 8
    html = (out / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 1 and "min &lt;- median -&gt; max" in html
    assert list((out / "cache").glob("*.npy"))  # decoded once, on disk

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished run was repeated")

    monkeypatch.setattr(fewshot_sweep, "run_finetune", must_not_train)
    assert run_sweep(sweep_options(out))["finished"] == 4


def test_cached_and_uncached_sweeps_train_identically(tmp_path):
    a = run_sweep(sweep_options(tmp_path / "a", shots=(2,), repeats=1, linear_probe=False))
    b = run_sweep(sweep_options(tmp_path / "b", shots=(2,), repeats=1, linear_probe=False, cache=False))
    assert a["runs"][0]["top1"] == b["runs"][0]["top1"]
    assert not (tmp_path / "b" / "cache").exists()


def test_shards_split_the_jobs_and_any_of_them_collects(tmp_path):
    out = tmp_path / "fs"
    first = run_sweep(sweep_options(out, shard=(0, 2), linear_probe=False))
    assert first["finished"] == 2
    assert sorted((r["shots"], r["seed"]) for r in first["runs"]) == [(1, 0), (3, 0)]
    second = run_sweep(sweep_options(out, shard=(1, 2), linear_probe=False))
    assert second["finished"] == 4
    assert collect_fewshot(out)["finished"] == 4


def test_a_different_sweep_in_the_same_directory_is_refused(tmp_path):
    out = tmp_path / "fs"
    run_sweep(sweep_options(out, shots=(1,), repeats=1, linear_probe=False))
    with pytest.raises(BigTransferError, match="other settings.*repeats"):
        run_sweep(sweep_options(out, shots=(1,), repeats=2, linear_probe=False))


def test_too_few_images_for_k_fails_before_any_training(tmp_path):
    with pytest.raises(BigTransferError, match="--examples-per-class 500"):
        run_sweep(sweep_options(tmp_path / "fs", shots=(1, 500)))
    assert not (tmp_path / "fs").exists()  # nothing claimed: the corrected command can use the same --out


def test_cli_fewshot_and_report(tmp_path, capsys):
    data = write_colour_folder(tmp_path / "colours", per_class_train=6, per_class_val=3)
    out = tmp_path / "fs"
    args = ["fewshot", "--data", str(data), "--model", TINY, "--shots", "1,full", "--repeats", "1", "--steps", "4",
            "--batch", "8", "--resolution", "28/24", "--workers", "0", "--quiet", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "2/2 runs finished" in printed and "full" in printed
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").is_file()
    assert rebuild(out) == out / "report.html"
    assert main(["report", str(tmp_path)]) == 2
    assert "no protocol.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([*args[:-1], str(tmp_path / "x"), "--shard", "2/2"])
    assert exit_info.value.code == 2
