# One command to set up and run the demo, one to set up and run the tests (see README).
#   make demo | make test
# GPU machine: make test TORCH_SPEC=torch TORCH_INDEX=https://download.pytorch.org/whl/cu126
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.medseg-installed

.PHONY: setup test test-fast lint demo clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(BIN)/ruff check medseg pipelines tests benchmarks
	$(BIN)/ruff format --check medseg pipelines tests benchmarks

# Two pytest workers (pytest-xdist), one test file per worker at a time: the suite is mostly subprocesses,
# servers and I/O, so on 2 cores it takes ~6.5 min instead of ~10 (no test is timed, so sharing is safe).
test: lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# The everyday lane: no training, no wheel, no CLI subprocesses (~1 min on 2 cores); CI runs `make test`.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

demo: setup
	$(BIN)/medseg demo --out demo_out

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache
