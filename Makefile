# Two commands on a fresh machine: `make serve` and `make test`. Both create .venv and install.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8080
MODEL ?= default
PYTEST_ARGS ?=

export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := true

.PHONY: install serve test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, exactly pinned: pip then keeps it and never pulls a newer (multi-GB) build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Run everything: the gateway on port 8080 and one worker per GPU (or per CPU core) of MODEL.
serve: install
	$(BIN)/embedfleet serve --model $(MODEL) --host $(HOST) --port $(PORT)

## Lint, type-check and run the whole test suite (slow integration tests included).
test: install lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy src

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/worker.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/gateway.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/scaling.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
