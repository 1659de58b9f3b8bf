"""Rough CPU timings of the per-step cache paths (not collected by pytest).

Run: OMP_NUM_THREADS=1 .venv/bin/python tests/ops/bench_cache_ops.py
Geometry: 32 requests, 24 layers x 4 KV heads (GQA 4), head_dim 64, block 16, budget 1024.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from crystal_vllm import ops
from crystal_vllm.cache import HeadBlockLayout, HeadBlockTables


def _ms(fn: Callable[[], object], repeat: int = 20) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1e3


def main() -> None:
    torch.manual_seed(0)
    rows_n, layers, heads, bs, dim, budget = 32, 24, 4, 16, 64, 1024
    per_row = budget // bs + 2
    max_head_blocks = budget // bs + 8
    layout = HeadBlockLayout(rows_n * per_row, layers, heads, bs, dim)
    tables = HeadBlockTables(
        layout, max_rows=rows_n, max_blocks_per_row=max_head_blocks, max_head_blocks=max_head_blocks
    )
    rows = torch.arange(rows_n)
    tables.add_blocks_batch(rows, torch.arange(rows_n * per_row).view(rows_n, per_row))
    valid = torch.zeros(rows_n, layers, heads, tables.num_slots, dtype=torch.bool)
    tables.assign_prefill_slots(rows, torch.full((rows_n, layers, heads), budget - 40))
    valid[..., : budget - 40] = True
    need = torch.ones(rows_n, layers, heads, dtype=torch.bool)

    with_holes = valid.clone()
    with_holes[..., 5] = False
    reuse = _ms(lambda: tables.assign_slots(rows, with_holes, need))
    print(f"assign_slots, hole reuse: {reuse:.2f} ms")

    def grow() -> None:
        slots = tables.assign_slots(rows, valid, need)
        valid.view(-1, tables.num_slots)[torch.arange(need.numel()), slots.flatten()] = True

    print(f"assign_slots, appending (attaches every {bs} steps): {_ms(grow):.2f} ms")

    pool = torch.randn(layout.num_head_blocks, 2, bs, dim, dtype=torch.bfloat16)
    query = torch.randn(rows_n, heads * 4, dim, dtype=torch.bfloat16)
    table0, valid0 = tables.block_tables[:, 0], valid[:, 0]
    attn = _ms(lambda: ops.paged_decode_attention(query, pool, table0, valid0, dim**-0.5), 10)
    print(f"paged_decode_attention, one layer, bf16, S={tables.num_slots}: {attn:.1f} ms")
    key = torch.randn(rows_n, 1, heads, dim)
    slot = torch.full((rows_n, heads, 1), 3)
    write = _ms(lambda: ops.write_kv(pool, table0, slot, key, key))
    print(f"write_kv, one layer, one token: {write:.3f} ms")

    keep = torch.randint(40, 64, (rows_n, layers, heads))
    live = valid & (torch.rand(valid.shape) < 0.5)
    start = time.perf_counter()
    plan = tables.plan_shrink(rows, live, keep)
    planned = time.perf_counter()
    ops.move_entries(pool, plan.block_tables, plan.src, plan.dst)
    moved = time.perf_counter()
    print(
        f"plan_shrink, all heads: {(planned - start) * 1e3:.0f} ms; move_entries of "
        f"{plan.num_moves} entries: {(moved - planned) * 1e3:.0f} ms"
    )


if __name__ == "__main__":
    main()
