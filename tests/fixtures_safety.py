"""Helpers shared by the hostile-input tests: a tiny model file, CLI commands run in a child whose
peak memory is measured, and decompression bombs built without compressing gigabytes."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
import textwrap
import zlib
from pathlib import Path

TINY = "R[1,1,1,1]x0.5"  # the released block layout at its smallest: a model file of a few MB

def tiny_model_file(path: Path, class_names: list[str]) -> Path:
    """A seeded random TINY model with a head for `class_names`, saved at `path` (32 px)."""
    import torch

    import bigtransfer

    torch.manual_seed(0)
    model = bigtransfer.create_model(TINY, num_classes=len(class_names))
    bigtransfer.save_checkpoint(model, path, class_names=class_names, resolution=32)
    return path


# Runs several CLI commands one after the other in one process and records, for each, its exit code,
# stdout, stderr, seconds, and the process's own peak RSS so far (VmHWM). The peak after a command
# bounds that command's own, so one child (one import of torch) checks several: an earlier command
# can only make a later one's reading higher, never hide its cost. The rusage of a child is no use:
# one forked from a large pytest process counts the parent's pages as its own.
MANY_COMMANDS = textwrap.dedent("""
    import contextlib, io, json, sys, time, traceback
    record, commands = sys.argv[1], json.loads(sys.argv[2])
    from bigtransfer.cli import main

    def peak_so_far():
        with open("/proc/self/status") as fh:
            return int(next(line.split()[1] for line in fh if line.startswith("VmHWM:"))) * 1024

    results = []
    for argv in commands:
        out, err, started = io.StringIO(), io.StringIO(), time.perf_counter()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(argv)
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        except BaseException:
            code, err = 99, io.StringIO(err.getvalue() + traceback.format_exc())
        results.append([code, out.getvalue(), err.getvalue(), time.perf_counter() - started, peak_so_far()])
    with open(record, "w") as fh:
        json.dump(results, fh)
""")


def run_cli_many(*commands, timeout: float = 300, env: dict | None = None, limits=None) -> list[tuple]:
    """Each `bigtransfer ARGV` of `commands`, in turn in one child process: for each, (exit code,
    stdout, stderr, seconds, the child's peak RSS in bytes so far). A child that died records
    nothing: the test fails."""
    argvs = [[str(a) for a in argv] for argv in commands]
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "record.json"
        result = subprocess.run([sys.executable, "-c", MANY_COMMANDS, str(record), json.dumps(argvs)],
                                capture_output=True, text=True, env={**os.environ, **(env or {})},
                                preexec_fn=limits, timeout=timeout, check=False)
        assert record.is_file(), f"the child died (exit {result.returncode}): {result.stderr[-3000:]}"
        return [tuple(r) for r in json.loads(record.read_text())]


# --------------------------------------------------------------------------- bombs
def deflated_zeros(prefix: bytes, zeros: int, block: int = 64 << 20) -> tuple[bytes, int]:
    """A raw deflate stream of `prefix` then `zeros` zero bytes, and the CRC-32 of all of it.

    Each full flush resets the compressor, so one compressed block of zeros stands for all the
    others: the stream costs one block's compression, not gigabytes' (the CRC is over every byte)."""
    count, rest = divmod(zeros, block)
    zero_block = bytes(block)
    compressor = zlib.compressobj(1, zlib.DEFLATED, -15)
    head = compressor.compress(prefix) + compressor.flush(zlib.Z_FULL_FLUSH)
    repeated = compressor.compress(zero_block) + compressor.flush(zlib.Z_FULL_FLUSH) if count else b""
    tail = compressor.compress(bytes(rest)) + compressor.flush()
    crc = zlib.crc32(prefix)
    for _ in range(count):
        crc = zlib.crc32(zero_block, crc)
    return head + repeated * count + tail, zlib.crc32(bytes(rest), crc)


def zip64_of_zeros(path: Path, name: str, header: bytes, zeros: int) -> Path:
    """A zip archive of one deflated member: `header` then `zeros` zero bytes, with zip64 sizes."""
    data, crc = deflated_zeros(header, zeros)
    size, raw_name = len(header) + zeros, name.encode()
    extra = struct.pack("<HHQQ", 1, 16, size, len(data))
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, 8, 0, 0, crc, 0xFFFFFFFF, 0xFFFFFFFF,
                        len(raw_name), len(extra)) + raw_name + extra
    central_extra = struct.pack("<HHQQQ", 1, 24, size, len(data), 0)
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 8, 0, 0, crc, 0xFFFFFFFF, 0xFFFFFFFF,
                          len(raw_name), len(central_extra), 0, 0, 0, 0, 0xFFFFFFFF) + raw_name + central_extra
    central_at = len(local) + len(data)
    zip64_end = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, 1, 1, len(central), central_at)
    locator = struct.pack("<IIQI", 0x07064B50, 0, central_at + len(central), 1)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), 0xFFFFFFFF, 0)
    path.write_bytes(local + data + central + zip64_end + locator + end)
    return path


def _tar_header(name: str, size: int) -> bytes:
    """A ustar header block for a regular file (size in the GNU base-256 form above 8 GiB - 1)."""
    fields = (name.encode().ljust(100, b"\0") + b"0000644\0" + b"0000000\0" + b"0000000\0"
              + b"%011o\0" % size + b"%011o\0" % 0 + b" " * 8 + b"0" + b"\0" * 100 + b"ustar\x0000")
    block = fields.ljust(512, b"\0")
    checksum = b"%06o\0 " % sum(block)
    return block[:148] + checksum + block[156:]


def tar_gz_of_zeros(path: Path, small: tuple[str, int], big: tuple[str, int]) -> Path:
    """A .tar.gz of two members of zeros, `small` then `big` (name, size): the big one last, so its
    gigabytes are one repeated deflate block."""
    (small_name, small_size), (big_name, big_size) = small, big
    prefix = (_tar_header(small_name, small_size) + bytes(-(-small_size // 512) * 512)
              + _tar_header(big_name, big_size))
    padding = -big_size % 512 + 1024  # to a whole block, then the two empty blocks that end a tar
    data, crc = deflated_zeros(prefix, big_size + padding)
    gzip_header = b"\x1f\x8b\x08\x00" + bytes(4) + b"\x00\xff"
    total = (len(prefix) + big_size + padding) & 0xFFFFFFFF
    path.write_bytes(gzip_header + data + struct.pack("<II", crc, total))
    return path
