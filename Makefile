# One way to run each thing. `make demo` and `make test` create .venv when it is missing.
VENV ?= .venv
PYTHON ?= python3
# torch first and pinned: on this project's machines 2.13.0 is a local CPU build; set
# TORCH=torch (or a CUDA wheel spec) on a GPU box.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.skufleet-installed

.PHONY: install demo test clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet '$(TORCH)'
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/skufleet demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) skufleet-demo .pytest_cache .ruff_cache .mypy_cache
