"""Each test's measured seconds (tests/durations.json): what makes a test `slow`, and the order tests start in.

`make test-durations` measures them as `make test` runs (two workers on the 2-core machine) and
writes the file. A test measured over SLOW_SECONDS is marked `slow`, so `make test-fast` leaves it
out; a test missing from the file (a new one) counts as fast until the file is measured again.
Tests measured over FIRST_SECONDS start first, longest first, so that no worker is still busy with
one long test after the others have run out of work; all other tests keep their collected order.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

FILE = Path(__file__).with_name("durations.json")
SLOW_SECONDS = 1.0
FIRST_SECONDS = 5.0


def measured() -> dict[str, float]:
    return json.loads(FILE.read_text()) if FILE.is_file() else {}


def mark_and_order(items: list) -> None:
    seconds = measured()
    for item in items:
        if seconds.get(item.nodeid, 0.0) > SLOW_SECONDS:
            item.add_marker(pytest.mark.slow)
    first = sorted((item for item in items if seconds.get(item.nodeid, 0.0) > FIRST_SECONDS),
                   key=lambda item: -seconds[item.nodeid])
    rest = [item for item in items if seconds.get(item.nodeid, 0.0) <= FIRST_SECONDS]
    items[:] = first + rest


class Recorder:
    """Sums setup, call and teardown seconds per test (in xdist's controller, the workers' reports),
    and merges them into the file at the end of a run that passed."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def pytest_runtest_logreport(self, report):
        self.seconds[report.nodeid] = self.seconds.get(report.nodeid, 0.0) + report.duration

    def pytest_sessionfinish(self, session, exitstatus):
        if exitstatus != 0 or not self.seconds:
            return
        merged = {**measured(), **{k: round(v, 2) for k, v in self.seconds.items()}}
        temporary = FILE.with_name(FILE.name + ".tmp")
        temporary.write_text(json.dumps(dict(sorted(merged.items())), indent=0) + "\n")
        temporary.replace(FILE)
