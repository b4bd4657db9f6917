"""`bigtransfer dedup` end to end on real images: pairs grouped by the deciding stage, the
self-test's copies measured and then dropped (never written anywhere, never in the outputs)."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("faiss")

from bigtransfer.cli import main
from bigtransfer.dedup import EDITS, DedupOptions, run_dedup


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Upstream: 150 digits (28 px) and 20 photo crops (120 px), plus three copies of test images:
    an exact one, a shifted one and a cropped one. Test: 30 other digits and 6 other crops."""
    from sklearn.datasets import load_digits, load_sample_images

    root = tmp_path_factory.mktemp("dedup-data")
    digits = load_digits()
    photos = load_sample_images().images
    crops = [Image.fromarray(photos[p][y:y + 120, x:x + 120]) for p in (0, 1) for y in (40, 160, 280)
             for x in (0, 130, 260, 390, 510) if x + 120 <= 640]

    def digit(k):
        return Image.fromarray(np.round(digits.images[k] * 255 / 16).astype(np.uint8)).resize((28, 28))

    for k in range(150):
        (root / "up" / str(digits.target[k])).mkdir(parents=True, exist_ok=True)
        digit(k).save(root / "up" / str(digits.target[k]) / f"d{k}.png")
    for k in range(150, 180):
        (root / "test" / str(digits.target[k])).mkdir(parents=True, exist_ok=True)
        digit(k).save(root / "test" / str(digits.target[k]) / f"t{k}.png")
    (root / "up" / "photo").mkdir()
    (root / "test" / "photo").mkdir()
    for k, crop in enumerate(crops):
        crop.save(root / ("test" if k < 6 else "up") / "photo" / f"crop{k}.png")
    digit(150).save(root / "up" / "photo" / "exact_copy.png")  # the same pixels, renamed
    moved = digit(151).transform((28, 28), Image.AFFINE, (1, 0, -1, 0, 1, 0), fillcolor=0)
    moved.save(root / "up" / "photo" / "shifted_copy.png")
    crops[0].crop((10, 10, 110, 110)).resize((120, 120), Image.LANCZOS).save(root / "up" / "photo" / "crop_copy.png")
    truth = {("t150.png", "exact_copy.png"), ("t151.png", "shifted_copy.png"), ("crop0.png", "crop_copy.png")}
    return root, truth


def listing(folder):
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


def pairs_of(out):
    with open(out / "pairs.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_stages_self_test_and_outputs(data, tmp_path):
    root, truth = data
    before = listing(root)
    out = tmp_path / "out"
    summary = run_dedup(DedupOptions(upstream=str(root / "up"), downstream=(str(root / "test"),), out=out,
                                     model="none", self_test=12, seed=1, progress=False))
    assert listing(root) == before  # nothing written beside the user's images
    rows = pairs_of(out)
    found = {(os.path.basename(r["downstream_path"]), os.path.basename(r["upstream_path"])): r for r in rows}
    assert set(found) == truth, found.keys()
    assert found[("t150.png", "exact_copy.png")]["stage"] == "identical"
    assert found[("t151.png", "shifted_copy.png")]["stage"] == "aligned"
    assert found[("crop0.png", "crop_copy.png")]["stage"] == "rescaled"
    assert summary["pairs_by_stage"] == {"identical": 1, "aligned": 1, "rescaled": 1}
    # the self-test measured every edit on 12 test images, and its copies went nowhere
    st = summary["self_test"]
    assert st["test_images"] == 12 and set(st["per_edit"]) == set(EDITS)
    assert all(s["planted"] == 12 for s in st["per_edit"].values())
    assert st["per_edit"]["copy"]["recall"] == 1.0 and st["per_edit"]["jpeg"]["recall"] >= 0.9
    upstream_files = {str(p) for p in (root / "up").rglob("*.png")}
    assert {r["upstream_path"] for r in rows} <= upstream_files
    with open(out / "upstream_filtered.csv", newline="") as fh:
        kept = [r["path"] for r in csv.DictReader(fh)]
    assert set(kept) == upstream_files - {str(root / "up" / "photo" / n) for _, n in truth}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".bigtransfer.json", ".bigtransfer.lock", ".bigtransfer.written", "contact_sheet.html", "contact_sheet.png",
         "pairs.csv", "summary.json", "upstream_filtered.csv"])
    written = json.loads((out / "summary.json").read_text())
    assert written["self_test"]["overall"]["planted"] == 12 * len(EDITS)
    # the report: one section per stage, in order, and the self-test's table
    page = (out / "contact_sheet.html").read_text()
    marks = [page.index(f"<h2>{stage}: 1 pair(s)") for stage in ("identical", "aligned", "rescaled")]
    assert marks == sorted(marks) and "<th>recall</th>" in page and "grey_rgb" in page
    assert page.count("data:image/png;base64,") >= 6


def test_the_self_test_changes_nothing_that_is_found(data, tmp_path):
    root, _ = data
    outs = []
    for n, sample in enumerate((0, 20)):
        out = tmp_path / f"o{n}"
        run_dedup(DedupOptions(upstream=str(root / "up"), downstream=(str(root / "test"),), out=out,
                               model="none", self_test=sample, progress=False))
        outs.append(out)
    assert (outs[0] / "pairs.csv").read_text() == (outs[1] / "pairs.csv").read_text()
    assert (outs[0] / "upstream_filtered.csv").read_text() == (outs[1] / "upstream_filtered.csv").read_text()
    assert "self_test" not in json.loads((outs[0] / "summary.json").read_text())


def test_a_folder_of_the_users_is_refused_and_help_has_examples(data, tmp_path, capsys):
    root, _ = data
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    code = main(["dedup", "--upstream", str(root / "up"), "--downstream", str(root / "test"), "--model", "none",
                 "--out", str(mine), "--quiet"])
    assert code == 2 and "did not write" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "mine" and len(list(mine.iterdir())) == 1
    with pytest.raises(SystemExit):
        main(["dedup", "--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and "--self-test" in text and "--model none" in text


@pytest.mark.parametrize("flag, value, named", [("--max-residual-structure", "1.5", "max_structure"),
                                                ("--min-detail-correlation", "2", "min_detail_correlation")])
def test_a_tolerance_out_of_range_is_one_line_and_exit_2(flag, value, named, data, tmp_path, capsys):
    root, _ = data
    code = main(["dedup", "--upstream", str(root / "up"), "--downstream", str(root / "test"), "--model", "none",
                 "--out", str(tmp_path / "o"), flag, value, "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and named in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()  # checked before anything is written
