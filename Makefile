# Thin wrappers a newcomer can read. Every target builds its own virtualenv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv test test-fast lint imports local-start bench bench-full chaos clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## The whole test suite: SQLite always, MariaDB/MySQL when BUILDQ_TEST_MYSQL_URL is set.
test: $(STAMP)
	$(BIN)/pytest -q $(PYTEST_ARGS)

## Everything except the slow system tests.
test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check buildq tests bench
	$(BIN)/ruff format --check buildq tests bench
	$(BIN)/mypy

## The import graph, its cycles and the largest modules; fails if a layering rule is broken.
imports:
	$(PYTHON) scripts/imports.py

## The whole thing on one machine: SQLite, the daemon, demo builds in a live view.
local-start: $(STAMP)
	$(BIN)/python -m buildq.demo --config config/buildq.toml

bench: $(STAMP)
	$(BIN)/python -m bench --profile quick

bench-full: $(STAMP)
	$(BIN)/python -m bench --profile full

chaos: $(STAMP)
	$(BIN)/python -m tests.system.chaos.run --full

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
