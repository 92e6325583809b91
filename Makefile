# linewatch: every target installs what it needs itself (venv + pip), from nothing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: all venv demo test test-slow test-unit test-integration lint stack-up stack-status stack-down bench clean

all: test

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (need Python 3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -e '.[dev]'
	@# kustomize renderer for the offline manifest tests (kubectl's built-in kustomize is enough)
	@command -v kubectl >/dev/null || command -v kustomize >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client; }
	@# headless browser for the console's browser test (Selenium drives Debian's chromium + chromedriver)
	@{ command -v chromium >/dev/null && command -v chromedriver >/dev/null; } || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }
	@# promtool: checks and unit-tests k8s/monitoring's alert rules (tests/unit/test_console.py)
	@command -v promtool >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }
	@touch $(STAMP)

venv: $(STAMP)

## The main job: embedded Kafka broker + Triton, train/export a bottle model if needed, stream the test set.
demo: $(STAMP)
	$(VENV)/bin/linewatch demo

## The full test suite: import boundaries, then unit + integration against the real Tansu broker and tritonserver.
## TEST_WORKERS pytest processes (pytest-xdist) take one test module at a time (--dist loadfile: a module's
## stack and fixtures stay in one process); the integration tests spend much of their time waiting on real
## traffic, so two processes on two cores overlap that waiting with the CPU-bound unit tests.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadfile tests

## The same suite on one CPU (taskset: the tests and every process they start share CPU 0), as on a slower
## or busier machine than this one: nothing may depend on how fast the machine is.
test-slow: $(STAMP)
	taskset -c 0 $(VENV)/bin/lint-imports
	taskset -c 0 $(VENV)/bin/pytest tests

test-unit: $(STAMP)
	$(VENV)/bin/pytest tests -m "not integration"

test-integration: $(STAMP)
	$(VENV)/bin/pytest tests -m integration

lint: $(STAMP)
	$(VENV)/bin/ruff check contracts stream models devstack tests benchmarks
	$(VENV)/bin/lint-imports

stack-up: $(STAMP)
	$(VENV)/bin/linewatch stack up
stack-status: $(STAMP)
	$(VENV)/bin/linewatch stack status
stack-down: $(STAMP)
	$(VENV)/bin/linewatch stack down

clean:
	rm -rf $(VENV) .stack .pytest_cache .ruff_cache *.egg-info
