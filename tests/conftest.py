"""Shared fixtures: the tiny random-weight model and vLLM-friendly environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# vLLM on this 2-core machine: one OpenMP thread per process, no hub, a fixed KV pool.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """A 4-layer random-weight Llama (bf16) with a locally trained tokenizer."""
    from crystal_vllm.models import prepare_model

    return prepare_model("tiny")


@pytest.fixture(scope="session")
def tiny_model_fp32() -> Path:
    """The same tiny model in float32, for exact token comparisons."""
    from crystal_vllm.models import prepare_model

    return prepare_model("tiny", dtype="float32")
