# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test test-e2e test-all test-fast bench venv clean cluster-up cluster-down

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Installs go through constraints.txt: the exact versions the tests ran with, so a new release of a dependency
# cannot change a first run behind the tests' back.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q -c constraints.txt -e .
	touch $@

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
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
