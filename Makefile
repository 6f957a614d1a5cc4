# Skiff: `make serve` runs the server, `make test` runs the test suite. Both set up .venv first if needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: setup test test-gpu serve bench clean

$(BIN)/python:
	$(MAKE) setup

# torch: a machine with a CUDA GPU keeps (or gets) its CUDA build; a CPU-only machine gets the
# local CPU wheel of torch 2.13.0 (any other spec pulls several GB of CUDA packages).
setup:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA GPU found: installing the default (CUDA) torch"; $(BIN)/pip install -q torch; \
	else \
		echo "no CUDA GPU: installing the CPU build torch==2.13.0"; $(BIN)/pip install -q torch==2.13.0; \
	fi
	$(BIN)/pip install -q -e ".[dev]"

test: $(BIN)/python
	$(BIN)/python -m pytest -q -x tests $(ARGS)

test-gpu: $(BIN)/python
	$(BIN)/python -m pytest -q -m gpu tests $(ARGS)

serve: $(BIN)/python
	$(BIN)/python -m server $(ARGS)

bench: $(BIN)/python
	$(BIN)/python -m server.bench $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
