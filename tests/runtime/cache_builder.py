"""One builder of small CompressedKVCache instances for the runtime tests."""

from __future__ import annotations

import torch

from crystal_vllm.cache import HeadBlockLayout
from crystal_vllm.policy import KVPolicy
from crystal_vllm.runtime import CompressedKVCache


def build_cache(
    policy: KVPolicy,
    *,
    layers: int,
    kv_heads: int,
    block_size: int,
    head_dim: int,
    cap: int,
    num_blocks: int,
    max_rows: int,
    share_prompt_blocks: bool = False,
) -> CompressedKVCache:
    """A zeroed float32 pool; rows hold at most ``cap`` blocks; debug_checks on."""
    layout = HeadBlockLayout(
        num_blocks=num_blocks,
        num_layers=layers,
        num_kv_heads=kv_heads,
        block_size=block_size,
        head_dim=head_dim,
    )
    return CompressedKVCache(
        policy,
        layout,
        torch.zeros(layout.num_head_blocks, 2, block_size, head_dim),
        max_rows=max_rows,
        max_slots=cap * block_size,
        max_blocks_per_row=cap,
        scale=head_dim**-0.5,
        share_prompt_blocks=share_prompt_blocks,
        debug_checks=True,
    )
