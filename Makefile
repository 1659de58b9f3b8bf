# The commands users type. `serve` and `test` run `install` first (it is idempotent);
# `test-fast` runs it when the sources it builds from changed.
VENV    ?= .venv
PY      := $(VENV)/bin/python
MODEL   ?=
HOST    ?= 127.0.0.1
PORT    ?= 8000
ARGS    ?=
# KV-cache memory in GiB for the CPU backend (vLLM's NUMA memory check needs it set).
export VLLM_CPU_KVCACHE_SPACE ?= 2
export HF_HUB_OFFLINE ?= 1

.PHONY: install serve test test-fast lint

install:
	bash scripts/install_cpu.sh

# `make serve` serves the bundled SmolLM2-135M-Instruct; `MODEL=/path make serve` another
# model; extra vLLM flags go in ARGS, e.g. `make serve ARGS="--kv-policy crystal"`.
serve: install
	@model="$(MODEL)"; \
	if [ -z "$$model" ]; then model=$$($(PY) -m crystal_vllm prepare-model smollm2 | tail -n 1); fi; \
	echo "serving $$model on http://$(HOST):$(PORT)"; \
	exec $(VENV)/bin/vllm serve "$$model" --host $(HOST) --port $(PORT) --enforce-eager $(ARGS)

# Everything, engine and server tests included (the command CI runs, ~50 minutes here).
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

# The tests not marked `slow` (no vLLM engine, server or child process): ~2 minutes here.
# It runs `install` only when the sources it builds from changed since the last install
# (the stamp and hash of scripts/install_cpu.sh; keep the two in step): an up-to-date
# install still spends about a minute importing vLLM to check itself.
INSTALL_STAMP := $(VENV)/.crystal-vllm-install
SOURCES_HASH   = cat pyproject.toml setup.py csrc/*.cpp csrc/*.h | sha256sum | cut -d' ' -f1
test-fast:
	@if [ ! -x "$(PY)" ] || [ "$$(cat $(INSTALL_STAMP) 2>/dev/null)" != "$$($(SOURCES_HASH))" ]; \
	then $(MAKE) install; else echo "[test-fast] install is up to date"; fi
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow" tests

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
