"""Per-head paged KV-cache bookkeeping over a pool of head-blocks (no vLLM import)."""

from crystal_vllm.cache.layout import HeadBlockLayout

__all__ = ["HeadBlockLayout"]
