"""Crafted files that once gave tracebacks or took slow paths.

JSON nested 100,000 levels deep, tensors of the wrong type or of another architecture than the
metadata says, a 25 MB value quoted in an error, a zip directory of a million members, icons that
wrap a 13000x13000 PNG, and file names that are not UTF-8 or hold a newline. Every case is built
here, small; the cost of refusing it is measured (peak RSS of a child process against the same
command on a good file, wall time of the library call), and files we did not write stay as they were."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from bit_files import authors_arrays
from fixtures_safety import run_cli_many, tiny_model_file
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from test_safety import TINY, one_line_error, run_cli, snapshot

import bigtransfer
from bigtransfer.cli import main

MIB = 1 << 20
EXTRA_MEMORY = 200 * MIB  # what refusing a crafted file may cost above the same command on a good file
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return tiny_model_file(tmp_path_factory.mktemp("model") / "tiny.safetensors", ["a", "b", "c"])


@pytest.fixture(scope="module")
def info_in_one_child(tiny_model, tmp_path_factory) -> dict[str, tuple]:
    """`bigtransfer info` on a good file, then on each crafted file whose refusal must cost no memory,
    all in one child: {case: (exit code, stdout, stderr, seconds, peak RSS so far)}. The good file goes
    first: its peak is what importing torch and friends costs here (the baseline), and a crafted
    file's reading is the peak of everything up to it, so it can only read high, never low."""
    folder = tmp_path_factory.mktemp("crafted")
    tensors, meta = _tensors(tiny_model)
    save_file(tensors, str(folder / "deep.safetensors"), metadata={**meta, "provenance": DEEP})
    files = {"good": tiny_model, "deep": folder / "deep.safetensors",
             "zip": _many_members(folder / "many.npz", 1_000_000),
             "zip64": _zip64_members(folder / "many64.npz", 1_000_000)}
    results = run_cli_many(*(["info", path] for path in files.values()))
    return dict(zip(files, results))


@pytest.fixture(scope="module")
def baseline_peak(info_in_one_child) -> int:
    """Peak RSS of `bigtransfer info` on a good file: what importing torch and friends costs here."""
    code, _, err, _, peak = info_in_one_child["good"]
    assert code == 0, err
    return peak


def _tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()  # noqa: SIM118


def _user_files(folder: Path) -> dict:
    """Every file under `folder` but the test's model cache: what a refused command must leave as it was."""
    return {k: v for k, v in snapshot(folder).items() if not k.startswith("cache/")}


def _photo(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / "photo.png")
    return folder / "photo.png"


# --------------------------------------------------------------------------- deep JSON
def _exported(tiny_model: Path, tmp_path: Path, fmt: str) -> Path:
    out = tmp_path / ("timm.safetensors" if fmt == "timm" else "hf")
    assert main(["export", "--model", str(tiny_model), "--format", fmt, "--out", str(out), "--no-check"]) == 0
    return out


def test_deep_json_in_weights_metadata_and_configs_is_one_line(tiny_model, tmp_path, capsys):
    tensors, meta = _tensors(tiny_model)
    cases = []
    for key in ("class_names", "provenance", "value_range", "resolution"):
        path = tmp_path / f"deep_{key}.safetensors"
        save_file(tensors, str(path), metadata={**meta, key: DEEP})
        cases.append((path, key))
    timm_file = _exported(tiny_model, tmp_path, "timm")  # our block inside an exported file's metadata
    timm_tensors, timm_meta = _tensors(timm_file)
    save_file(timm_tensors, str(tmp_path / "deep_timm.safetensors"), metadata={**timm_meta, "bigtransfer": DEEP})
    cases.append((tmp_path / "deep_timm.safetensors", "bigtransfer"))
    folder = _exported(tiny_model, tmp_path, "transformers")
    (folder / "config.json").write_text(DEEP)
    cases.append((folder, "config.json"))
    photo = _photo(tmp_path / "photos")
    before = _user_files(tmp_path)
    capsys.readouterr()
    for path, where in cases:
        for argv in (["info", path], ["predict", "--model", path, photo], ["convert", path, tmp_path / "c.safetensors"]):
            assert main([str(a) for a in argv]) == 2, (argv, where)
            err = capsys.readouterr().err
            assert one_line_error(err) and where in err and "nested too deeply" in err, err
    assert _user_files(tmp_path) == before


def test_deep_json_in_the_other_files_a_user_hands_in(tmp_path, tiny_model, capsys):
    """COCO annotations, an ObjectNet mapping, a shard index, a pushed run's config, a protocol folder."""
    (tmp_path / "coco.json").write_text(DEEP)
    (tmp_path / "map.json").write_text(DEEP)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "dataset.json").write_text(DEEP)
    run = tmp_path / "run"
    run.mkdir()
    (run / "final.safetensors").write_bytes(tiny_model.read_bytes())
    (run / "config.json").write_text(DEEP)
    (run / "summary.json").write_text("{}")
    protocol = tmp_path / "fs"
    protocol.mkdir()
    (protocol / "protocol.json").write_text(DEEP)
    colours = tmp_path / "colours" / "a"
    colours.mkdir(parents=True)
    _photo(colours)
    _photo(tmp_path / "colours" / "b")
    argvs = [["detect-train", "--data", tmp_path / "coco.json", "--model", TINY, "--out", tmp_path / "det"],
             ["objectnet", "--model", tiny_model, "--data", tmp_path / "colours", "--mapping", tmp_path / "map.json"],
             ["pretrain", "--data", tmp_path / "shards", "--model", TINY, "--out", tmp_path / "pre"],
             ["push", run, "alice/x", "--to-folder", tmp_path / "repo", "--no-check"],
             ["report", protocol]]
    capsys.readouterr()
    for argv in argvs:
        assert main([str(a) for a in argv]) == 2, argv
        err = capsys.readouterr().err
        assert one_line_error(err), err


def test_deep_json_costs_no_memory(info_in_one_child, baseline_peak):
    code, _, err, seconds, peak = info_in_one_child["deep"]  # `info` on a file whose provenance is DEEP
    assert code == 2 and one_line_error(err), err
    assert peak < baseline_peak + EXTRA_MEMORY and seconds < 120


# --------------------------------------------------------------------------- dtypes and contradictions
def _retyped(tensors: dict, dtype) -> dict:
    return {k: (v > 0) if dtype is torch.bool else v.to(dtype) for k, v in tensors.items()}


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.uint8, torch.int32], ids=str)
@pytest.mark.parametrize("fmt", ["ours", "timm", "transformers"])
def test_tensors_that_are_not_floating_point_are_refused_by_every_verb(fmt, dtype, tiny_model, tmp_path, capsys):
    if fmt == "ours":
        source, target = tiny_model, tmp_path / "crafted.safetensors"
    else:
        exported = _exported(tiny_model, tmp_path, fmt)
        source = exported if fmt == "timm" else exported / "model.safetensors"
        target = tmp_path / "crafted.safetensors" if fmt == "timm" else exported / "model.safetensors"
    tensors, meta = _tensors(source)
    save_file(_retyped(tensors, dtype), str(target), metadata=meta)
    model = target if fmt != "transformers" else target.parent
    photo = _photo(tmp_path / "photos")
    before = _user_files(tmp_path)
    capsys.readouterr()
    for argv in (["info", model], ["predict", "--model", model, photo], ["convert", model, tmp_path / "c.safetensors"],
                 ["embed", "--model", model, photo, "--out", tmp_path / "features"],
                 ["export", "--model", model, "--out", tmp_path / "m.onnx"]):
        assert main([str(a) for a in argv]) == 2, argv
        err = capsys.readouterr().err
        assert one_line_error(err) and "not floating-point numbers" in err, (argv, err)
    assert _user_files(tmp_path) == before


@pytest.mark.parametrize("dtype", [np.int64, np.int8, np.bool_], ids=lambda d: np.dtype(d).name)
def test_an_npz_whose_arrays_are_not_floating_point_is_refused(dtype, tmp_path, capsys):
    arrays = {k: (v > 0).astype(dtype) if dtype is np.bool_ else v.astype(dtype)
              for k, v in authors_arrays((1, 1, 1, 1), 0.5, num_classes=3).items()}
    path = tmp_path / "ints.npz"
    np.savez(path, **arrays)
    photo = _photo(tmp_path / "photos")
    for argv in (["info", path], ["predict", "--model", path, photo], ["convert", path, tmp_path / "c.safetensors"]):
        assert main([str(a) for a in argv]) == 2, argv
        err = capsys.readouterr().err
        assert one_line_error(err) and ("not floating-point numbers" in err or "not numbers" in err), err


def test_metadata_that_the_tensors_contradict_is_refused_not_reported(tmp_path, capsys):
    """`info` used to print the metadata's architecture whatever the tensors were."""
    torch.manual_seed(0)
    bigger = bigtransfer.create_model("R[2,1,1,1]x0.5", num_classes=3)
    bigtransfer.save_checkpoint(bigger, tmp_path / "two.safetensors", class_names=["a", "b", "c"])
    tensors, meta = _tensors(tmp_path / "two.safetensors")
    cases = {"units": {**meta, "units": "1,1,1,1", "architecture": "R[1,1,1,1]x0.5"},  # a unit too many in the file
             "architecture": {**meta, "architecture": "R152x4"},  # a name the numbers contradict
             "norm": {**meta, "norm": "bn"}}  # BatchNorm needs running statistics the file lacks
    for case, metadata in cases.items():
        path = tmp_path / f"{case}.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        assert main(["info", str(path)]) == 2, case
        captured = capsys.readouterr()
        assert one_line_error(captured.err) and "damaged bigtransfer metadata" in captured.err, (case, captured.err)
        assert captured.out == ""


# --------------------------------------------------------------------------- long values
def test_a_25_mb_value_is_quoted_in_a_short_line(tiny_model, tmp_path, capsys):
    huge = "x" * 25_000_000
    folder = _exported(tiny_model, tmp_path, "transformers")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_act": huge}))
    tensors, meta = _tensors(tiny_model)
    save_file(tensors, str(tmp_path / "norm.safetensors"), metadata={**meta, "norm": huge})
    save_file(tensors, str(tmp_path / "names.safetensors"), metadata={**meta, "class_names": json.dumps([huge] * 2)})
    manifest = tmp_path / "labels.csv"
    manifest.write_text(f"path,label\n{huge[:100_000]}.png,a\n")  # the csv module's cell limit is 128 KiB
    capsys.readouterr()
    for argv in (["info", folder], ["info", tmp_path / "norm.safetensors"], ["info", tmp_path / "names.safetensors"],
                 ["pack", "--data", manifest, "--out", tmp_path / "shards"]):
        assert main([str(a) for a in argv]) == 2, argv
        err = capsys.readouterr().err
        assert one_line_error(err) and len(err) < 1000 and "characters)" in err, (argv, err[:300])


def test_the_error_printer_caps_any_message(capsys, monkeypatch):
    """Whatever a message holds (a value no check quoted, a newline, bytes that are not UTF-8), the CLI
    prints one line of bounded length."""
    import argparse

    from bigtransfer import cli
    from bigtransfer.errors import BigTransferError

    def fail(args):
        raise BigTransferError("first line\nsecond line \udcff " + "y" * 5_000_000)

    class Parser:  # a verb whose check forgot to quote what it read
        def parse_args(self, argv):
            return argparse.Namespace(verb="models", run=fail)

    monkeypatch.setattr(cli, "build_parser", Parser)
    assert main([]) == 2
    err = capsys.readouterr().err
    assert one_line_error(err) and len(err) < 3000 and "first line\\nsecond line \\xff yyy" in err
    assert err.rstrip().endswith("(5,000,025 characters)")


# --------------------------------------------------------------------------- a zip directory of a million members
def _member_directory(count: int) -> tuple[bytes, bytes]:
    """One local file header (so the file starts as a zip does), and a central directory listing
    `count` empty .npy members (57 bytes each)."""
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, 0, 0, 0, 5, 0) + b"a.npy"
    entry = struct.Struct("<IHHHHHHIIIHHHHHII")
    directory = b"".join(entry.pack(0x02014B50, 20, 20, 0, 0, 0, 0, 0, 0, 0, 11, 0, 0, 0, 0, 0, 0) + b"%07d.npy" % i
                         for i in range(count))
    return local, directory


def _many_members(path: Path, count: int) -> Path:
    local, directory = _member_directory(count)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF), len(directory),
                      len(local), 0)
    path.write_bytes(local + directory + end)
    return path


def _zip64_members(path: Path, count: int) -> Path:
    """The same, behind a zip64 end record (the only place a count above 65535 can be written)."""
    local, directory = _member_directory(count)
    zip64_at = len(local) + len(directory)
    zip64_end = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, len(directory), len(local))
    locator = struct.pack("<IIQI", 0x07064B50, 0, zip64_at, 1)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    path.write_bytes(local + directory + zip64_end + locator + end)
    return path


@pytest.mark.parametrize("build", [_many_members, _zip64_members], ids=["zip", "zip64"])
def test_an_npz_listing_a_million_members_is_refused_from_its_end_record(build, tmp_path, info_in_one_child,
                                                                        baseline_peak):
    from bigtransfer.errors import BigTransferError
    from bigtransfer.models.checkpoint import summarize

    path = build(tmp_path / "many.npz", 1_000_000)
    started = time.perf_counter()
    with pytest.raises(BigTransferError, match="1,000,000 members|65,535 members"):
        summarize(path)
    assert time.perf_counter() - started < 1.0  # reading the directory whole took 15 s
    # `info` on the same file, built alike in the module's child
    code, _, err, _, peak = info_in_one_child["zip" if build is _many_members else "zip64"]
    assert code == 2 and one_line_error(err) and "more than any BiT checkpoint holds" in err, err
    assert peak < baseline_peak + EXTRA_MEMORY  # the directory's ZipInfo objects were 400 MB


def test_a_real_checkpoint_npz_still_reads(tmp_path):
    from bigtransfer.models.checkpoint import summarize

    path = tmp_path / "authors.npz"
    np.savez_compressed(path, **authors_arrays((1, 1, 1, 1), 0.5, num_classes=3))
    assert summarize(path).arch.name == TINY.replace("[1,1,1,1]", "14")


# --------------------------------------------------------------------------- frames decoded before the limit
def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def _blank_png(width: int, height: int) -> bytes:
    """A black RGBA PNG written directly (Pillow would need the pixels in memory first): the raw
    stream is all zeros, deflated once per 4 MB block and repeated, with the real checksum."""
    row = bytes(1 + 4 * width)  # filter byte 0, then black pixels
    per_block = max(1, (4 << 20) // len(row))
    block, (full, rest) = row * per_block, divmod(height, per_block)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    again = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)  # a full flush forgets: every later block
    tail = deflate.compress(row * rest) + deflate.flush()
    adler = 1
    for _ in range(full):
        adler = zlib.adler32(block, adler)
    stream = (b"\x78\xda" + (first + again * (full - 1) if full else b"") + tail
              + struct.pack(">I", zlib.adler32(row * rest, adler)))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0))
            + chunk(b"IDAT", stream) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def big_png() -> bytes:
    """A 13000 x 13000 RGBA PNG of one colour: 0.7 MB of file, 676 MB of pixels."""
    return _blank_png(13000, 13000)


def _ico(frames: list[bytes], declared: int = 0) -> bytes:
    """An ICO file whose directory entries say `declared` pixels square (0: 256) and whose frames are
    the given PNG bytes."""
    offset, entries = 6 + 16 * len(frames), b""
    for frame in frames:
        entries += struct.pack("<BBBBHHII", declared, declared, 0, 0, 1, 32, len(frame), offset)
        offset += len(frame)
    return struct.pack("<HHH", 0, 1, len(frames)) + entries + b"".join(frames)


def _icns(frames: list[tuple[bytes, bytes]]) -> bytes:
    blocks = b"".join(kind + struct.pack(">I", 8 + len(data)) + data for kind, data in frames)
    return b"icns" + struct.pack(">I", 8 + len(blocks)) + blocks


LOAD_IN_A_CHILD = textwrap.dedent("""
    import sys
    from bigtransfer.data.images import IMAGE_ERRORS, load_rgb
    try:
        load_rgb(sys.argv[1])
        print("decoded")
    except IMAGE_ERRORS as err:
        print("refused:", err)
    with open("/proc/self/status") as fh:
        print(next(line.split()[1] for line in fh if line.startswith("VmHWM:")))
""")


def test_icons_wrapping_a_huge_png_are_refused_before_decoding(big_png, tmp_path):
    """Each file is loaded in a child process that imports only the image reader: its peak RSS shows
    whether the frame was decoded (676 MB of pixels, 1.4 GB with the conversion before the fix)."""
    small = _png_bytes(Image.new("RGBA", (16, 16), (255, 0, 0, 255)))
    assert struct.unpack(">II", big_png[16:24]) == (13000, 13000)  # what its IHDR declares
    files = {"bomb.ico": _ico([big_png]), "hidden.ico": _ico([small, big_png]),  # the bomb as a second frame
             "bomb.icns": _icns([(b"ic10", big_png)]),
             "jpeg2000.icns": _icns([(b"ic10", b"\x00\x00\x00\x0cjP  \r\n\x87\n" + bytes(64))])}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        result = subprocess.run([sys.executable, "-c", LOAD_IN_A_CHILD, str(tmp_path / name)], capture_output=True,
                                text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=120,
                                check=False)
        verdict, peak_kib = result.stdout.splitlines()
        assert verdict.startswith("refused:") and int(peak_kib) * 1024 < 150 * MIB, (name, result.stdout, result.stderr)
    (tmp_path / "good.ico").write_bytes(_ico([small], declared=16))  # an honest icon still reads
    from bigtransfer.data.images import load_rgb

    assert load_rgb(tmp_path / "good.ico").size == (16, 16)


def test_only_the_first_frame_of_other_multi_frame_formats_is_decoded_and_it_is_checked(tmp_path, monkeypatch):
    """GIF, APNG, animated WebP, multi-page TIFF, MPO, with the limit lowered to 10,000 pixels: a file
    decodes exactly when the size it declares is within the limit (a small first frame followed by a
    200x200 one: the big frame is never touched; an APNG's canvas holds every frame, so it declares the
    big size), and a GIF frame that overflows the small screen it declares is refused."""
    from bigtransfer.data.images import IMAGE_ERRORS, load_rgb

    small, big = Image.new("RGB", (50, 50), (200, 0, 0)), Image.new("RGB", (200, 200), (0, 0, 200))
    written = []
    for fmt, suffix in (("GIF", "gif"), ("PNG", "png"), ("WEBP", "webp"), ("TIFF", "tif"), ("MPO", "mpo")):
        try:
            small.save(tmp_path / f"small_first.{suffix}", format=fmt, save_all=True, append_images=[big])
            big.save(tmp_path / f"big_first.{suffix}", format=fmt, save_all=True, append_images=[small])
        except (KeyError, OSError, ValueError, RuntimeError):  # this Pillow cannot write it (WebP: frame sizes)
            continue
        written.append(suffix)
    assert {"gif", "png", "tif"} <= set(written)
    declared = {}
    for path in tmp_path.iterdir():
        with Image.open(path) as image:
            declared[path.name] = image.size
    (tmp_path / "overflow.gif").write_bytes(_gif_with_overflowing_frame())
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after: open_image sets it
    monkeypatch.setenv("BIGTRANSFER_MAX_PIXELS", "10000")
    for suffix in written:
        for order in ("small_first", "big_first"):
            path = tmp_path / f"{order}.{suffix}"
            width, height = declared[path.name]
            if width * height <= 10_000:
                assert load_rgb(path).size == (width, height), path.name
            else:
                with pytest.raises(IMAGE_ERRORS):
                    load_rgb(path)
    assert load_rgb(tmp_path / "small_first.gif").size == (50, 50)
    with pytest.raises(IMAGE_ERRORS):
        load_rgb(tmp_path / "overflow.gif")


def _gif_with_overflowing_frame() -> bytes:
    """A GIF whose screen is 10x10 and whose one frame is 300x300 (Pillow grows the image to fit it)."""
    buffer = io.BytesIO()
    Image.new("P", (300, 300), 0).save(buffer, format="GIF")
    data = bytearray(buffer.getvalue())
    data[6:10] = struct.pack("<HH", 10, 10)  # the logical screen
    return bytes(data)


# --------------------------------------------------------------------------- file names
def _odd_names(folder: Path, seed: int = 0) -> dict[str, bytes]:
    """Good images and unreadable files whose names are not UTF-8 or hold a newline."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    good = [b"plain.png", b"caf\xe9.png", b"new\nline.png", b"tab\there.png", b"back\\slash.png"]
    bad = [b"bad\xff.png", b"bad\nname.png"]
    for name in good:
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(os.fsencode(folder) + b"/" + name)
    for name in bad:
        with open(os.fsencode(folder) + b"/" + name, "wb") as fh:
            fh.write(b"not an image")
    return {"good": good, "bad": bad}


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS file systems refuse names that are not UTF-8")
def test_embed_and_predict_print_and_write_odd_names_escaped(tmp_path, tiny_model, capsys):
    names = _odd_names(tmp_path / "photos")
    before = snapshot(tmp_path / "photos")
    assert main(["embed", "--model", str(tiny_model), str(tmp_path / "photos"), "--out", str(tmp_path / "f"),
                 "--quiet"]) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if line.strip()]
    assert len(warning) == 1 and "bad\\xff.png" in warning[0] and "bad\\nname.png" in warning[0], err
    index = (tmp_path / "f.csv").read_bytes().decode("utf-8").splitlines()  # valid UTF-8, one line per row
    assert [line.split(",", 1)[0] for line in index] == ["row", "0", "1", "2", "3", "4"]
    assert {line.split(",", 1)[1] for line in index[1:]} == {
        f"{tmp_path}/photos/{n}" for n in ("back\\\\slash.png", "caf\\xe9.png", "new\\nline.png", "plain.png",
                                           "tab\\there.png")}
    assert np.load(tmp_path / "f.npy").shape[0] == len(names["good"])
    code, out, err, _ = run_cli("predict", "--model", tiny_model, tmp_path / "photos", "--quiet",
                                env={"LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8:strict"})
    assert code == 0 and "Traceback" not in err, err
    assert f"{tmp_path}/photos/caf\\xe9.png" in out.splitlines() and f"{tmp_path}/photos/new\\nline.png" in out
    assert snapshot(tmp_path / "photos") == before


def test_embed_writes_both_outputs_or_neither(tmp_path, tiny_model, monkeypatch, capsys):
    photos = tmp_path / "photos"
    _photo(photos)

    def disk_full(fh, array, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", disk_full)
    argv = ["embed", "--model", str(tiny_model), str(photos), "--out", str(tmp_path / "f"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert one_line_error(err) and "No space left on device" in err and "nothing was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "model", "photos"] or \
        sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["photos"]
    monkeypatch.undo()
    assert main(argv) == 0  # the re-run is not blocked by half an output
    assert (tmp_path / "f.npy").is_file() and (tmp_path / "f.csv").is_file()


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS file systems refuse names that are not UTF-8")
def test_dedup_and_training_runs_list_odd_names_one_per_line(tmp_path, tiny_model, capsys):
    up = tmp_path / "up"
    _odd_names(up / "c0", seed=1)
    _odd_names(up / "c1", seed=2)
    down = tmp_path / "down"
    _odd_names(down / "train" / "x", seed=3)
    _odd_names(down / "train" / "y", seed=4)
    assert main(["dedup", "--upstream", str(up), "--downstream", str(down), "--model", str(tiny_model),
                 "--resolution", "32", "--self-test", "0", "--out", str(tmp_path / "dd"), "--quiet"]) == 0
    for name in ("pairs.csv", "upstream_filtered.csv", "contact_sheet.html", "summary.json"):
        (tmp_path / "dd" / name).read_bytes().decode("utf-8")
    from bigtransfer.data.sources import load_source

    kept = load_source(str(tmp_path / "dd" / "upstream_filtered.csv"), require_test=False, progress=False, warn=False)
    assert sorted(map(os.fsencode, kept.train.paths)) == sorted(
        os.fsencode(p) for p in up.rglob("*.png") if b"bad" not in os.fsencode(p.name))
    capsys.readouterr()
    assert main(["finetune", "--data", str(down), "--val-fraction", "0.5", "--model", TINY, "--steps", "1",
                 "--batch", "4", "--resolution", "20/16", "--workers", "0", "--quiet", "--out", str(tmp_path / "run")]
                ) == 0
    err = capsys.readouterr().err
    listed = (tmp_path / "run" / "skipped_images.txt").read_text(encoding="utf-8").splitlines()
    assert len(listed) == 4 and all(line.endswith(("bad\\xff.png", "bad\\nname.png")) for line in listed)
    assert len([line for line in err.splitlines() if "skipped 4 unreadable" in line]) == 1


def test_a_name_longer_than_the_file_system_allows_is_one_line(tmp_path, tiny_model, capsys):
    long_name = str(tmp_path / ("x" * 5000))
    for argv in (["info", long_name], ["predict", "--model", str(tiny_model), long_name],
                 ["finetune", "--data", long_name, "--model", TINY, "--out", str(tmp_path / "run")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert one_line_error(err) and len(err) < 3000, err[:300]
