"""Worker side: the attention backend that replaces ``CPU_ATTN`` when a policy is active.

The backend owns no state and starts nothing. The model runner owns the step (it begins
it once the batch is known and ends it after the forward pass) and binds each metadata
builder to its :class:`~crystal_vllm.runtime.CompressedKVCache` once the cache exists;
the builder puts the cache into the step's metadata, and each layer's ``forward`` hands
its query/key/value to that cache, which writes the K/V per head, attends over per-head
block tables and feeds the policy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from vllm.v1.attention.backend import AttentionMetadataBuilder
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from crystal_vllm.runtime import CompressedKVCache


@dataclass
class CrystalAttentionMetadata:
    """All a layer needs: the cache running the step and where the layer sits in it (the
    step's request layout lives in the cache)."""

    num_actual_tokens: int
    cache: CompressedKVCache
    layer_index: Mapping[str, int]


class CrystalAttentionMetadataBuilder(AttentionMetadataBuilder[CrystalAttentionMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._cache: CompressedKVCache | None = None
        self._layer_index: Mapping[str, int] = {}

    def bind(self, cache: CompressedKVCache, layer_index: Mapping[str, int]) -> None:
        """Called by the model runner once its cache exists."""
        self._cache, self._layer_index = cache, layer_index

    def build(
        self, common_prefix_len: int, common_attn_metadata, fast_build: bool = False
    ) -> CrystalAttentionMetadata:
        cache = self._cache
        if cache is None or not cache.in_step:
            raise RuntimeError(
                "crystal-vllm: attention metadata built outside a model step (the runner "
                "begins each step before the forward pass)"
            )
        return CrystalAttentionMetadata(
            num_actual_tokens=common_attn_metadata.num_actual_tokens,
            cache=cache,
            layer_index=self._layer_index,
        )


class CrystalAttentionImpl(CPUAttentionBackendImpl):
    """Per-head compressed attention; K/V writing included (vLLM's slot mapping is unused)."""

    def forward(
        self,
        layer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: CrystalAttentionMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported")
        if attn_metadata is None:  # profiling / warm-up run: no requests, no cache
            return output
        n = attn_metadata.num_actual_tokens
        out = attn_metadata.cache.attention(
            attn_metadata.layer_index[layer.layer_name],
            query[:n].view(n, self.num_heads, self.head_size),
            key[:n].view(n, self.num_kv_heads, self.head_size),
            value[:n].view(n, self.num_kv_heads, self.head_size),
        )
        output[:n].view(n, -1).copy_(out.reshape(n, -1))
        return output


class CrystalAttentionBackend(CPUAttentionBackend):
    # Writing K/V is part of forward(): past a request's cap, vLLM's own slot mapping
    # points into the null block, so it must never be used.
    forward_includes_kv_cache_update: bool = True

    @staticmethod
    def get_impl_cls() -> type[CrystalAttentionImpl]:
        return CrystalAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[CrystalAttentionMetadataBuilder]:
        return CrystalAttentionMetadataBuilder
