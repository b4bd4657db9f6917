"""Rough edges a new user meets: pipes, argument mistakes found before any data is read,
warnings that read as warnings, and the small confusions of search and detect-eval."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from bigtransfer.cli import main

TINY = "R[1,1,1,1]x0.5"


def test_output_piped_into_head_ends_quietly():
    for argv in (["models", "--all"], ["models", "--all", "--json"], ["--help"]):
        shell = f"{sys.executable} -m bigtransfer {' '.join(argv)} | head -1"
        result = subprocess.run(["bash", "-o", "pipefail", "-c", shell], capture_output=True, text=True, timeout=120,
                                check=False)
        assert result.stdout.count("\n") == 1, argv
        assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr, result.stderr
        assert result.stderr == "", result.stderr


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    """An image folder large enough that scanning it takes a while (3000 small PNGs)."""
    root = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(0)
    for split, count in (("train", 1200), ("val", 300)):
        for name in ("a", "b"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.mark.parametrize("mistake, message", [
    (["--model", "Rfoo"], "unknown architecture 'Rfoo'"),
    (["--model", "BiT-M-R50x1"], "not in the cache"),
    (["--weights", "missing.npz"], "no such weights file"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--batch", "0"], "--batch must be at least 1"),
    (["--base-lr", "-1"], "--base-lr must be more than 0"),
    (["--resolution", "20/40"], "--resolution: crop must be positive and at most the resize"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["--val-fraction", "2"], "--val-fraction must be between 0 and 1"),
    (["--batch-split", "0"], "--batch-split must be at least 1"),
    (["--log-every", "0"], "--log-every must be at least 1"),
    (["--device", "gpu9"], "--device: not a device name"),
])
def test_argument_mistakes_are_found_before_the_data_is_scanned(mistake, message, many_images, tmp_path,
                                                                capsys, monkeypatch):
    from bigtransfer.data import sources

    def scanned(*args, **kwargs):
        raise AssertionError("the data was scanned before the arguments were checked")

    monkeypatch.setattr(sources, "load_source", scanned)
    monkeypatch.setattr("bigtransfer.recipes.finetune.load_source", scanned)
    args = {"--model": TINY, "--out": str(tmp_path / "run")}
    for flag, value in zip(mistake[::2], mistake[1::2]):
        args[flag] = value
    started = time.perf_counter()
    code = main(["finetune", "--data", str(many_images), "--quiet", *[a for kv in args.items() for a in kv]])
    elapsed = time.perf_counter() - started
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert elapsed < 1.0, f"took {elapsed:.2f}s"
    assert not (tmp_path / "run").exists()


def test_out_naming_a_file_is_found_before_the_data_is_scanned(many_images, tmp_path, capsys):
    (tmp_path / "notes").write_text("x")
    started = time.perf_counter()
    code = main(["finetune", "--data", str(many_images), "--model", TINY, "--out", str(tmp_path / "notes"), "--quiet"])
    assert code == 2 and "is not a folder" in capsys.readouterr().err
    assert time.perf_counter() - started < 1.0


def test_skipped_images_are_one_warning_line_and_a_list_in_the_run(tmp_path):
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 2)):
        for name in ("a", "b"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    bad = [root / "train" / "a" / f"broken{i}.png" for i in range(7)]
    for path in bad:
        path.write_bytes(b"not a png")
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "bigtransfer", "finetune", "--data", str(root), "--model", TINY,
                             "--batch", "4", "--steps", "1", "--resolution", "20/16", "--workers", "0", "--quiet",
                             "--out", str(out)], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith(f"bigtransfer: warning: {root}: skipped 7 unreadable image(s): ")
    assert line.count("broken") == 5 and f"(all 7: {out / 'skipped_images.txt'})" in line
    assert "UserWarning" not in result.stderr and "warnings.warn" not in result.stderr
    assert sorted((out / "skipped_images.txt").read_text().split()) == sorted(map(str, bad))


def test_detect_eval_says_what_cocos_minus_one_means():
    from bigtransfer.cli.detection import coco_line

    line = coco_line({"AP": 0.5, "AP50": 0.75, "AP_small": 0.25, "AP_medium": -1.0, "AP_large": -1.0})
    assert line == ("AP 0.500  AP50 0.750  AP_small 0.250  AP_medium n/a (no medium objects)  "
                    "AP_large n/a (no large objects)")
