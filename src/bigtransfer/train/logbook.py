"""Where a run's numbers go: metrics.jsonl (one JSON object per line) and TensorBoard.

Both are append-only logs, so neither can be written whole and renamed. metrics.jsonl is
opened without following a link (a plain file of ours) and line-buffered: a full disk or a kill
leaves at most half a last line, which readers drop and a resumed run removes (the file is then
rewritten whole, atomically). TensorBoard's event file is created by TensorBoard's own writer,
in a `tensorboard/` folder we made and checked, under a name with 64 random bits in it (no link
can have been planted there in advance); a write it fails stops the run with one line, like a
failed metrics line. Each event file is recorded as ours for --restart.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from pathlib import Path

from ..atomic import RESUME_HINT, make_folder, open_append, open_folder, write_text
from ..errors import BigTransferError
from ..safe_text import load_json


class Logbook:
    """Append-only metrics for one run; a no-op on non-main processes."""

    def __init__(self, run_dir: Path | None, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None):
        """`resume_step`: the run restarts after that step; anything logged later is dropped
        (a killed run may have logged steps past its last checkpoint)."""
        self.enabled = enabled and run_dir is not None
        self._file = None
        self._writer = None
        if not self.enabled:
            return
        if resume_step is not None:
            _truncate_after(run_dir / "metrics.jsonl", resume_step)
        # Line-buffered, kept open for the run's life (closed in close()): every line survives a kill.
        self._path = run_dir / "metrics.jsonl"
        self._file = open_append(self._path, what="metrics file")
        if tensorboard:
            self._writer = _tensorboard(run_dir / "tensorboard", resume_step)

    def log(self, step: int, kind: str, **values: float) -> None:
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, "time": round(time.time(), 3), **values}
        try:
            self._file.write(json.dumps(record) + "\n")
        except OSError as err:  # a full disk: stop with the reason; the last checkpoint stays resumable
            raise BigTransferError(f"{self._path}: cannot write metrics ({err.strerror}); {RESUME_HINT}") from None
        if self._writer is not None:
            try:
                for key, value in values.items():
                    if isinstance(value, (int, float)):
                        self._writer.add_scalar(f"{kind}/{key}", value, step)
            except OSError as err:  # raised by TensorBoard's writer thread: the disk it writes to failed
                raise BigTransferError(f"{self._writer.log_dir}: cannot write TensorBoard events "
                                       f"({err.strerror or err}); {RESUME_HINT}") from None

    def close(self) -> None:
        """Close both logs. A failure here (a full disk) is not raised: it would hide the error
        that stopped the run, and every line that matters was already written or refused."""
        for log in (self._file, self._writer):
            if log is not None:
                with contextlib.suppress(OSError):
                    log.close()


def _tensorboard(folder: Path, resume_step: int | None):
    """A SummaryWriter whose event file is new, unguessable, in a folder of ours, and recorded."""
    from torch.utils.tensorboard import SummaryWriter

    make_folder(folder)
    suffix = f".{secrets.token_hex(8)}"
    writer = SummaryWriter(str(folder), purge_step=resume_step or None, filename_suffix=suffix)
    with open_folder(folder) as opened:
        for entry in opened.entries():
            if entry.name.endswith(suffix):
                opened.record(entry.name)
    return writer


def _records(path: Path) -> list[dict]:
    """The records of a metrics file; a line that is not a record (half written when the process
    was killed, or edited by hand) is dropped."""
    records = []
    with open(path, errors="replace") as fh:
        for line in fh:
            try:
                record = load_json(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
    return records


def _truncate_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    kept = [r for r in _records(path) if r["step"] <= step]
    write_text(path, "".join(json.dumps(r) + "\n" for r in kept), what="metrics file")


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return _records(path) if path.is_file() else []
