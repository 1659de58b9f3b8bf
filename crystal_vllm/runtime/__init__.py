"""The per-step runtime: policy + head-block tables + ops, for one worker. No vLLM import."""

from crystal_vllm.runtime.compressed_cache import CacheSummary, CompressedKVCache, StepRequest

__all__ = ["CacheSummary", "CompressedKVCache", "StepRequest"]
