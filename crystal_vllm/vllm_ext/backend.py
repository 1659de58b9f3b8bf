"""Worker side: the attention backend that replaces ``CPU_ATTN`` when a policy is active.

The backend owns no state: it forwards each layer's query/key/value of the step to the
worker's :class:`~crystal_vllm.runtime.CompressedKVCache`, which writes the K/V per head,
attends over per-head block tables and feeds the policy. The metadata builder, called
once per step before the first layer, starts the step (``begin_step``); the model
runner ends it after the forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.v1.attention.backend import AttentionMetadataBuilder
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from crystal_vllm.vllm_ext import runner_registry


@dataclass
class CrystalAttentionMetadata:
    """All a layer needs: the step's request layout lives in the runtime."""

    num_actual_tokens: int


class CrystalAttentionMetadataBuilder(AttentionMetadataBuilder[CrystalAttentionMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(
        self, common_prefix_len: int, common_attn_metadata, fast_build: bool = False
    ) -> CrystalAttentionMetadata:
        runner_registry.active_runner().crystal_begin_step(common_attn_metadata)
        return CrystalAttentionMetadata(num_actual_tokens=common_attn_metadata.num_actual_tokens)


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
        runner = runner_registry.active_runner()
        n = attn_metadata.num_actual_tokens
        out = runner.crystal_cache.attention(
            runner.crystal_layer_index[layer.layer_name],
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
