"""The per-step runtime: policy + head-block tables + ops, for one worker. No vLLM import."""

from crystal_vllm.runtime.compressed_cache import CompressedKVCache, StepRequest

__all__ = ["CompressedKVCache", "StepRequest"]
