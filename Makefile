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

.PHONY: install serve test lint bench clean redis-server proto

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
test: install lint redis-server
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

## The tests start a real redis-server (the shared cache store): installed with apt where it is missing
## (as root, or with password-less sudo); otherwise `make test` stops and says how, rather than skip them.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO="sudo -n"; \
	  if command -v apt-get >/dev/null 2>&1 && $$SUDO true 2>/dev/null; then \
	    echo "installing redis-server (the tests start one)"; \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server >/dev/null; \
	  else \
	    echo "make test needs redis-server on PATH (the Redis cache tests start one):" >&2; \
	    echo "  sudo apt-get install redis-server   (Debian/Ubuntu), or: brew install redis" >&2; \
	    exit 1; \
	  fi; }

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy src

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/worker.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/gateway.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/scaling.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/grpc_bench.py

## Regenerate the gRPC modules (committed, so users need no protoc) from src/embedfleet/grpc/proto/*.proto.
proto: install
	$(BIN)/python -m grpc_tools.protoc -I src --python_out=src --pyi_out=src --grpc_python_out=src \
	    src/embedfleet/grpc/proto/tei.proto src/embedfleet/grpc/proto/tei_multiplexer.proto

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
