"""The generic step's helpers in ``crystal_vllm/policy/base.py``."""

from __future__ import annotations

import pytest
import torch

from crystal_vllm import ops
from crystal_vllm.policy.base import PagedKeys


def _pool_and_tables(gen: torch.Generator, b: int = 5, h: int = 3, mb: int = 4, bs: int = 8):
    num_head_blocks = b * h * mb + 1
    pool = torch.randn(num_head_blocks, 2, bs, 16, generator=gen)
    tables = (torch.randperm(num_head_blocks - 1, generator=gen)[: b * h * mb] + 1).view(b, h, mb)
    tables[0, 1, 3] = -1  # an unassigned table entry reads as zeros
    return pool, tables


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paged_keys_match_the_full_gather_for_the_heads_indexed(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    pool, tables = _pool_and_tables(gen)
    num_slots = 29  # not a multiple of the block size
    full = ops.gather_kv(pool, tables, num_slots)[0][:, None].float()  # [b, 1, H, S, D]
    n = 7
    batch = torch.randint(0, tables.shape[0], (n,), generator=gen)
    head = torch.randint(0, tables.shape[1], (n,), generator=gen)
    layer = torch.zeros(n, dtype=torch.long)
    got = PagedKeys(pool, tables, num_slots)[batch, layer, head]
    assert got.dtype == torch.float32
    assert torch.equal(got, full[batch, layer, head])


def test_paged_keys_refuse_a_second_layer() -> None:
    pool, tables = _pool_and_tables(torch.Generator().manual_seed(0))
    one = torch.ones(1, dtype=torch.long)
    with pytest.raises(IndexError, match="single layer"):
        PagedKeys(pool, tables, 8)[one * 0, one, one * 0]
