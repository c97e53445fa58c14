# One way to run each thing. `make demo` and `make test` create .venv when it is missing.
VENV ?= .venv
PYTHON ?= python3
# torch first and pinned: on this project's machines 2.13.0 is a local CPU build; set
# TORCH=torch (or a CUDA wheel spec) on a GPU box.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.skufleet-installed

.PHONY: install demo lint check test gpu-wheels clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet '$(TORCH)'
	$(BIN)/python -m pip install --quiet -e '.[dev,demo]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/skufleet demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# the fast tier, while working: no Redis, PostgreSQL or S3 needed
check: lint
	$(BIN)/python -m pytest -m "not services" -q -n 4

# everything, against real services; 8 processes, since most tests wait on workers and servers
test: lint
	$(BIN)/python -m pytest -n 8 --dist worksteal

# Wheels that bench/gpu.py needs on a GPU machine with only torch and transformers
# (pure-Python, for its Python 3.12); bench/gpu-device.sh installs them there.
gpu-wheels: $(STAMP)
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 -d .whl \
	  "diffusers==$$($(BIN)/python -c 'import diffusers; print(diffusers.__version__)')" \
	  "importlib_metadata==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("importlib_metadata"))')"

clean:
	rm -rf $(VENV) skufleet-demo .pytest_cache .ruff_cache .mypy_cache
