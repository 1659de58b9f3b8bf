"""Per-head paged KV-cache bookkeeping over a pool of head-blocks (no vLLM import)."""

from crystal_vllm.cache.layout import HeadBlockLayout
from crystal_vllm.cache.tables import HeadBlockTables, PoolExhaustedError, ShrinkPlan

__all__ = ["HeadBlockLayout", "HeadBlockTables", "PoolExhaustedError", "ShrinkPlan"]
