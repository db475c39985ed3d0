# medseg: `make demo` (install + demo) and `make test` (install + tests). Nothing else is needed.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medseg-installed
# Type-checked packages (settings in pyproject.toml, [tool.mypy]).
MYPY := $(BIN)/mypy medseg/core medseg/io medseg/inference server

.PHONY: install demo test test-all lint format clean

# torch first and alone (the local CPU wheel), then the project with a constraints file pinning it.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[demo,dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/medseg demo --force

test: $(STAMP)
	$(BIN)/ruff check .
	$(MYPY)
	$(BIN)/pytest -m "not slow"

test-all: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(MYPY)

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache
