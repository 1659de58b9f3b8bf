"""The scheduler-side spec and manager: caps, and prompt blocks offered to the prefix cache."""

from __future__ import annotations

import pytest
import torch
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.request import Request

from crystal_vllm.vllm_ext.kv_spec import CrystalAttentionSpec, CrystalKVCacheManager

BS = 4


def _spec(*, shares: bool, cap: int = 8) -> CrystalAttentionSpec:
    return CrystalAttentionSpec(
        block_size=BS,
        num_kv_heads=1,
        head_size=8,
        dtype=torch.float32,
        max_blocks_per_request=cap,
        shares_prompt_blocks=shares,
    )


def _manager(shares: bool) -> CrystalKVCacheManager:
    pool = BlockPool(num_gpu_blocks=32, enable_caching=True, hash_block_size=BS)
    return CrystalKVCacheManager(
        _spec(shares=shares),
        block_pool=pool,
        enable_caching=True,
        kv_cache_group_id=0,
        scheduler_block_size=BS,
    )


def _request(prompt_len: int, outputs: int) -> Request:
    init_none_hash(sha256)
    request = Request(
        "r",
        list(range(prompt_len)),
        SamplingParams(max_tokens=64),
        None,
        block_hasher=get_request_block_hasher(BS, sha256),
    )
    for token in range(outputs):
        request.append_output_token_ids(1000 + token)
    return request


@pytest.mark.parametrize(("prompt_len", "full_blocks"), [(10, 2), (12, 3), (3, 0)])
def test_only_full_prompt_blocks_are_offered_to_the_prefix_cache(prompt_len, full_blocks) -> None:
    """Blocks after the prompt's last full one hold entries in eviction order, not the
    tokens their hash names: they must never become prefix-cache hits."""
    manager, request = _manager(shares=True), _request(prompt_len, 20)
    total = prompt_len + 20
    manager.allocate_new_blocks("r", total, total)
    manager.cache_blocks(request, total, replay_boundaries=())
    cached = [block.block_hash is not None for block in manager.req_to_blocks["r"]]
    assert cached == [True] * full_blocks + [False] * (len(cached) - full_blocks)


def test_private_prompt_blocks_are_never_cached() -> None:
    manager, request = _manager(shares=False), _request(12, 4)
    manager.allocate_new_blocks("r", 16, 16)
    manager.cache_blocks(request, 16, replay_boundaries=())
    assert not any(block.block_hash is not None for block in manager.req_to_blocks["r"])
    assert not _spec(shares=False).prefix_cacheable and _spec(shares=True).prefix_cacheable


def test_merge_keeps_the_cap_and_the_sharing_and_refuses_disagreement() -> None:
    merged = CrystalAttentionSpec.merge([_spec(shares=True), _spec(shares=True)])
    assert merged.max_blocks_per_request == 8 and merged.shares_prompt_blocks
    with pytest.raises(ValueError, match="disagree"):
        CrystalAttentionSpec.merge([_spec(shares=True), _spec(shares=False)])
    with pytest.raises(ValueError, match="disagree"):
        CrystalAttentionSpec.merge([_spec(shares=True), _spec(shares=True, cap=9)])
