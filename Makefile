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

.PHONY: install serve test lint bench clean debian-packages redis-server proto

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
test: install lint debian-packages
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

## Debian packages the tests use for real: redis-server (the Redis cache tests start one), nginx and
## docker-compose (the `embedfleet deploy` tests run `nginx -t`, nginx itself, and `docker-compose config -q`,
## which validates without a Docker engine), chromium (the code-search UI test). Installed with apt where missing (as root, or with password-less
## sudo), without recommends (docker-compose would pull the Docker engine); otherwise `make test` stops and
## says how, rather than skip them.
DEBIAN_PACKAGES := redis-server:redis-server nginx:nginx docker-compose:docker-compose chromium:chromium

debian-packages:
	@missing=""; for pair in $(DEBIAN_PACKAGES); do \
	  command -v "$${pair%%:*}" >/dev/null 2>&1 || PATH="$$PATH:/usr/sbin:/sbin" command -v "$${pair%%:*}" >/dev/null 2>&1 \
	    || missing="$$missing $${pair#*:}"; done; \
	[ -z "$$missing" ] || { \
	  SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO="sudo -n"; \
	  if command -v apt-get >/dev/null 2>&1 && $$SUDO true 2>/dev/null; then \
	    echo "installing$$missing (the tests start them)"; \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	      --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "make test needs these Debian packages:$$missing" >&2; \
	    echo "  sudo apt-get install$$missing   (Debian/Ubuntu)" >&2; \
	    exit 1; \
	  fi; }

# The former name of debian-packages.
redis-server: debian-packages

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
