"""Every output written whole: a full disk in every format leaves
the previous file intact and is one line; a writer killed mid-write leaves temporaries that the
next run removes; --restart deletes only what was recorded; no code writes around atomic.py.

A full disk is a file-size limit (RLIMIT_FSIZE) in a child process: the kernel then refuses a
write exactly as a full disk or quota does, and it needs no privileges."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fixtures_safety import tiny_model_file
from image_data import write_colour_folder

import bigtransfer
from bigtransfer import atomic, rundir
from bigtransfer.cli import main
from bigtransfer.errors import BigTransferError

TINY = "R[1,1,1,1]x0.5"
CLASSES = ["blue", "green", "red"]
SRC = Path(bigtransfer.__file__).parent


def one_line_error(err: str) -> bool:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    return len(lines) == 1 and lines[0].startswith("bigtransfer: error:") and "Traceback" not in err


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes (the lock, which names its last holder, aside)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != rundir.LOCK}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A tiny model and data; outputs are made by `outputs`."""
    root = tmp_path_factory.mktemp("writes")
    model = tiny_model_file(root / "tiny.safetensors", CLASSES)
    colours = write_colour_folder(root / "colours", per_class_train=2, per_class_val=1)
    return SimpleNamespace(root=root, model=model, colours=colours)


def outputs(good, out: Path, names) -> dict[str, list[str]]:
    """Each named output written once with no limit; returns the commands that write them again."""
    model, colours = good.model, good.colours
    runs = {
        "onnx": ["export", "--model", model, "--out", out / "m.onnx", "--no-check"],
        "pt2": ["export", "--model", model, "--format", "pt2", "--out", out / "m.pt2", "--no-check"],
        "torchscript": ["export", "--model", model, "--format", "torchscript", "--out", out / "m.pt", "--no-check"],
        "timm": ["export", "--model", model, "--format", "timm", "--out", out / "timm.safetensors", "--no-check"],
        "transformers": ["export", "--model", model, "--format", "transformers", "--out", out / "hf", "--no-check"],
        "convert": ["convert", model, out / "copy.safetensors"],
        "embed": ["embed", "--model", model, colours / "val", "--out", out / "features", "--quiet"],
        "evaluate": ["evaluate", "--model", model, "--data", colours, "--out", out / "eval", "--quiet"],
        "pack": ["pack", "--data", "glyphs:classes=2,per_class=4,test_per_class=2,size=8", "--out", out / "shards",
                 "--quiet"],
    }
    again = {}
    for name in names:
        argv = [str(a) for a in runs[name]]
        assert main(argv) == 0, name
        again[name] = argv + (["--overwrite"] if name not in ("evaluate", "pack") else [])  # folders: resumed
    return again


# Runs several CLI commands in one process, each under its own file-size limit (a full disk),
# and reports exit code and stderr of each. An abort (as TorchScript's own writer did) ends it.
UNDER_LIMITS = textwrap.dedent("""
    import contextlib, io, json, resource, signal, sys, traceback
    from bigtransfer.cli import main
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    results = []
    for limit, argv in json.loads(sys.argv[1]):
        err = io.StringIO()
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = main(argv)
        except BaseException:
            code, err = 99, io.StringIO(traceback.format_exc())
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        results.append([code, err.getvalue()])
    print(json.dumps(results))
""")

LIMITS = {"onnx": 1 << 20, "torchscript": 1 << 20, "pt2": 1 << 20, "timm": 1 << 20, "transformers": 1 << 20,
          "convert": 1 << 20, "embed": 1000, "evaluate": 5000, "pack": 5000}
WHAT = {"onnx": "ONNX export", "torchscript": "TorchScript export", "pt2": "pt2 export", "timm": "weights file",
        "transformers": "weights file", "convert": "weights file", "embed": "features", "evaluate": "confusion plot",
        "pack": "shard"}


def _fill_the_disk(again: dict[str, list[str]], out: Path) -> None:
    before = snapshot(out)
    jobs = [[LIMITS[name], argv] for name, argv in again.items()]
    result = subprocess.run([sys.executable, "-c", UNDER_LIMITS, json.dumps(jobs)], capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]  # no abort (TorchScript's writer used to: exit 134)
    for name, (code, err) in zip(again, json.loads(result.stdout.strip().splitlines()[-1])):
        assert code == 2 and one_line_error(err), (name, err)
        assert "File too large" in err and WHAT[name] in err, (name, err)
    assert snapshot(out) == before  # every earlier file byte for byte, no temporary left beside them
    assert not [p for p in out.rglob("*.tmp")]


def test_a_full_disk_in_every_format_is_one_line_and_the_previous_file_intact(good, tmp_path):
    """TorchScript, safetensors (timm, transformers, convert), npy, CSV + PNG + JSON, tar shards."""
    names = ("torchscript", "timm", "transformers", "convert", "embed", "evaluate", "pack")
    _fill_the_disk(outputs(good, tmp_path, names), tmp_path)


@pytest.mark.slow
def test_a_full_disk_while_exporting_onnx_or_pt2_leaves_the_previous_export(good, tmp_path):
    """The two exports that trace with torch.export (10 s or more each, twice)."""
    _fill_the_disk(outputs(good, tmp_path, ("onnx", "pt2")), tmp_path)


@pytest.mark.slow
def test_onnx_weights_beyond_one_protobuf_go_to_a_data_file_written_whole(good, tmp_path, monkeypatch):
    """Models over 1.8 GB keep their weights in OUT.data (ONNX external data); tried here on the
    tiny model with the threshold lowered, and the exported file run by onnxruntime against PyTorch."""
    onnxruntime = pytest.importorskip("onnxruntime")
    from bigtransfer.inference import backends
    from bigtransfer.inference.predictor import load_model
    from bigtransfer.sharing import export

    monkeypatch.setattr(backends, "MAX_PROTOBUF_BYTES", 0)
    out = tmp_path / "big.onnx"
    report = export.export(str(good.model), out)
    assert report["max_abs_diff_vs_pytorch"] < 1e-4
    assert (tmp_path / "big.onnx.data").stat().st_size > 1 << 20 > out.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data", "big.onnx.json", "big.onnx.md"]
    loaded = load_model(str(good.model), torch.device("cpu"))
    images = torch.rand(2, 3, loaded.resolution, loaded.resolution) * 2 - 1
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"images": images.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), loaded.model.eval()(images), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- the streamed safetensors writer
def test_streamed_safetensors_read_back_by_the_library_itself(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g), "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(), "f64": torch.randn(2, generator=g).double(),
        "i64": torch.arange(5), "i32": torch.arange(3, dtype=torch.int32), "u8": torch.arange(9, dtype=torch.uint8),
        "i8": torch.tensor([-1, 2], dtype=torch.int8), "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "transposed": torch.randn(4, 6, generator=g).t(),
    }
    path = atomic.write_safetensors(tmp_path / "t.safetensors", tensors, {"format": "pt", "note": "ü"})
    loaded = load_file(str(path))
    assert sorted(loaded) == sorted(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    with safe_open(str(path), "pt") as fh:
        assert fh.metadata() == {"format": "pt", "note": "ü"}
    with pytest.raises(ValueError, match="complex"):
        atomic.write_safetensors(tmp_path / "c.safetensors", {"c": torch.zeros(2, dtype=torch.complex64)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]  # the refused one left nothing


# --------------------------------------------------------------------------- writers killed mid-write
SLOW_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from bigtransfer import atomic, rundir
    target, kind = Path(sys.argv[1]), sys.argv[2]

    def slow(fh):
        fh.write(b"half a checkpoint" * 1000)
        fh.flush()
        print("writing", flush=True)
        time.sleep(600)

    if kind == "none":
        atomic.write_atomically(target, slow)
    else:
        with rundir.owned(Path(sys.argv[3]), kind):
            atomic.write_atomically(target, slow)
""")


def _killed_while_writing(target: Path, kind: str = "none", out: Path | None = None) -> Path:
    """Start a writer of `target`, kill -9 it mid-write; returns the temporary file it left."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(target), kind, str(out)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.{proc.pid}.")]
    assert len(left) == 1 and left[0].stat().st_size == 17000
    return left[0]


def test_temporaries_of_a_writer_killed_mid_checkpoint_are_removed_by_the_next_run(tmp_path):
    run = tmp_path / "run"
    ours = _killed_while_writing(run / "checkpoints" / "latest.safetensors", "finetune", run)
    # what earlier versions left: safetensors' own temporary and our older name (no host in it)
    library = run / "checkpoints" / ".tmpA1b2C3"
    older = run / ".final.safetensors.4242.0a1b2c3d.tmp"
    users = [run / "checkpoints" / ".tmp_notes", run / ".final.safetensors.backup"]
    for path in (library, older, *users):
        path.write_bytes(b"x" * 100)
    an_hour_ago = time.time() - 3600
    for path in (library, older):
        os.utime(path, (an_hour_ago, an_hour_ago))
    with rundir.owned(run, "finetune"):  # the next run in that folder, holding its lock
        pass
    assert not ours.exists() and not library.exists() and not older.exists()
    assert all(p.read_bytes() == b"x" * 100 for p in users)


def test_without_a_lock_only_temporaries_of_dead_writers_on_this_host_go(tmp_path):
    """A protocol folder that several workers share keeps no lock: a temporary is removed only if
    its pid is dead on this host; a live writer's, another host's and an unknown one's stay."""
    sweep = rundir.claim(tmp_path / "sweep", "fewshot")
    dead = _killed_while_writing(sweep / "results.json")
    live_writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        host = atomic.temp_name("x").split(".")[3][:6]
        other_host = "f" * 6 if host != "f" * 6 else "e" * 6
        live = sweep / f".results.json.{live_writer.pid}.{host}01234567.tmp"
        elsewhere = sweep / f".results.json.{dead.name.split('.')[3]}.{other_host}01234567.tmp"
        older = sweep / ".results.json.4242.0a1b2c3d.tmp"
        for path in (live, elsewhere, older):
            path.write_bytes(b"x")
        rundir.claim(sweep, "fewshot")
        assert not dead.exists() and live.exists() and elsewhere.exists() and older.exists()
    finally:
        live_writer.kill()
        live_writer.wait()


def test_a_single_output_file_killed_mid_write_is_cleaned_by_the_next_export(tmp_path):
    target = tmp_path / "model.onnx"
    left = _killed_while_writing(target)
    assert not target.exists()
    rundir.check_new_file(target)  # what export, embed and convert call before writing
    assert not left.exists()


# --------------------------------------------------------------------------- --restart deletes what was recorded
def _demo_like(out: Path) -> None:
    """A demo folder as the demo writes it: its own files, and runs of ours in nested folders."""
    rundir.claim(out, "demo")
    for run in ("pretrain", "transfer/1shot/seed0", "transfer/2shot/seed0", "scratch/1shot/seed0"):
        rundir.claim(out / run, "finetune")
        atomic.write_json(out / run / "config.json", {"fingerprint": "f"})
        atomic.write_safetensors(out / run / "checkpoints" / "latest.safetensors", {"a": torch.zeros(1)})
        atomic.open_append(out / run / "metrics.jsonl").close()
    atomic.write_json(out / "summary.json", {})


def _users_things(out: Path) -> list[Path]:
    mine = [out / "transfer" / "mine", out / "scratch" / "empty", out / "transfer" / "1shot" / "also_mine",
            out / "pretrain" / "checkpoints" / "kept"]
    for folder in mine:
        folder.mkdir(parents=True)
    (out / "transfer" / "1shot" / "seed0" / "notes.txt").write_text("mine")
    (out / "checkpoints.txt").write_text("mine")
    return [*mine, out / "transfer" / "1shot" / "seed0" / "notes.txt", out / "checkpoints.txt"]


def test_restart_removes_only_recorded_files_and_folders_never_a_users_empty_folder(tmp_path):
    out = tmp_path / "demo"
    _demo_like(out)
    users = _users_things(out)
    kept = rundir.clear(out, "demo")
    assert all(p.exists() for p in users)
    assert sorted(kept) == sorted(users)
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if not p.name.startswith(".bigtransfer"))
    assert left == sorted(["checkpoints.txt", "pretrain", "pretrain/checkpoints", "pretrain/checkpoints/kept",
                           "scratch", "scratch/empty", "transfer", "transfer/1shot", "transfer/1shot/also_mine",
                           "transfer/1shot/seed0", "transfer/1shot/seed0/notes.txt", "transfer/mine"])
    _demo_like(out)  # and the demo writes there again
    assert (out / "transfer" / "2shot" / "seed0" / "config.json").is_file()


def test_restart_of_a_folder_from_before_records_keeps_every_plain_folder(tmp_path):
    """Without a record, folders of ours are runs (marker or config) and known names; a plain
    folder, empty or not, may be the user's and stays."""
    out = tmp_path / "demo"
    _demo_like(out)
    for record in out.rglob(rundir.RECORD):
        record.unlink()
    users = _users_things(out)
    kept = rundir.clear(out, "demo")
    assert all(p.exists() for p in users) and set(users) <= set(kept)
    assert not (out / "transfer" / "2shot" / "seed0").exists() and not (out / "summary.json").exists()
    assert (out / "transfer" / "2shot").is_dir()  # a plain folder: not known to be ours
    assert (out / rundir.RECORD).is_file()  # from now on, what is created there is recorded


def test_restart_stops_at_a_nested_run_another_process_is_writing(tmp_path):
    out = tmp_path / "demo"
    _demo_like(out)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from pathlib import Path
        from bigtransfer import rundir
        with rundir.exclusive(Path(sys.argv[1])):
            print("locked", flush=True)
            time.sleep(600)
    """), str(out / "pretrain")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(rundir.RunInUse):
            rundir.clear(out, "demo")
        assert (out / "pretrain" / "config.json").is_file()  # nothing of the running one was deleted
    finally:
        holder.kill()
        holder.wait()


# --------------------------------------------------------------------------- append-only logs
def test_tensorboard_events_are_new_unguessable_recorded_and_a_failed_write_is_one_error(tmp_path, monkeypatch):
    from bigtransfer.train.logbook import Logbook

    run = rundir.claim(tmp_path / "run", "finetune")
    book = Logbook(run)
    book.log(1, "train", loss=1.0)
    events = list((run / "tensorboard").iterdir())
    assert len(events) == 1 and len(events[0].name.rsplit(".", 1)[-1]) == 16  # 64 random bits in the name
    assert f"tensorboard/{events[0].name}" in atomic.read_record(run)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(book._writer, "add_scalar", disk_full)
    with pytest.raises(BigTransferError, match="cannot write TensorBoard events .No space left on device"):
        book.log(2, "train", loss=0.5)
    writer = book._writer
    monkeypatch.setattr(writer, "close", disk_full)
    book.close()  # a failure while closing never hides the error that stopped the run
    monkeypatch.undo()
    writer.close()


# --------------------------------------------------------------------------- nothing writes around atomic.py
# The download cache appends to its resumable `.part` file in place (opened with O_NOFOLLOW, checked
# as a model before it is renamed into place): models/transfer.py; zoo/hub hand files to it.
OWNED_ELSEWHERE = {"atomic.py", "models/zoo.py", "models/hub.py", "models/transfer.py"}
WRITE_FLAGS = {"O_WRONLY", "O_RDWR", "O_CREAT", "O_APPEND", "O_TRUNC"}
PATH_WRITES = {"write_text", "write_bytes", "unlink", "mkdir", "rmdir", "touch", "rename", "symlink_to",
               "hardlink_to", "makedirs", "rmtree", "copyfile", "copytree", "copy2", "save_file",
               "savez", "savez_compressed", "open_memmap", "tofile"}
TO_A_STREAM = {"save", "savefig", "memmap"}  # fine into an in-memory buffer or a file object handed in


def _offending_calls(tree: ast.AST) -> list[str]:
    """Calls that write or delete by path: methods (`path.unlink()`, `os.replace`, `fig.savefig("x")`),
    `open` for writing, and `save_file`. (atomic's own functions are called by name: not methods.)"""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        method = isinstance(func, ast.Attribute)
        name = func.attr if method else func.id if isinstance(func, ast.Name) else ""
        owner = func.value.id if method and isinstance(func.value, ast.Name) else ""
        if owner == "atomic":
            continue
        if (method and name in PATH_WRITES) or name == "save_file" or (
                owner in ("os", "shutil") and name in ("replace", "link", "symlink", "remove", "move")):
            found.append(f"{name} (line {node.lineno})")
        elif name == "open" and owner in ("", "os"):
            if node.args and isinstance(node.args[0], ast.Attribute) and node.args[0].attr == "devnull":
                continue  # stdout sent nowhere once the reader of a pipe has gone
            mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg in
                                                                ("mode", "flags")), None)
            if owner == "os" and mode is not None and not isinstance(mode, ast.Constant):
                flags = {n.attr for n in ast.walk(mode) if isinstance(n, ast.Attribute)}
                if flags and not flags & WRITE_FLAGS:
                    continue  # os.open for reading only, e.g. O_RDONLY | O_NOFOLLOW
            if mode is not None and not (isinstance(mode, ast.Constant) and set(str(mode.value)) <= set("rbt")):
                found.append(f"open for writing (line {node.lineno})")
        elif method and name in TO_A_STREAM and not [
                a for a in node.args[:2] if isinstance(a, ast.Name) and a.id in ("buffer", "fh", "stream")]:
            found.append(f"{name} to a path (line {node.lineno})")
    return found


def test_no_module_writes_a_file_except_through_atomic():
    offenders = {}
    for path in sorted(SRC.rglob("*.py")):
        relative = str(path.relative_to(SRC))
        if relative not in OWNED_ELSEWHERE:
            calls = _offending_calls(ast.parse(path.read_text()))
            if calls:
                offenders[relative] = calls
    assert offenders == {}, offenders


def test_the_scan_finds_what_it_looks_for():
    code = textwrap.dedent("""
        Path("x").write_text("y")
        open(p, "w")
        os.open(p, os.O_WRONLY)
        fig.savefig("out.png")
        np.save(path, array)
        os.replace(a, b)
        image.save(buffer, format="PNG")
        open(p, "rb")
    """)
    assert len(_offending_calls(ast.parse(code))) == 6


def test_a_record_line_that_is_half_written_or_escapes_the_folder_is_ignored(tmp_path):
    out = rundir.claim(tmp_path / "ev", "evaluate")
    (out / rundir.RECORD).write_text('"metrics.json"\n"../outside.txt"\n"/etc/passwd"\n"a/../../b"\n42\n"conf')
    assert atomic.read_record(out) == {"metrics.json"}
    np.testing.assert_equal(atomic.read_record(tmp_path), None)  # a folder that keeps no record
