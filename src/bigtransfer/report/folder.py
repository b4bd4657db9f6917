"""A protocol's output folder: its protocol.json (what was asked), read and claimed, and the tolerant
readers every protocol's report uses on the results files its runs left there."""

from __future__ import annotations

import functools
import json
import statistics
from pathlib import Path

from .. import rundir
from ..atomic import csv_writer, write_json, write_together
from ..errors import BigTransferError
from ..safe_text import load_json
from .pages import page

PROTOCOL_FILE = "protocol.json"


def read_json(path: Path):
    """A results file's JSON; one clear error if it was damaged or edited into something else."""
    try:
        return load_json(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise BigTransferError(f"{path}: not a readable JSON file ({err})") from None


def tolerant(fn):
    """Results files can be edited by hand: a missing field or a value of the wrong type becomes one
    clear error naming the folder, not a traceback."""
    @functools.wraps(fn)
    def wrapper(out, *args, **kwargs):
        try:
            return fn(out, *args, **kwargs)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
            raise BigTransferError(f"{out}: a results file there is damaged or was edited "
                                   f"({type(err).__name__}: {err}); re-run the command that wrote it") from None
    return wrapper


def spread(values: list[float]) -> dict:
    """min <- median -> max of a list of accuracies (the release's few-shot summary)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def read_protocol(out: Path) -> dict:
    """OUT's protocol.json, which must name its protocol; one clear error otherwise."""
    path = Path(out) / PROTOCOL_FILE
    if not path.is_file():
        raise BigTransferError(f"{out}: not a protocol output directory (no {PROTOCOL_FILE})")
    protocol = read_json(path)
    if not isinstance(protocol, dict) or not isinstance(protocol.get("protocol"), str):
        raise BigTransferError(f"{path}: not a bigtransfer protocol file")
    return protocol


def claim_out(out: Path, settings: dict) -> None:
    """Create OUT with its protocol.json, or check that OUT holds the same protocol run.

    OUT must be new, empty or one of our `settings["protocol"]` folders (rundir.claim)."""
    rundir.check_claim(out, settings["protocol"])
    path = out / PROTOCOL_FILE
    if path.is_file():
        previous = read_protocol(out)
        recorded = {k: previous.get(k) for k in settings}
        if json.loads(json.dumps(recorded)) != json.loads(json.dumps(settings, default=str)):
            changed = sorted(k for k in settings if json.dumps(previous.get(k), default=str)
                             != json.dumps(settings[k], default=str))
            raise BigTransferError(f"--out {out} holds a {settings['protocol']} run with other settings "
                                   f"({', '.join(changed)}); use another --out to start a new one")
    rundir.claim(out, settings["protocol"])
    write_json(path, settings)


def write_results(out: Path, results: dict, header: list[str], rows: list[list], title: str,
                  sections: list[tuple[str, str]]) -> Path:
    """A protocol's results files, replaced together: results.json (`results`), results.csv (`header`,
    `rows`) and report.html (`sections` under `title`); returns the page's path."""
    out = Path(out)
    as_json = (json.dumps(results, indent=2, default=str) + "\n").encode("utf-8")
    as_html = page(title, sections).encode("utf-8")
    write_together({out / "results.json": lambda fh: fh.write(as_json), out / "results.csv": csv_writer(header, rows),
                    out / "report.html": lambda fh: fh.write(as_html)}, what="report")
    return out / "report.html"
