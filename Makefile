# OCM: `make test` runs the suite (installing pytest into .venv if this Python lacks it);
# `make bench` measures OCM against direct and nginx (BENCH_ARGS=--quick for a short run).
PYTHON ?= python3
VENV   ?= .venv
TESTS  ?= test_ocm.py tests
TEST_DEPS = pytest

BENCH_ARGS ?=

.PHONY: test bench clean

# Use the interpreter's own pytest when it has one; otherwise a private venv.
test:
	@if $(PYTHON) -c "import pytest" 2>/dev/null; then \
		$(PYTHON) -m pytest -q $(TESTS); \
	else \
		[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV); \
		$(VENV)/bin/python -m pip install -q $(TEST_DEPS); \
		$(VENV)/bin/python -m pytest -q $(TESTS); \
	fi

# Standard library only; a measurement, not a test: it never fails on timing.
bench:
	$(PYTHON) bench/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache __pycache__
