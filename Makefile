# Two set-up commands: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BASE := $(VENV)/.installed-base
TESTS := $(VENV)/.installed-test

.PHONY: test test-fast demo bench clean

$(BASE): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(BASE)

$(TESTS): $(BASE)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(TESTS)

# One pytest worker per core (pytest-xdist); WORKERS=0 runs everything in one process.
WORKERS ?= auto
# pytest exits 5 when it collects nothing: that is a broken suite, not a pass.
test: $(TESTS)
	@$(PY) -m pytest tests -n $(WORKERS) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests; failing"; exit 1; fi; \
	exit $$rc

# The offline end-to-end demo: pre-train on procedural glyphs, transfer to real digits.
demo: $(BASE)
	$(VENV)/bin/bigtransfer demo --out runs/demo

test-fast: $(TESTS)
	$(MAKE) test PYTEST_ARGS='-m "not slow"'

bench: $(BASE)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/forward_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
