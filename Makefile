# The commands users type. `serve` and `test` run `install` first (it is idempotent).
VENV    ?= .venv
PY      := $(VENV)/bin/python
MODEL   ?=
HOST    ?= 127.0.0.1
PORT    ?= 8000
ARGS    ?=
# KV-cache memory in GiB for the CPU backend (vLLM's NUMA memory check needs it set).
export VLLM_CPU_KVCACHE_SPACE ?= 2
export HF_HUB_OFFLINE ?= 1

.PHONY: install serve test lint

install:
	bash scripts/install_cpu.sh

# `make serve` serves the bundled SmolLM2-135M-Instruct; `MODEL=/path make serve` another
# model; extra vLLM flags go in ARGS, e.g. `make serve ARGS="--kv-policy crystal"`.
serve: install
	@model="$(MODEL)"; \
	if [ -z "$$model" ]; then model=$$($(PY) -m crystal_vllm prepare-model smollm2 | tail -n 1); fi; \
	echo "serving $$model on http://$(HOST):$(PORT)"; \
	exec $(VENV)/bin/vllm serve "$$model" --host $(HOST) --port $(PORT) --enforce-eager $(ARGS)

test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
