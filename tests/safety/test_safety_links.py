"""Links planted where bigtransfer writes, tried as a hostile user would.

Every verb that writes a folder is run once; then, in a copy of what it wrote, each entry it
recorded (files and folders, nested runs included) is replaced by a link to a file outside,
a link to a folder outside, or a dangling link, and the verb is run again (with --restart where
it has one). Each time: exit 2 with one line, the link left as it was, and every file outside
byte-identical. Single-file outputs, our own hidden files (marker, record, lock: links, FIFOs,
/dev/null, hard links) and links planted after the claim (caught at the write) are tried too.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fixtures_safety import tiny_model_file
from image_data import write_colour_folder

from bigtransfer import atomic, rundir
from bigtransfer.cli import main

TINY = "R[1,1,1,1]x0.5"
CLASSES = ["blue", "green", "red"]  # write_colour_folder's classes
GLYPHS = "glyphs:classes=2,per_class=2,test_per_class=1,size=8"


def one_line_error(err: str) -> bool:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    return len(lines) == 1 and lines[0].startswith("bigtransfer: error:") and "Traceback" not in err


def snapshot(folder: Path) -> dict:
    """Every entry under `folder`: file bytes, link targets, folders (nothing followed)."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root, name)
            key = str(path.relative_to(folder))
            found[key] = (f"link:{os.readlink(path)}" if path.is_symlink() else "folder" if path.is_dir()
                          else path.read_bytes())
    return found


def recorded(folder: Path, prefix: str = "") -> list[str]:
    """What bigtransfer recorded as written in `folder`, nested output folders' records included."""
    entries = []
    for entry in sorted(atomic.read_record(folder) or ()):
        entries.append(prefix + entry)
        if entry.endswith("/") and (folder / entry / rundir.MARKER).is_file():
            entries.extend(recorded(folder / entry, prefix + entry))
    return entries


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("links")
    model = tiny_model_file(root / "tiny.safetensors", CLASSES)
    colours = write_colour_folder(root / "colours", per_class_train=2, per_class_val=1)
    outside = root / "outside"  # what the links point at: the user's files, never to be touched
    (outside / "folder").mkdir(parents=True)
    (outside / "file.txt").write_text("the user's file\n")
    (outside / "folder" / "latest.safetensors").write_bytes(b"the user's checkpoint")
    (outside / "folder" / "notes.txt").write_text("notes\n")
    return SimpleNamespace(root=root, model=model, colours=colours, outside=outside)


FIT = ["--batch", "4", "--resolution", "20/16", "--workers", "0", "--quiet"]
VERBS = {
    "finetune": lambda w, out: ["finetune", "--data", w.colours, "--model", TINY, "--steps", "2",
                                "--checkpoint-every", "1", *FIT, "--out", out],
    "evaluate": lambda w, out: ["evaluate", "--model", w.model, "--data", w.colours, "--quiet", "--out", out],
    "pack": lambda w, out: ["pack", "--data", GLYPHS, "--quiet", "--out", out],
    "export-transformers": lambda w, out: ["export", "--model", w.model, "--format", "transformers", "--no-check",
                                           "--overwrite", "--out", out],
    "dedup": lambda w, out: ["dedup", "--upstream", w.colours / "train", "--downstream", w.colours / "val",
                             "--model", "none", "--self-test", "0", "--quiet", "--out", out],
    "fewshot": lambda w, out: ["fewshot", "--data", w.colours, "--model", TINY, "--shots", "1", "--repeats", "1",
                               "--steps", "1", "--no-linear-probe", *FIT, "--out", out],
}
RESTART = {"finetune"}  # verbs whose --restart deletes: tried with and without it


@pytest.fixture(scope="module")
def written(world):
    """Each verb's output, written once into a fresh folder."""
    outputs = {}
    for verb, argv in VERBS.items():
        out = world.root / "first" / verb
        assert main([str(a) for a in argv(world, out)]) == 0, verb
        outputs[verb] = out
    run = world.root / "first" / "finetune"
    push = world.root / "first" / "push"
    assert main(["push", str(run), "someone/tiny", "--to-folder", str(push), "--no-check"]) == 0
    outputs["push"] = push
    return outputs


def plant(entry: Path, kind: str, outside: Path) -> str:
    """Replace `entry` with a link of `kind`; returns where it points."""
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    elif os.path.lexists(entry):
        entry.unlink()
    entry.parent.mkdir(parents=True, exist_ok=True)
    target = {"file": outside / "file.txt", "folder": outside / "folder", "dangling": outside / "nowhere" / "x"}[kind]
    entry.symlink_to(target)
    return str(target)


@pytest.mark.parametrize("verb", [*VERBS, "push"])
def test_a_link_at_any_name_a_verb_wrote_is_refused_and_nothing_outside_changes(verb, world, written, tmp_path,
                                                                               capsys):
    entries = recorded(written[verb])
    assert len(entries) >= 3, f"{verb} recorded {entries}"
    capsys.readouterr()
    before = snapshot(world.outside)
    tried = 0
    for entry in entries:
        for kind in ("file", "folder", "dangling"):
            out = tmp_path / f"try{tried}"
            shutil.copytree(written[verb], out, symlinks=True)
            target = plant(out / entry.rstrip("/"), kind, world.outside)
            if verb == "push":
                argv = ["push", str(written["finetune"]), "someone/tiny", "--to-folder", str(out), "--no-check",
                        "--overwrite"]
            else:
                argv = [str(a) for a in VERBS[verb](world, out)]
            for extra in ([], ["--restart"]) if verb in RESTART else ([],):
                code = main(argv + extra)
                err = capsys.readouterr().err
                assert code == 2 and one_line_error(err), (entry, kind, extra, err)
                assert Path(entry.rstrip("/")).name in err and "symbolic link" in err, err
                assert os.readlink(out / entry.rstrip("/")) == target
                assert snapshot(world.outside) == before, (entry, kind, extra)
            tried += 1
            shutil.rmtree(out)
    assert not (world.outside / "nowhere").exists()


@pytest.mark.parametrize("name", [rundir.LOCK, rundir.MARKER, rundir.RECORD])
def test_our_own_hidden_files_as_links_fifos_or_hard_links_are_refused(name, world, written, tmp_path, capsys):
    """A lock that is a link, /dev/null, a FIFO or a hard link to the user's file: one line, nothing truncated."""
    before = snapshot(world.outside)
    plants = {
        "link to a file": lambda p: p.symlink_to(world.outside / "file.txt"),
        "link to /dev/null": lambda p: p.symlink_to("/dev/null"),
        "dangling link": lambda p: p.symlink_to(world.outside / "nowhere"),
        "fifo": lambda p: os.mkfifo(p),
        "hard link": lambda p: os.link(world.outside / "file.txt", p),
        "folder": lambda p: p.mkdir(),
    }
    for label, make in plants.items():
        out = tmp_path / label.replace(" ", "_").replace("/", "")
        shutil.copytree(written["evaluate"], out, symlinks=True)
        (out / name).unlink(missing_ok=True)
        make(out / name)
        code = main([str(a) for a in VERBS["evaluate"](world, out)])
        err = capsys.readouterr().err
        assert code == 2 and one_line_error(err) and name in err, (label, err)
        assert snapshot(world.outside) == before, label
    # and in a new folder: only the lock, planted before the first run
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    os.mkfifo(fresh / rundir.LOCK)
    assert main([str(a) for a in VERBS["evaluate"](world, fresh)]) == 2
    assert one_line_error(capsys.readouterr().err)


def test_out_itself_may_be_a_link_to_a_folder(world, tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "runs"
    link.symlink_to(real)
    assert main([str(a) for a in VERBS["evaluate"](world, link)]) == 0
    assert link.is_symlink() and (real / "metrics.json").is_file() and (real / "confusion.png").is_file()
    assert main([str(a) for a in VERBS["evaluate"](world, link)]) == 0  # and again: its own earlier output
    nested = tmp_path / "sweep"  # a link to a folder of ours, below a folder of ours: not ours
    rundir.claim(nested, "fewshot")
    (nested / "1shot").symlink_to(real)
    assert main(["evaluate", "--model", str(world.model), "--data", str(world.colours), "--quiet",
                 "--out", str(nested / "1shot")]) == 2
    assert one_line_error(capsys.readouterr().err)


def test_a_dangling_or_file_link_as_a_folder_out_is_refused(world, tmp_path, capsys):
    before = snapshot(world.outside)
    for target in (world.outside / "nowhere", world.outside / "file.txt"):
        out = tmp_path / f"out_{target.name}"
        out.symlink_to(target)
        assert main([str(a) for a in VERBS["evaluate"](world, out)]) == 2
        assert one_line_error(capsys.readouterr().err)
    assert snapshot(world.outside) == before and not (world.outside / "nowhere").exists()


SINGLE_FILES = {
    "onnx": lambda w, out: ["export", "--model", w.model, "--out", out, "--no-check"],
    "torchscript": lambda w, out: ["export", "--model", w.model, "--format", "torchscript", "--out", out,
                                   "--no-check"],
    "pt2": lambda w, out: ["export", "--model", w.model, "--format", "pt2", "--out", out, "--no-check"],
    "timm": lambda w, out: ["export", "--model", w.model, "--format", "timm", "--out", out, "--no-check"],
    "convert": lambda w, out: ["convert", w.model, out],
}


@pytest.mark.parametrize("what", [*SINGLE_FILES, "embed"])
def test_a_single_output_file_that_is_a_link_is_never_written_through(what, world, tmp_path, capsys):
    before = snapshot(world.outside)
    for kind in ("file", "dangling"):
        out = tmp_path / kind / ("model.safetensors" if what in ("timm", "convert") else "model.bin")
        target = plant(out.with_suffix(".npy") if what == "embed" else out, kind, world.outside)
        for overwrite in ([], ["--overwrite"]):
            if what == "embed":
                argv = ["embed", "--model", str(world.model), str(world.colours / "val"), "--out",
                        str(out.with_suffix("")), "--quiet"]
            else:
                argv = [str(a) for a in SINGLE_FILES[what](world, out)]
            code = main(argv + overwrite)
            err = capsys.readouterr().err
            assert code == 2 and one_line_error(err) and "symbolic link" in err, (kind, overwrite, err)
            assert snapshot(world.outside) == before and not (world.outside / "nowhere").exists()
        assert os.readlink(out.with_suffix(".npy") if what == "embed" else out) == target


# --------------------------------------------------------------------------- every kind of output folder
@pytest.mark.parametrize("kind", sorted(rundir.KINDS))
def test_every_kind_of_output_folder_refuses_a_link_at_each_name_it_writes(kind, world, tmp_path):
    names, _ = rundir.KINDS[kind]
    before = snapshot(world.outside)
    for name in [n for n in names if n != "*/"] + (["job"] if "*/" in names else []):
        for target in (world.outside / "file.txt", world.outside / "folder", world.outside / "nowhere"):
            out = tmp_path / f"{kind}-{name}-{target.name}"
            rundir.claim(out, kind)
            (out / name).symlink_to(target)
            if "*/" in names and name == "job" and target.name != "folder":
                continue  # a link to a file under a name the verb never writes: the user's, kept
            with pytest.raises(atomic.NotOurs, match="symbolic link"):
                rundir.check_claim(out, kind)
            with pytest.raises(atomic.NotOurs):
                rundir.clear(out, kind)
    assert snapshot(world.outside) == before


# --------------------------------------------------------------------------- a link planted after the claim
def test_a_link_planted_after_the_claim_is_caught_at_the_write(world, tmp_path):
    """Race: the link appears once the folder was checked. Every writer, appender and deleter
    refuses it (O_NOFOLLOW from the topmost folder of ours down), and nothing outside changes."""
    before = snapshot(world.outside)
    out = rundir.claim(tmp_path / "sweep", "fewshot")
    job = rundir.claim(out / "1shot" / "seed0", "finetune")
    (job / "checkpoints").symlink_to(world.outside / "folder")
    (job / "tensorboard").symlink_to(world.outside / "folder")
    (job / "config.json").symlink_to(world.outside / "file.txt")
    (job / "metrics.jsonl").symlink_to(world.outside / "nowhere")
    attempts = {
        "checkpoint": lambda: atomic.write_safetensors(job / "checkpoints" / "latest.safetensors", {"a": torch.zeros(2)}),
        "deep folder": lambda: atomic.write_text(job / "checkpoints" / "new" / "x.txt", "x"),
        "config": lambda: atomic.write_json(job / "config.json", {}),
        "metrics": lambda: atomic.open_append(job / "metrics.jsonl"),
        "restart": lambda: atomic.remove_file(job / "checkpoints" / "latest.safetensors"),
        "folder": lambda: atomic.make_folder(job / "tensorboard" / "run"),
        "rmdir": lambda: atomic.remove_empty_folder(job / "tensorboard" / "sub"),
        "remove a link": lambda: atomic.remove_file(job / "config.json"),
    }
    for label, attempt in attempts.items():
        with pytest.raises(atomic.NotOurs, match="symbolic link"):
            attempt()
        assert snapshot(world.outside) == before, label
    # a link where a folder of ours stands higher up: the topmost folder of ours decides
    shutil.rmtree(out / "1shot")
    (out / "1shot").symlink_to(world.outside / "folder")
    with pytest.raises(atomic.NotOurs):
        atomic.write_text(out / "1shot" / "notes.txt", "x")
    with pytest.raises(atomic.NotOurs):
        rundir.claim(out / "1shot" / "seed1", "finetune")
    assert snapshot(world.outside) == before


def test_a_hard_link_to_the_users_file_is_replaced_not_written_through(world, tmp_path):
    """Whole-file writes rename a new file into place: a hard link's other name keeps its bytes."""
    out = rundir.claim(tmp_path / "ev", "evaluate")
    os.link(world.outside / "file.txt", out / "metrics.json")
    atomic.write_json(out / "metrics.json", {"top1": 1.0, "model": "m"})
    assert (world.outside / "file.txt").read_text() == "the user's file\n"
    assert json.loads((out / "metrics.json").read_text())["top1"] == 1.0
