"""`bigtransfer <verb>`: argument parsing and output only; the work lives in the library.

One module per family of verbs (weights, training, using, protocols, data, detection), each
with its `VERBS`: adding a verb touches its family's module alone. `common.py` holds what several
verbs share. Nothing is imported from the library until a verb runs, so `--help` is instant.

Exit codes: 0 success, 2 bad arguments or bad input (one line naming the file or flag),
1 internal failure (with a traceback, because that is a bug), 130 interrupted, 141 when the
reader of our output went away (`bigtransfer models | head -1`), which ends quietly as `ls` does.
Errors and warnings are one printable line of bounded length (safe_text.line), whatever they
quote; before a verb runs, its outputs are checked apart from its inputs (overlap.py).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import warnings
from collections.abc import Sequence

from ..errors import BigTransferError, BigTransferWarning
from ..safe_text import line as one_line
from ..safe_text import path_text
from . import data, detection, protocols, training, using, weights
from .common import PATH_ROLES, READS_IMAGES

EXIT_USAGE = 2
# What only a name the user gave can cause, wherever a path is first looked at: one line, not a traceback.
USER_PATH_ERRORS = (errno.ENAMETOOLONG, errno.ELOOP)
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for `ls | head -1`
FAMILIES = (weights, training, using, protocols, data, detection)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bigtransfer",
        description="Big Transfer (BiT) in PyTorch: models, weights, fine-tuning, evaluation.",
        epilog="examples:\n  bigtransfer models\n  bigtransfer download BiT-M-R50x1\n"
               "run `bigtransfer VERB --help` for a verb's options and examples",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for family in FAMILIES:
        for add in family.VERBS:
            add(sub)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Our warnings (skipped images, ...) as one line a user reads as a warning, not a crash."""
    if issubclass(category, BigTransferWarning):
        print(f"bigtransfer: warning: {one_line(str(message))}", file=file or sys.stderr, flush=True)
    else:
        _default_show_warning(message, category, filename, lineno, file, line)


_default_show_warning = warnings.showwarning


def _image_limit(max_pixels: int | None) -> None:
    """Our pixel limit decides (data/images.py): Pillow's own, lower one neither warns (a warning
    that reads like a crash) nor refuses what --max-pixels allows."""
    from PIL import Image

    from ..data.images import MAX_PIXELS_ENV
    from ..data.images import max_pixels as default_limit

    if max_pixels:
        os.environ[MAX_PIXELS_ENV] = str(max_pixels)  # loader processes inherit it
    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, max_pixels or default_limit())
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _flag(name: str) -> str:
    """How --help names an argument: --out, or a positional's metavar (SOURCE, RUN_DIR, ...)."""
    return name.upper() if name in ("images", "source", "dest", "run_dir") else "--" + name.replace("_", "-")


def _check_paths_apart(args: argparse.Namespace) -> None:
    """A verb's outputs may not overlap its inputs (see bigtransfer.overlap); checked before it runs."""
    if args.verb not in PATH_ROLES:
        return
    from .overlap import Named, check_apart, existing_paths

    writes, scanned, read = PATH_ROLES[args.verb]
    outputs = []
    for name in writes:
        if name == "ROOT/TASK":
            outputs.append(Named("--root/--task", args.root / args.task))
        elif getattr(args, name.split(".")[0]) is not None:
            stem, _, suffix = name.partition(".")
            path = getattr(args, stem)
            outputs.append(Named(_flag(stem), path.with_suffix("." + suffix) if suffix else path))

    def inputs(names):
        return [found for name in names
                for found in existing_paths(_flag(name.rstrip("*")), getattr(args, name.rstrip("*")),
                                            listed=name.endswith("*"))]

    check_apart(outputs, inputs(scanned), inputs(read))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verb in READS_IMAGES:
        _image_limit(args.max_pixels)
    for stream in (sys.stdout, sys.stderr):  # a name that is not UTF-8 is printed escaped, never a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    previous, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        _check_paths_apart(args)
        code = args.run(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except BigTransferError as err:
        print(f"bigtransfer: error: {one_line(str(err))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("bigtransfer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Nobody reads any more: stop quietly, and keep Python from complaining when it flushes at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as err:  # after BrokenPipeError, one of its kind
        if err.errno not in USER_PATH_ERRORS:
            raise
        print(f"bigtransfer: error: {one_line(path_text(err.filename or '?'))}: {err.strerror}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        warnings.showwarning = previous
