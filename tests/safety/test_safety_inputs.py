"""Inputs that reach other tools and readers: class names and paths in the CSV
files we write (spreadsheets), in the model card (Markdown), as folder names (vtab-import), a
database handed to `search --storage`, and outputs that overlap what a command reads.

Each test builds its hostile inputs here and checks: exit 2 with one line where the input is
refused, no traceback, and every file the project did not write byte-identical afterwards."""

from __future__ import annotations

import csv
import json
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from image_data import write_colour_folder
from PIL import Image
from test_safety import TINY, one_line_error, snapshot

import bigtransfer
from bigtransfer.cli import main
from bigtransfer.data.sources import load_source

# Names a user (or an attacker who names the classes) can give: formulas for every trigger a
# spreadsheet has, Markdown structure, HTML, terminal escapes, and text that only looks harmless.
HOSTILE_NAMES = ["=cmd|' /C calc'!A0", "+SUM(1,2)", "-2+3+cmd|' /C calc'!A0", "@SUM(A1:A9)", "\t=1+1", "\r=1+1",
                 "cat\n## heading", "<img src=x onerror=alert(1)>", "`code` | pipe [link](http://evil.example) *em*",
                 "\x1b[31mred\u202eevil", "-1"]
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet takes as the start of a formula
NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def spreadsheet_cells(path: Path) -> list[str]:
    """Every cell of a CSV file we wrote, read as UTF-8 (a file that is not UTF-8 fails here)."""
    with open(path, newline="", encoding="utf-8") as fh:
        return [cell for row in csv.reader(fh) for cell in row]


def assert_spreadsheet_safe(path: Path) -> None:
    for cell in spreadsheet_cells(path):
        assert not cell.startswith(FORMULA_STARTS) or NUMBER.fullmatch(cell), (path.name, cell)


def tiny_model_file(path: Path, class_names: list[str]) -> Path:
    torch.manual_seed(0)
    model = bigtransfer.create_model(TINY, num_classes=len(class_names))
    bigtransfer.save_checkpoint(model, path, class_names=class_names, resolution=32)
    return path


def write_manifest(folder: Path, labels: list[str], per_label: int = 2) -> Path:
    """A CSV manifest whose labels are any text (a folder name could not hold '/' or a newline)."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    rows = []
    for k, label in enumerate(labels):
        for i in range(per_label):
            name = f"images/{k}_{i}.png"
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / name)
            rows.append([name, label, "test" if i == 0 else "train"])
    with open(folder / "labels.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    return folder / "labels.csv"


# --------------------------------------------------------------------------- spreadsheets
def test_the_helper_guards_every_formula_start_and_reads_it_back():
    from bigtransfer.safe_text import spreadsheet_cell, spreadsheet_value

    for name in HOSTILE_NAMES:
        cell = spreadsheet_cell(name)
        assert not cell.startswith(FORMULA_STARTS) or NUMBER.fullmatch(cell), cell
        assert spreadsheet_value(cell) == name
    assert [spreadsheet_cell(v) for v in (-3, 0.5, "-0.25", "1e-5", "plain")] == [-3, 0.5, "-0.25", "1e-5", "plain"]


def test_evaluate_csv_files_hold_hostile_class_names_as_text(tmp_path, capsys):
    """The model's class names go into confusion.csv and per_class_accuracy.csv; metrics.json keeps
    them exactly (JSON is not a spreadsheet)."""
    strippable = [n for n in HOSTILE_NAMES if n == n.strip()]  # a manifest cell is stripped of tabs/CRs
    model = tiny_model_file(tmp_path / "model.safetensors", HOSTILE_NAMES)
    manifest = write_manifest(tmp_path / "data", strippable)
    before = snapshot(tmp_path)
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(model), "--data", str(manifest), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    for name in ("confusion.csv", "per_class_accuracy.csv"):
        assert_spreadsheet_safe(out / name)
    with open(out / "per_class_accuracy.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    from bigtransfer.safe_text import spreadsheet_value

    assert [spreadsheet_value(r["class"]) for r in rows] == HOSTILE_NAMES  # the text is all there
    assert list(json.loads((out / "metrics.json").read_text())["per_class_accuracy"]) == HOSTILE_NAMES
    assert snapshot(tmp_path / "data") == {k[len("data/"):]: v for k, v in before.items() if k.startswith("data/")}


def test_objectnet_csv_holds_hostile_mapping_names_as_text(tmp_path, monkeypatch, capsys):
    """ObjectNet classes come from the user's mapping and data folders."""
    monkeypatch.chdir(tmp_path)
    objectnet_classes = ["=HYPERLINK(\"evil.example\",\"x\")", "@chair", "+lamp"]
    tiny_model_file(tmp_path / "=model.safetensors", ["a", "b", "c"])
    for k, name in enumerate(objectnet_classes):
        folder = tmp_path / "objectnet" / name
        folder.mkdir(parents=True)
        Image.new("RGB", (24, 24), (60 * k, 90, 30)).save(folder / "0.png")
    (tmp_path / "map.json").write_text(json.dumps(dict(zip(objectnet_classes, ["a", "b", "c"]))))
    assert main(["objectnet", "--model", "=model.safetensors", "--data", "objectnet", "--mapping", "map.json",
                 "--resize", "32", "--crop", "32", "--out", "on", "--quiet"]) == 0
    capsys.readouterr()
    assert_spreadsheet_safe(tmp_path / "on" / "per_class_accuracy.csv")
    assert sorted(spreadsheet_cells(tmp_path / "on" / "per_class_accuracy.csv")[4::4]) == sorted(
        "'" + name for name in objectnet_classes)


def test_dedup_and_embed_csv_paths_are_text_and_upstream_filtered_still_reads_as_a_manifest(tmp_path, monkeypatch,
                                                                                             capsys):
    """Relative paths under folders named like formulas (and a class folder with a newline in its name);
    upstream_filtered.csv is meant to be pre-trained on (`--data upstream_filtered.csv`), so our manifest
    reader takes its guarded and escaped cells back."""
    monkeypatch.chdir(tmp_path)
    model = tiny_model_file(tmp_path / "model.safetensors", ["a", "b"])
    rng = np.random.default_rng(1)
    for root, classes in (("=up", ("=c0", "@c1", "-c2\nx")), ("+down", ("x", "y"))):
        for c in classes:
            (tmp_path / root / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(tmp_path / root / c / f"{i}.png")
    before = snapshot(tmp_path)
    assert main(["dedup", "--upstream", "=up", "--downstream", "+down", "--model", str(model), "--resolution", "32",
                 "--self-test", "0", "--out", "dd", "--quiet"]) == 0
    assert main(["embed", "--model", str(model), "=up", "--out", "feats/=f", "--quiet"]) == 0
    capsys.readouterr()
    for path in (tmp_path / "dd" / "pairs.csv", tmp_path / "dd" / "upstream_filtered.csv", tmp_path / "feats" / "=f.csv"):
        assert_spreadsheet_safe(path)
    assert "'=up/=c0/0.png" in spreadsheet_cells(tmp_path / "dd" / "pairs.csv") + spreadsheet_cells(
        tmp_path / "feats" / "=f.csv")
    kept = load_source(str(tmp_path / "dd" / "upstream_filtered.csv"), require_test=False, progress=False)
    assert sorted(kept.train.classes) == ["-c2\nx", "=c0", "@c1"] and len(kept.train) == 6
    assert sorted(Path(p).resolve() for p in kept.train.paths) == sorted(
        p.resolve() for p in (tmp_path / "=up").rglob("*.png"))
    assert {k: v for k, v in snapshot(tmp_path).items() if k in before} == before


# --------------------------------------------------------------------------- Markdown
def hostile_run(folder: Path) -> Path:
    """A finished run (the three files push reads) whose class names, data and results are hostile."""
    folder.mkdir()
    tiny_model_file(folder / "final.safetensors", HOSTILE_NAMES)
    (folder / "config.json").write_text(json.dumps({
        "fingerprint": "abc`def\n# fingerprint heading", "data": "~/x\n## data heading <script>alert(1)</script>`",
        "model": "<img src=x onerror=alert(2)>", "seed": "1\n---\n# seed heading", "examples_per_class": "[a](http://e)"}))
    (folder / "summary.json").write_text(json.dumps({"final": {
        "top1": 0.5, "<b>key</b>": "| cell | break |\n## summary heading", "`x`": "![img](http://evil.example/x.png)"}}))
    return folder


def test_the_model_card_shows_hostile_names_as_text(tmp_path, capsys):
    """Rendered by a CommonMark parser (markdown-it, GitHub-flavoured tables on): the only headings are
    the card's own, and no name becomes HTML, a link or an image."""
    markdown_it = pytest.importorskip("markdown_it")
    pytest.importorskip("transformers")
    run = hostile_run(tmp_path / "run")
    before = snapshot(run)
    folder = tmp_path / "repo"
    assert main(["push", str(run), "alice/bit-hostile", "--to-folder", str(folder), "--no-check"]) == 0
    capsys.readouterr()
    card = (folder / "README.md").read_text(encoding="utf-8")
    tokens = markdown_it.MarkdownIt("commonmark").enable("table").parse(card.split("\n---\n", 1)[1])
    headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert headings == ["bit-hostile", "Architecture", "Upstream weights", "Training plan", "Results", "Classes",
                        "How to load it", "Notes"]
    kinds = {t.type for t in tokens} | {c.type for t in tokens for c in (t.children or [])}
    assert not kinds & {"html_block", "html_inline", "link_open", "image"}, kinds
    html = markdown_it.MarkdownIt("commonmark").enable("table").render(card)
    assert "<script" not in html and "<img" not in html and "<b>" not in html
    for shown in ("=cmd|' /C calc'!A0", "&lt;img src=x onerror=alert(1)&gt;", "*em*", "[link](http://evil.example)",
                  "&lt;script&gt;alert(1)&lt;/script&gt;", "![img](http://evil.example/x.png)"):
        assert shown in html, shown  # the names are all there, as text
    assert snapshot(run) == before


def test_markdown_helpers_on_their_own():
    from bigtransfer.safe_text import markdown_code, markdown_fence, markdown_text

    markdown_it = pytest.importorskip("markdown_it")
    parser = markdown_it.MarkdownIt("commonmark").enable("table")
    for name in HOSTILE_NAMES + ["# h", "1. item", "- item", "a``b", "```", "`", " ", "&amp; &#60;"]:
        for rendered in (markdown_text(name), markdown_code(name), f"| {markdown_text(name)} | x |"):
            tokens = parser.parse(f"before {rendered} after" if not rendered.startswith("|") else
                                  f"| a | b |\n|---|---|\n{rendered}\n")
            kinds = {t.type for t in tokens} | {c.type for t in tokens for c in (t.children or [])}
            assert not kinds & {"heading_open", "html_block", "html_inline", "link_open", "image", "em_open",
                                "bullet_list_open", "ordered_list_open"}, (name, rendered, kinds)
            if rendered.startswith("|"):
                assert sum(t.type == "td_open" for t in tokens) == 2, (name, rendered)
        block = parser.parse(markdown_fence(f"{name}\n```\n# not a heading"))
        assert [t.type for t in block] == ["fence"], name


# --------------------------------------------------------------------------- vtab-import folder names
def _hf_dataset(path: Path, names: list[str] | None, labels: list) -> Path:
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (9, 11, 3), dtype=np.uint8)) for _ in labels]
    label = datasets.ClassLabel(names=names) if names else datasets.Value("string")
    features = datasets.Features({"image": datasets.Image(), "label": label})
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)}
                         ).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind", ["class_label", "strings"])
def test_vtab_import_keeps_classes_whose_folder_names_would_collide_apart(kind, tmp_path, capsys):
    names = ["a/b", "a?b", "..", ".", "cat", "cat!", "Cat", "=x", "x\ny"]
    labels = [i % len(names) for i in range(2 * len(names))]
    hf = _hf_dataset(tmp_path / "hf", names if kind == "class_label" else None,
                     labels if kind == "class_label" else [names[i] for i in labels])
    before = snapshot(hf)
    root = tmp_path / "vtab"
    capsys.readouterr()
    assert main(["vtab-import", "--hf", str(hf), "--root", str(root), "--task", "dtd", "--quiet"]) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if line.startswith("bigtransfer:")]
    assert len(warning) == 1 and warning[0].startswith("bigtransfer: warning: 7 class names would share a folder")
    assert warning[0].count(" -> ") == 6  # the first six, on the one line
    folders = sorted(p.name for p in (root / "dtd" / "train").iterdir())
    assert len(folders) == len(names) and len({f.casefold() for f in folders}) == len(names)
    assert all(len(list((root / "dtd" / "train" / f).iterdir())) == 2 for f in folders)  # nothing merged
    assert not any(f in (".", "..") or "/" in f for f in folders)
    assert snapshot(hf) == before
    splits = load_source(str(root / "dtd"), val_fraction=0.5, progress=False)
    assert len(splits.classes) == len(names)


# --------------------------------------------------------------------------- search --storage
def _foreign_database(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE customers (id INTEGER, name TEXT)")
        db.execute("INSERT INTO customers VALUES (1, 'alice')")


def _study_and_foreign(path: Path) -> None:
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(storage=f"sqlite:///{path}", study_name="other")
    with sqlite3.connect(path) as db:
        db.execute("CREATE VIEW everything AS SELECT * FROM studies")


STORAGES = {
    "another program's database": (_foreign_database, "tables that are not an Optuna study's ('customers')"),
    "a study plus a view of someone's": (_study_and_foreign, "('everything')"),
    "a text file": (lambda p: p.write_text("my notes\n"), "not an SQLite database"),
    "a zip file": (lambda p: p.write_bytes(b"PK\x03\x04" + bytes(100)), "not an SQLite database"),
    "a damaged database": (lambda p: p.write_bytes(b"SQLite format 3\x00" + b"\xff" * 200), "not a readable SQLite"),
    "a folder": (lambda p: p.mkdir(), "is not a file"),
}


@pytest.mark.parametrize("case", list(STORAGES))
def test_search_refuses_a_storage_that_is_not_a_study_before_touching_it(case, tmp_path, capsys):
    make, reason = STORAGES[case]
    target = tmp_path / "db" / "study.db"
    target.parent.mkdir()
    make(target)
    before = snapshot(tmp_path / "db")
    out = tmp_path / "search"
    capsys.readouterr()
    assert main(["search", "--data", "digits", "--model", TINY, "--trials", "1", "--out", str(out),
                 "--storage", f"sqlite:///{target}", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert one_line_error(err) and reason in err and "--storage" in err, err
    assert snapshot(tmp_path / "db") == before and sorted(p.name for p in target.parent.iterdir()) == ["study.db"]
    assert not out.exists()


def test_search_accepts_a_new_file_an_empty_one_and_a_study_database(tmp_path):
    optuna = pytest.importorskip("optuna")
    from bigtransfer.evaluate.search import check_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    study = tmp_path / "study.db"
    optuna.create_study(storage=f"sqlite:///{study}", study_name="s")
    (tmp_path / "empty.db").touch()  # what a worker starting the same study leaves for a moment
    for url in (None, "sqlite://", "sqlite:///:memory:", f"sqlite:///{tmp_path / 'new.db'}", f"sqlite:///{study}",
                f"sqlite:///{tmp_path / 'empty.db'}", "postgresql://user@db/bit"):
        check_storage(url)
    assert not (tmp_path / "new.db").exists()


# --------------------------------------------------------------------------- outputs apart from inputs
@pytest.fixture()
def workspace(tmp_path):
    """Data, a finished run (the teacher), a weights file and a model folder, as a user has them."""
    data = write_colour_folder(tmp_path / "colours", per_class_train=2, per_class_val=1)
    run = tmp_path / "run"
    run.mkdir()
    tiny_model_file(run / "final.safetensors", ["blue", "green", "red"])
    (run / "config.json").write_text(json.dumps({"fingerprint": "f", "plan": {}}))
    (run / "summary.json").write_text(json.dumps({"final": {"top1": 1.0}}))
    (run / "metrics.jsonl").write_text("")
    (tmp_path / "link_to_colours").symlink_to(data)
    return tmp_path


OVERLAPS = {
    "distill --teacher D --out D --restart": (
        ["distill", "--data", "{d}/colours", "--teacher", "{d}/run", "--out", "{d}/run", "--restart"], "--teacher"),
    "finetune from its own --out's weights": (
        ["finetune", "--data", "{d}/colours", "--model", "{d}/run/final.safetensors", "--out", "{d}/run"], "--model"),
    "finetune --out inside --data": (["finetune", "--data", "{d}/colours", "--model", TINY, "--out", "{d}/colours/r"],
                                     "inside --data"),
    "--out inside --data through a link": (
        ["finetune", "--data", "{d}/link_to_colours", "--model", TINY, "--out", "{d}/colours/train/r"], "inside --data"),
    "--data inside --out": (["pack", "--data", "{d}/colours/train", "--out", "{d}/colours"], "holds --data"),
    "evaluate --out inside --data": (
        ["evaluate", "--model", "{d}/run", "--data", "{d}/colours", "--out", "{d}/colours/val/eval"], "inside --data"),
    "fewshot --out inside --data": (["fewshot", "--data", "{d}/colours", "--model", TINY, "--out", "{d}/colours/fs"],
                                    "inside --data"),
    "dedup --out inside one of --downstream": (
        ["dedup", "--upstream", "{d}/run", "--downstream", "digits,{d}/colours", "--out", "{d}/colours/dd"],
        "inside --downstream"),
    "embed beside its images": (["embed", "--model", "{d}/run", "{d}/colours", "--out", "{d}/colours/features"],
                                "inside IMAGES"),
    "convert onto its source": (["convert", "{d}/run/final.safetensors", "{d}/run/final.safetensors",
                                 "--overwrite"], "is SOURCE"),
    "export into the model's run": (["export", "--model", "{d}/run", "--out", "{d}/run", "--format", "transformers"],
                                    "is --model"),
    "push into the run": (["push", "{d}/run", "alice/x", "--to-folder", "{d}/run", "--no-check"], "is RUN_DIR"),
    "vtab-import into its own source": (["vtab-import", "--hf", "{d}/colours", "--root", "{d}/colours", "--task",
                                         "dtd"], "inside --hf"),
}


@pytest.mark.parametrize("case", list(OVERLAPS))
def test_an_output_overlapping_an_input_is_refused_before_anything_is_written(case, workspace, capsys):
    argv, reason = OVERLAPS[case]
    before = snapshot(workspace)
    entries = sorted(str(p.relative_to(workspace)) for p in workspace.rglob("*"))
    assert main([a.format(d=workspace) for a in argv] + ["--quiet"] * (argv[0] not in ("convert", "export", "push"))
                ) == 2
    err = capsys.readouterr().err
    assert one_line_error(err) and reason in err, err
    assert snapshot(workspace) == before
    assert sorted(str(p.relative_to(workspace)) for p in workspace.rglob("*")) == entries


def test_an_output_inside_a_models_folder_is_fine(workspace, capsys):
    """A model is read by name, not scanned: `evaluate --model RUN --out RUN/eval` (as the README's
    detect-eval example does) is allowed."""
    run = workspace / "run"
    assert main(["evaluate", "--model", str(run), "--data", str(workspace / "colours"), "--out", str(run / "eval"),
                 "--quiet"]) == 0
    assert (run / "eval" / "metrics.json").is_file()
