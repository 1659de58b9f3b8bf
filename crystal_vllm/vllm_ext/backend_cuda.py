"""Worker side on CUDA: the attention backend that replaces vLLM's when a policy is active.

The CUDA twin of :mod:`crystal_vllm.vllm_ext.backend`, sharing its metadata builder and
its ``forward`` (both device-agnostic: they hand each layer's query/key/value to the
worker's :class:`~crystal_vllm.runtime.CompressedKVCache`, whose ops dispatch to the Triton
kernels for CUDA tensors). It subclasses vLLM's Triton backend only for the constructor
(head counts, scale) and the backend's capability declarations; vLLM's own Triton
kernels never run, and never read this cache, whose layout is the per-head one.

Untested end to end: this project's CI has no GPU and no CUDA vLLM.
"""

from __future__ import annotations

from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend, TritonAttentionImpl

from crystal_vllm.vllm_ext.backend import CrystalAttentionImpl, CrystalAttentionMetadataBuilder


class CrystalCudaAttentionImpl(TritonAttentionImpl):
    """Per-head compressed attention; K/V writing included (vLLM's slot mapping is unused)."""

    forward = CrystalAttentionImpl.forward


class CrystalCudaAttentionBackend(TritonAttentionBackend):
    # Writing K/V is part of forward(): past a request's cap, vLLM's own slot mapping
    # points into the null block, so it must never be used.
    forward_includes_kv_cache_update: bool = True

    @staticmethod
    def get_impl_cls() -> type[CrystalCudaAttentionImpl]:
        return CrystalCudaAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[CrystalAttentionMetadataBuilder]:
        return CrystalAttentionMetadataBuilder
