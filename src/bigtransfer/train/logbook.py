"""Where a run's numbers go: metrics.jsonl (one JSON object per line) and TensorBoard."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..atomic import RESUME_HINT, write_text
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
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            _truncate_after(run_dir / "metrics.jsonl", resume_step)
        # Line-buffered, kept open for the run's life (closed in close()): every line survives a kill.
        self._file = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step or None)

    def log(self, step: int, kind: str, **values: float) -> None:
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, "time": round(time.time(), 3), **values}
        try:
            self._file.write(json.dumps(record) + "\n")
        except OSError as err:  # a full disk: stop with the reason; the last checkpoint stays resumable
            raise BigTransferError(f"{self._file.name}: cannot write metrics ({err.strerror}); {RESUME_HINT}") from None
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._writer is not None:
            self._writer.close()


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
