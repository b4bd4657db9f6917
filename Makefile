# Two set-up commands: `make test` and (later) `make demo`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# pytest exits 5 when it collects nothing: that is a broken suite, not a pass.
test: $(STAMP)
	@$(PY) -m pytest tests $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests; failing"; exit 1; fi; \
	exit $$rc

test-fast: $(STAMP)
	$(MAKE) test PYTEST_ARGS='-m "not slow"'

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/forward_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
