"""Each test's measured seconds (tests/durations.json): what makes a test `slow`.

`make test-durations` measures them as `make test` runs (two workers on the 2-core machine) and
writes the file. A test measured over SLOW_SECONDS is marked `slow`, so `make test-fast` leaves it
out; a test missing from the file (a new one) counts as fast until the file is measured again.

The order stays as collected. Starting the longest tests first was tried and made `make test`
slower (pass 1: 14 min 24 s against 9 min 42 s): pytest-xdist's load scheduling hands each worker
a block of consecutive tests, so one worker got all the long ones and the other ran dry.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

FILE = Path(__file__).with_name("durations.json")
SLOW_SECONDS = 1.0


def measured() -> dict[str, float]:
    return json.loads(FILE.read_text()) if FILE.is_file() else {}


def mark_slow(items: list) -> None:
    seconds = measured()
    for item in items:
        if seconds.get(item.nodeid, 0.0) > SLOW_SECONDS:
            item.add_marker(pytest.mark.slow)


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
