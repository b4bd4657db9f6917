"""The measured durations that mark tests slow (tests/durations.py)."""

import json

import durations


class Item:
    def __init__(self, nodeid):
        self.nodeid, self.marks = nodeid, []

    def add_marker(self, mark):
        self.marks.append(mark.name)


def test_tests_measured_over_a_second_are_slow_and_the_order_stays(tmp_path, monkeypatch):
    file = tmp_path / "durations.json"
    file.write_text(json.dumps({"a": 0.2, "b": 30.0, "c": 1.0, "d": 1.01}))
    monkeypatch.setattr(durations, "FILE", file)
    items = [Item(name) for name in "abcde"]  # e: new, not measured yet
    durations.mark_slow(items)
    assert [item.nodeid for item in items] == list("abcde")
    assert {item.nodeid for item in items if "slow" in item.marks} == {"b", "d"}


def test_every_measured_test_still_exists():
    """A renamed or deleted test leaves a stale line behind: measure again (make test-durations)."""
    measured = durations.measured()
    assert measured, "tests/durations.json is missing or empty"
    root = durations.FILE.parent.parent
    for nodeid in measured:
        path, name = nodeid.split("::")[:2]
        source = root / path
        assert source.is_file() and f"def {name.split('[')[0]}(" in source.read_text(), nodeid
