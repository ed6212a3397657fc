# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test test-e2e test-all test-fast bench venv clean cluster-up cluster-down

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q uv==0.13.9

# Installs go through constraints.txt: the exact versions the tests ran with, so a new release of a dependency
# cannot change a first run behind the tests' back. uv installs them (about 55 s on 2 cores where pip takes about
# 2 min), from the sources pip is configured with (tools/uv_sources.py), compiling the bytecode as pip would.
UV_INSTALL = $(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python $(shell $(BIN)/python tools/uv_sources.py)

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(UV_INSTALL) -c constraints.txt -e .
	touch $@

$(TEST_STAMP): $(STAMP)
	$(UV_INSTALL) -c constraints.txt -e '.[test]'
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/gan-ray demo

# The suite a contributor runs before every commit (<= 15 minutes on 2 cores): every claim checked end to end once.
test: $(TEST_STAMP)
	$(BIN)/python -m pytest tests -m "not e2e"

# The rest of the end-to-end matrix (variations of what `make test` already checks once); CI runs both.
test-e2e: $(TEST_STAMP)
	$(BIN)/python -m pytest tests -m e2e

test-all: test test-e2e

# No Ray, no training runs: a minute or two.
test-fast: $(TEST_STAMP)
	$(BIN)/python -m pytest tests -m "not slow and not e2e"

bench: $(STAMP)
	$(BIN)/gan-ray bench

clean:
	rm -rf runs demo .pytest_cache

# A real multi-node Ray cluster on this machine (head + worker node), for `gan-ray submit` against it.
cluster-up: $(STAMP)
	cluster/local.sh up

cluster-down:
	cluster/local.sh down
