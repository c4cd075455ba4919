# Every target creates the virtualenv and installs the project into it first, so a fresh
# clone needs nothing but Python 3.11 (and Node.js with npm for `make test`, whose Node
# SDK test installs the `openai` package in tests/node): `make run`, `make test`,
# `make lint`, `make bench`, `make soak`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= config/berry.yaml
STAMP := $(VENV)/.installed
# The Node `openai` package the Node SDK test runs (tests/node, from its lock file).
NODE_STAMP := tests/node/node_modules/.installed

.PHONY: run test lint bench soak check-config clean

$(STAMP): setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(NODE_STAMP): tests/node/package.json tests/node/package-lock.json
	cd tests/node && npm ci --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

run: $(STAMP)
	$(BIN)/berry-proxy serve --config $(CONFIG)

check-config: $(STAMP)
	$(BIN)/berry-proxy check-config --config $(CONFIG)

test: $(STAMP) $(NODE_STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check berry_proxy tests bench
	$(BIN)/ruff format --check berry_proxy tests bench
	$(BIN)/mypy berry_proxy tests bench

bench: $(STAMP)
	$(BIN)/python bench/run.py

# Mixed traffic, a flaky backend and a reload every minute for 10 minutes (bench/soak.py);
# shorter: make soak SOAK_ARGS="--minutes 2".
SOAK_ARGS ?=
soak: $(STAMP)
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .mypy_cache .ruff_cache .pytest_cache
