"""HeadBlockTables: slot assignment, vLLM layout before eviction, shrink/grow, release."""

from __future__ import annotations

import pytest
import torch

from crystal_vllm import ops
from crystal_vllm.cache import HeadBlockLayout, HeadBlockTables, PoolExhaustedError

LAYOUT = HeadBlockLayout(num_blocks=16, num_layers=2, num_kv_heads=3, block_size=4, head_dim=2)


def _tables(max_rows: int = 4, max_head_blocks: int = 8) -> HeadBlockTables:
    return HeadBlockTables(
        LAYOUT, max_rows=max_rows, max_blocks_per_row=8, max_head_blocks=max_head_blocks, debug=True
    )


def _valid(t: HeadBlockTables) -> torch.Tensor:
    return torch.zeros(t.max_rows, LAYOUT.num_layers, LAYOUT.num_kv_heads, t.num_slots, dtype=bool)


def _vllm_layout(blocks: list[int], n: int) -> torch.Tensor:
    """[L, H, n] head-block ids vLLM's own layout gives the first n blocks."""
    b = torch.tensor(blocks[:n]).view(1, 1, -1)
    layer = torch.arange(LAYOUT.num_layers).view(-1, 1, 1)
    head = torch.arange(LAYOUT.num_kv_heads).view(1, -1, 1)
    return LAYOUT.head_block_id(b, layer, head)


def test_prefill_then_decode_follow_vllm_layout():
    t = _tables()
    valid = _valid(t)
    blocks = [7, 2, 9, 4]
    t.add_blocks(1, blocks)
    rows = torch.tensor([1])
    n = torch.full((1, 2, 3), 6)
    slots = t.assign_prefill_slots(rows, n)
    assert torch.equal(slots, torch.arange(6).expand(1, 2, 3, 6))
    valid[1, :, :, :6] = True
    assert torch.equal(t.block_tables[1, :, :, :2], _vllm_layout(blocks, 2).int())
    for step in range(6, 13):
        slot = t.assign_slots(rows, valid, torch.ones(1, 2, 3, dtype=torch.bool))
        assert bool((slot == step).all())
        valid[1, :, :, step] = True
    assert torch.equal(t.block_tables[1, :, :, :4], _vllm_layout(blocks, 4).int())
    assert t.held_head_blocks([1]).tolist() == [4 * 6]
    assert t.pool_head_blocks([1]).tolist() == [0]
    t.check_invariants(valid)


def test_assign_slots_reuses_lowest_hole_and_skips_unneeded():
    t = _tables()
    valid = _valid(t)
    t.add_blocks(0, [3, 5])
    t.assign_prefill_slots(torch.tensor([0]), torch.full((1, 2, 3), 8))
    valid[0, :, :, :8] = True
    valid[0, 0, 1, [6, 2]] = False
    need = torch.zeros(1, 2, 3, dtype=torch.bool)
    need[0, 0, 1] = need[0, 1, 2] = True
    with pytest.raises(PoolExhaustedError, match="row 0 needs 1 more head-blocks but its pool"):
        t.assign_slots(torch.tensor([0]), valid, need)
    need[0, 1, 2] = False
    slot = t.assign_slots(torch.tensor([0]), valid, need)
    expect = torch.full((1, 2, 3), -1)
    expect[0, 0, 1] = 2
    assert torch.equal(slot, expect)


def test_failed_assignment_changes_nothing():
    t = _tables()
    t.add_blocks(2, [0])
    before = (t.block_tables.clone(), t.pool_size.clone(), t.in_pool.clone())
    with pytest.raises(PoolExhaustedError):
        t.assign_prefill_slots(torch.tensor([2]), torch.full((1, 2, 3), 5))
    assert torch.equal(before[0], t.block_tables)
    assert torch.equal(before[1], t.pool_size) and torch.equal(before[2], t.in_pool)


def test_shrink_moves_memory_to_another_head_and_keeps_contents():
    t = _tables()
    valid = _valid(t)
    ids = torch.full(valid.shape, -1)  # a per-entry policy tensor: which token lives where
    pool = torch.zeros(LAYOUT.num_head_blocks, 2, 4, 2)
    rows = torch.tensor([3])
    t.add_blocks(3, [11, 1, 6])
    slots = t.assign_prefill_slots(rows, torch.full((1, 2, 3), 12))
    for layer in range(2):
        token = torch.arange(12, dtype=torch.float32).view(1, 12, 1, 1).expand(1, 12, 3, 2)
        ops.write_kv(pool, t.block_tables[rows, layer], slots[:, layer], token, -token)
    valid[3, :, :, :12] = True
    ids[3, :, :, :12] = torch.arange(12)
    # Head (0, 0) evicts all but tokens 1, 5 and 10, then shrinks to one head-block.
    valid[3, 0, 0] = False
    valid[3, 0, 0, [1, 5, 10]] = True
    keep = torch.full((1, 2, 3), 8)
    keep[0, 0, 0] = 1

    plan = t.plan_shrink(rows, valid, keep)

    assert plan.num_moves == 2
    assert plan.src[0, 0, 0].tolist() == [5, 10] and plan.dst[0, 0, 0].tolist() == [0, 2]
    assert bool((plan.src[0].flatten(0, 1)[1:] == -1).all())  # other heads keep everything
    ops.move_entries(pool, plan.block_tables, plan.src, plan.dst)
    plan.apply(ids)
    plan.apply(valid, fill=False)
    live = valid[3, 0, 0].nonzero().flatten()
    assert live.tolist() == [0, 1, 2] and ids[3, 0, 0, live].tolist() == [5, 1, 10]
    k, v = ops.gather_kv(pool, t.block_tables[rows, 0])
    assert torch.equal(k[0, 0, live, 0], ids[3, 0, 0, live].float())
    assert torch.equal(v[0, 0, live, 0], -ids[3, 0, 0, live].float())
    assert t.pool_head_blocks([3]).tolist() == [2]
    t.check_invariants(valid)

    # Head (1, 2) now grows past its own three head-blocks into the released ones.
    need = torch.zeros(1, 2, 3, dtype=torch.bool)
    need[0, 1, 2] = True
    for step in range(12, 20):
        slot = t.assign_slots(rows, valid, need)
        assert int(slot[0, 1, 2]) == step
        valid[3, 1, 2, step] = True
    assert int(t.num_head_blocks[3, 1, 2]) == 5
    released = set(plan.block_tables[0, 0, 0, 1:3].tolist())
    assert set(t.block_tables[3, 1, 2, 3:5].tolist()) == released
    t.check_invariants(valid)


def test_shrink_refuses_to_drop_live_entries():
    t = _tables()
    valid = _valid(t)
    t.add_blocks(0, [0, 1])
    t.assign_prefill_slots(torch.tensor([0]), torch.full((1, 2, 3), 6))
    valid[0, :, :, :6] = True
    with pytest.raises(RuntimeError, match="row 0 layer 0 head 0 holds 6 live entries"):
        t.plan_shrink(torch.tensor([0]), valid, torch.ones(1, 2, 3, dtype=torch.long))


def test_release_returns_every_head_block():
    t = _tables()
    valid = _valid(t)
    t.add_blocks_batch(torch.tensor([0, 2]), torch.tensor([[4, 5, -1], [8, -1, 9]]))
    t.assign_prefill_slots(torch.tensor([0, 2]), torch.full((2, 2, 3), 7))
    assert t.granted_blocks([0, 2]).tolist() == [2, 2]
    t.release([0, 2])
    assert bool((t.block_tables == -1).all()) and bool((t.block_owner == -1).all())
    assert not bool(t.in_pool.any()) and int(t.pool_size.sum()) == 0
    t.check_invariants(valid)
    t.add_blocks(1, [4, 8])  # the blocks can be granted again
    assert t.pool_head_blocks([1]).tolist() == [12]


def test_add_blocks_validation():
    t = _tables()
    t.add_blocks(0, [1])
    with pytest.raises(ValueError, match="granted twice"):
        t.add_blocks(1, [1])
    with pytest.raises(ValueError, match="out of range"):
        t.add_blocks(1, [16])
    with pytest.raises(ValueError, match="max_blocks_per_row=8"):
        t.add_blocks(1, list(range(2, 11)))
    with pytest.raises(ValueError, match="distinct"):
        t.add_blocks_batch([1, 1], torch.tensor([[2], [3]]))
    with pytest.raises(ValueError, match="max_rows=0 must be >= 1"):
        HeadBlockTables(LAYOUT, max_rows=0, max_blocks_per_row=1, max_head_blocks=1)


def test_check_invariants_catches_corruption():
    t = _tables()
    t.add_blocks(0, [1, 2])
    t.assign_prefill_slots(torch.tensor([0]), torch.full((1, 2, 3), 4))
    t.block_tables[0, 1, 1, 0] = t.block_tables[0, 0, 0, 0]
    with pytest.raises(AssertionError, match="attached to two heads"):
        t.check_invariants()
    t = _tables()
    t.add_blocks(0, [1, 2])
    t.in_pool[LAYOUT.head_block_id(1, 0, 0)] = False
    with pytest.raises(AssertionError, match="pool_size"):
        t.check_invariants()
    t = _tables()
    t.add_blocks(0, [1])
    t.add_blocks(1, [2])
    t.assign_prefill_slots(torch.tensor([0]), torch.full((1, 2, 3), 1))
    t.block_tables[0, 0, 0, 0] = LAYOUT.head_block_id(2, 0, 0)
    with pytest.raises(AssertionError, match="not granted"):
        t.check_invariants()
    valid = _valid(t)
    t = _tables()
    valid[0, 0, 0, 5] = True
    with pytest.raises(AssertionError, match="outside"):
        t.check_invariants(valid)


def test_fallback_takes_pooled_head_blocks_of_the_same_row():
    t = _tables()
    t.add_blocks(2, [5])
    t.add_blocks(0, [6, 9])
    counts = torch.zeros(2, 2, 3, dtype=torch.long)
    counts[0, 0, 0] = 12  # row 2: one own head-block + two from its pool
    counts[1, 1, 2] = 16  # row 0: two own head-blocks + two from its pool
    counts[1, 0, 1] = 4
    t.assign_prefill_slots(torch.tensor([2, 0]), counts)  # rows deliberately unsorted
    hb = LAYOUT.head_block_id
    assert t.block_tables[2, 0, 0, :3].tolist() == [hb(5, 0, 0), hb(5, 0, 1), hb(5, 0, 2)]
    assert t.block_tables[0, 1, 2, :4].tolist() == [hb(6, 1, 2), hb(9, 1, 2)] + [
        hb(6, 0, 0),
        hb(6, 0, 2),  # (6, 0, 1) went to its own head first
    ]
    assert t.block_tables[0, 0, 1, :1].tolist() == [hb(6, 0, 1)]
    assert t.pool_head_blocks([2, 0]).tolist() == [3, 12 - 5]


def test_inputs_with_wrong_shapes_are_rejected():
    t = _tables()
    t.add_blocks(0, [])  # nothing granted is fine
    with pytest.raises(ValueError, match=r"\[max_rows, L, H, S\] = \(4, 2, 3, 32\)"):
        t.assign_slots(torch.tensor([0]), torch.zeros(4, 2, 3, 16, dtype=torch.bool), None)
    with pytest.raises(ValueError, match=r"block_ids must be \[2, k\]"):
        t.add_blocks_batch([0, 1], torch.tensor([1, 2]))


def test_borrowed_blocks_sit_in_vllm_layout_and_are_never_pooled():
    """A reader borrows its writer's first two blocks in the step that grants them to the
    writer: both rows attach them where vLLM's layout puts them, the reader's growth takes
    only its own blocks, and releasing either row leaves the other consistent."""
    t = _tables()
    valid = _valid(t)
    writer, reader = [7, 2, 9], [7, 2, 5, 11]
    t.borrow_blocks(0, reader[:2])  # the reader comes first in the batch
    t.add_blocks(0, reader[2:])
    t.add_blocks(1, writer)
    assert torch.equal(t.block_tables[0, :, :, :2], _vllm_layout(reader, 2))
    assert t.pool_head_blocks([0]).tolist() == [2 * LAYOUT.heads_per_block]
    rows = torch.tensor([0, 1])
    valid[0, :, :, :8] = True  # the borrowed prompt entries
    slots = t.assign_prefill_slots(rows, torch.tensor([[[2]], [[10]]]).expand(2, 2, 3), valid)
    valid[0, :, :, 8:10] = True
    valid[1, :, :, :10] = True
    assert slots[0, 0, 0, :2].tolist() == [8, 9]
    assert torch.equal(t.block_tables[0, :, :, :3], _vllm_layout(reader, 3))
    assert torch.equal(t.block_tables[1, :, :, :3], _vllm_layout(writer, 3))
    assert t.borrowers[[7, 2]].tolist() == [1, 1]
    t.check_invariants(valid)
    # The shared blocks count once: the writer's 3 blocks and the reader's own one.
    assert t.head_blocks_in_use() == 4 * LAYOUT.heads_per_block
    # Shrinking (after evicting the reader's own entries) never gives a borrowed
    # head-block back.
    valid[0, :, :, 8:] = False
    t.plan_shrink(torch.tensor([0]), valid, torch.zeros(1, 2, 3, dtype=torch.long))
    assert torch.equal(t.block_tables[0, :, :, :2], _vllm_layout(reader, 2))
    t.release([1])
    valid[1] = False
    t.check_invariants(valid)
    assert t.borrowers[[7, 2]].tolist() == [1, 1]
    # The writer has gone: its two shared blocks are held by the reader alone.
    assert t.head_blocks_in_use() == 2 * LAYOUT.heads_per_block
    t.release([0])
    assert int(t.borrowers.sum()) == 0 and int(t.num_head_blocks.sum()) == 0
    t.check_invariants()


def test_borrow_blocks_validation():
    t = _tables()
    t.add_blocks(0, [3])
    with pytest.raises(ValueError, match="already holds blocks"):
        t.borrow_blocks(0, [4])
    with pytest.raises(ValueError, match="repeated"):
        t.borrow_blocks(1, [4, 4])
    with pytest.raises(ValueError, match="out of"):
        t.borrow_blocks(1, [16])
    t.borrow_blocks(1, [3])  # owned by row 0 (its writer) is fine
    with pytest.raises(ValueError, match="granted twice"):
        t.add_blocks(1, [3])
