# OCM: `make demo` runs OCM in front of a fake ChatGPT backend (no account
# needed) and prints the Codex command to try it; `make test` runs the suite
# (installing pytest and hypothesis into .venv if this Python lacks them);
# `make test-all` runs it on every Python 3.8 to 3.13 found here (a .venv-3.X
# each); `make fuzz` runs the fuzz tests much longer;
# `make bench` measures OCM against direct and nginx (BENCH_ARGS=--quick for a short run).
PYTHON ?= python3
VENV   ?= .venv
TESTS  ?= test_ocm.py tests
TEST_DEPS = pytest hypothesis
BENCH_ARGS ?=

.PHONY: demo test test-all fuzz bench clean

# A fake ChatGPT backend with canned answers, OCM in front of it, and the Codex
# command to run against them; Ctrl-C stops everything and removes its files.
demo:
	@$(PYTHON) contrib/demo_backend.py --demo

# Use the interpreter's own pytest when it has one; otherwise a private venv.
test:
	@if $(PYTHON) -c "import pytest, hypothesis" 2>/dev/null; then \
		$(PYTHON) -m pytest -q $(TESTS); \
	else \
		[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV); \
		$(VENV)/bin/python -m pip install -q $(TEST_DEPS); \
		$(VENV)/bin/python -m pytest -q $(TESTS); \
	fi

# The promise is Python 3.8 to 3.13: the same suite on each one found (pyenv or
# PATH). With CI set, a missing version is a failure too.
test-all:
	@$(PYTHON) .ci/test-all $(TESTS)

# The property tests with many more examples (OCM_FUZZ_EXAMPLES, default 2000 each).
fuzz:
	@OCM_FUZZ_EXAMPLES=$${OCM_FUZZ_EXAMPLES:-2000} $(MAKE) --no-print-directory test TESTS="tests/test_hardening.py -k Fuzz"

# Standard library only; a measurement, not a test: it never fails on timing.
bench:
	$(PYTHON) bench/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .venv-3.* .pytest_cache __pycache__
