# Two set-up commands: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BASE := $(VENV)/.installed-base
TESTS := $(VENV)/.installed-test

.PHONY: test test-fast test-durations demo bench clean

$(BASE): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(BASE)

$(TESTS): $(BASE)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(TESTS)

# Two passes. First every other test, one pytest worker per core (pytest-xdist; WORKERS=0 runs
# them in this process). Then the tests marked one_at_a_time (the largest released architectures,
# several GB each) in one process, one after another, so their memory never adds up.
# pytest exits 5 when it collects nothing: for the first pass that is a broken suite, not a pass;
# the second may rightly select nothing (make test-fast skips every slow test).
WORKERS ?= auto
MARKS ?=
test: $(TESTS)
	@$(PY) -m pytest tests -n $(WORKERS) -m "not one_at_a_time$(if $(MARKS), and ($(MARKS)))" $(PYTEST_ARGS); first=$$?; \
	if [ -n "$(SKIP_ONE_AT_A_TIME)" ]; then second=5; else \
	$(PY) -m pytest tests -n 0 -m "one_at_a_time$(if $(MARKS), and ($(MARKS)))" $(PYTEST_ARGS); second=$$?; fi; \
	if [ $$first -eq 5 ]; then echo "make test: pytest collected no tests; failing"; exit 1; fi; \
	if [ $$second -eq 5 ]; then second=0; fi; \
	if [ $$first -ne 0 ]; then exit $$first; fi; \
	exit $$second

# The offline end-to-end demo: pre-train on procedural glyphs, transfer to real digits.
demo: $(BASE)
	$(VENV)/bin/bigtransfer demo --out runs/demo

# Every one_at_a_time test is slow: test-fast does not start the second pass at all.
test-fast: $(TESTS)
	$(MAKE) test MARKS='not slow' SKIP_ONE_AT_A_TIME=1

# tests/durations.json: each test's seconds as `make test` runs it; a test over a second is
# `slow` (tests/durations.py). Measure again after adding or changing long tests; the file only
# changes when the run passes.
test-durations: $(TESTS)
	$(MAKE) test PYTEST_ARGS='--record-durations'

bench: $(BASE)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/forward_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
