"""Random grant / prefill / decode / evict / shrink / release sequences (hypothesis).

A model of the caller keeps the validity mask, a per-entry token id (standing for the
policy's per-entry state) and a K/V pool whose K holds the token id, so every step can
check that bookkeeping, data moves and per-entry moves agree.
"""

from __future__ import annotations

import torch
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from crystal_vllm import ops
from crystal_vllm.cache import HeadBlockLayout, HeadBlockTables, PoolExhaustedError

LAYOUT = HeadBlockLayout(num_blocks=20, num_layers=2, num_kv_heads=2, block_size=2, head_dim=1)
ROWS = 3
MAX_HEAD_BLOCKS = 8
HEADS = (LAYOUT.num_layers, LAYOUT.num_kv_heads)


class TablesMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.t = HeadBlockTables(
            LAYOUT,
            max_rows=ROWS,
            max_blocks_per_row=10,
            max_head_blocks=MAX_HEAD_BLOCKS,
            debug=True,
        )
        shape = (ROWS, *HEADS, self.t.num_slots)
        self.valid = torch.zeros(shape, dtype=torch.bool)
        self.ids = torch.full(shape, -1)
        self.pool = torch.full((LAYOUT.num_head_blocks, 2, LAYOUT.block_size, 1), float("nan"))
        self.free_blocks = list(range(LAYOUT.num_blocks))
        self.granted: list[list[int]] = [[] for _ in range(ROWS)]
        # A row keeps vLLM's layout until it shrinks or a head outgrows its own blocks.
        self.diverged = [False] * ROWS
        self.next_id = 0

    # ------------------------------------------------------------------ helpers
    def _write(self, row: int, slots: torch.Tensor) -> None:
        """Write fresh token ids at ``slots [L, H, T]`` of ``row`` (-1 skips)."""
        t = slots.shape[-1]
        new = torch.arange(self.next_id, self.next_id + t)
        self.next_id += t
        for layer in range(LAYOUT.num_layers):
            key = new.float().view(1, t, 1, 1).expand(1, t, LAYOUT.num_kv_heads, 1)
            ops.write_kv(
                self.pool, self.t.block_tables[[row], layer], slots[None, layer], key, -key
            )
        layer, head, i = (slots >= 0).nonzero(as_tuple=True)
        s = slots[layer, head, i]
        assert not bool(self.valid[row, layer, head, s].any()), "handed out an occupied slot"
        self.valid[row, layer, head, s] = True
        self.ids[row, layer, head, s] = new[i]

    def _note_growth(self, row: int) -> None:
        if bool((self.t.num_head_blocks[row] > len(self.granted[row])).any()):
            event("a head outgrew its own head-blocks")
            self.diverged[row] = True

    def _snapshot(self) -> tuple[torch.Tensor, ...]:
        t = self.t
        return (t.block_tables.clone(), t.num_head_blocks.clone(), t.in_pool.clone())

    def _unchanged(self, before: tuple[torch.Tensor, ...]) -> bool:
        return all(torch.equal(a, b) for a, b in zip(before, self._snapshot(), strict=True))

    # ------------------------------------------------------------------ rules
    @initialize(data=st.data())
    def grant_every_row(self, data: st.DataObject) -> None:
        for row in range(ROWS):
            self.grant(row, data, at_least=1)

    @precondition(lambda self: self.free_blocks)
    @rule(row=st.integers(0, ROWS - 1), data=st.data())
    def grant(self, row: int, data: st.DataObject, at_least: int = 0) -> None:
        room = min(len(self.free_blocks), 10 - len(self.granted[row]), 4)
        k = data.draw(st.integers(min(at_least, room), room))
        blocks = data.draw(st.permutations(self.free_blocks))[:k]
        self.t.add_blocks(row, blocks)
        self.granted[row] += blocks
        self.free_blocks = [b for b in self.free_blocks if b not in blocks]

    @rule(row=st.integers(0, ROWS - 1), data=st.data())
    def prefill(self, row: int, data: st.DataObject) -> None:
        counts = data.draw(
            st.lists(st.integers(0, 5), min_size=4, max_size=4).map(
                lambda c: torch.tensor(c).view(1, *HEADS)
            )
        )
        free = (~self.valid[row]).sum(-1)
        counts = torch.minimum(counts[0], free).unsqueeze(0)
        # Head-blocks the heads will need beyond what they hold.
        last = torch.zeros(HEADS, dtype=torch.long)
        for layer in range(HEADS[0]):
            for head in range(HEADS[1]):
                n = int(counts[0, layer, head])
                if n:
                    free_slots = (~self.valid[row, layer, head]).nonzero().flatten()
                    last[layer, head] = int(free_slots[n - 1]) // LAYOUT.block_size + 1
        extra = (last - self.t.num_head_blocks[row].long()).clamp_min(0)
        before = self._snapshot()
        if int(extra.sum()) > int(self.t.pool_size[row]):
            try:
                self.t.assign_prefill_slots(torch.tensor([row]), counts, self.valid)
            except PoolExhaustedError:
                assert self._unchanged(before)
                event("pool exhausted")
                return
            raise AssertionError("expected PoolExhaustedError")
        slots = self.t.assign_prefill_slots(torch.tensor([row]), counts, self.valid)
        for layer in range(HEADS[0]):
            for head in range(HEADS[1]):
                n = int(counts[0, layer, head])
                lowest = (~self.valid[row, layer, head]).nonzero().flatten()[:n]
                assert slots[0, layer, head, :n].tolist() == lowest.tolist()
        self._write(row, slots[0])
        self._note_growth(row)

    @rule(data=st.data(), steps=st.integers(1, 4), may_exhaust=st.booleans())
    def decode(self, data: st.DataObject, steps: int, may_exhaust: bool) -> None:
        rows = data.draw(st.lists(st.integers(0, ROWS - 1), unique=True, min_size=1))
        flags = data.draw(st.lists(st.booleans(), min_size=4 * len(rows), max_size=4 * len(rows)))
        for _ in range(steps):
            self._decode_step(rows, torch.tensor(flags).view(len(rows), *HEADS), may_exhaust)

    def _decode_step(self, rows: list[int], need: torch.Tensor, may_exhaust: bool) -> None:
        need &= ~self.valid[rows].all(-1)  # a completely full head cannot take a token
        lowest = (~self.valid[rows]).to(torch.uint8).argmax(-1)
        held = self.t.num_head_blocks[rows].long()
        attach = need & (lowest >= held * LAYOUT.block_size)
        short = attach.sum((1, 2)) > self.t.pool_size[rows]
        if not may_exhaust:
            need &= ~(attach & short.view(-1, 1, 1))
            short[:] = False
        before = self._snapshot()
        if bool(short.any()):
            try:
                self.t.assign_slots(torch.tensor(rows), self.valid, need)
            except PoolExhaustedError:
                assert self._unchanged(before)
                event("pool exhausted")
                return
            raise AssertionError("expected PoolExhaustedError")
        slots = self.t.assign_slots(torch.tensor(rows), self.valid, need)
        assert torch.equal(slots, torch.where(need, lowest, -1))
        for i, row in enumerate(rows):
            self._write(row, slots[i].unsqueeze(-1))
            self._note_growth(row)

    @rule(row=st.integers(0, ROWS - 1), data=st.data())
    def evict(self, row: int, data: st.DataObject) -> None:
        live = self.valid[row].nonzero()
        if live.shape[0] == 0:
            return
        drop = data.draw(st.lists(st.integers(0, live.shape[0] - 1), unique=True))
        layer, head, s = live[drop].unbind(-1)
        self.valid[row, layer, head, s] = False
        self.ids[row, layer, head, s] = -1

    @rule(row=st.integers(0, ROWS - 1), data=st.data())
    def shrink(self, row: int, data: st.DataObject) -> None:
        held = self.t.num_head_blocks[row].long()
        keep = torch.tensor([data.draw(st.integers(0, int(h) + 1)) for h in held.flatten()]).view(
            HEADS
        )
        # Evict random entries down to what the kept head-blocks can hold.
        gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
        cap = torch.minimum(keep, held) * LAYOUT.block_size
        for layer in range(HEADS[0]):
            for head in range(HEADS[1]):
                live = self.valid[row, layer, head].nonzero().flatten()
                drop = live[torch.randperm(live.numel(), generator=gen)][int(cap[layer, head]) :]
                self.valid[row, layer, head, drop] = False
                self.ids[row, layer, head, drop] = -1
        live_before = sorted(self.ids[row][self.valid[row]].tolist())
        pooled = int(self.t.pool_size[row])

        plan = self.t.plan_shrink(torch.tensor([row]), self.valid, keep.unsqueeze(0))

        released = int((held - torch.minimum(held, keep)).sum())
        assert int(self.t.pool_size[row]) == pooled + released
        for src, dst in zip(plan.src.flatten(0, 2), plan.dst.flatten(0, 2), strict=True):
            assert set(src[src >= 0].tolist()).isdisjoint(dst[dst >= 0].tolist())
        ops.move_entries(self.pool, plan.block_tables, plan.src, plan.dst)
        plan.apply(self.ids, fill=-1)
        plan.apply(self.valid, fill=False)
        assert sorted(self.ids[row][self.valid[row]].tolist()) == live_before
        if released:
            event(f"shrink released head-blocks, moves: {min(plan.num_moves, 2)}+")
            self.diverged[row] = True

    @rule(row=st.integers(0, ROWS - 1))
    def release(self, row: int) -> None:
        self.t.release([row])
        self.valid[row] = False
        self.ids[row] = -1
        self.free_blocks += self.granted[row]
        self.granted[row] = []
        self.diverged[row] = False
        assert int(self.t.held_head_blocks([row])) == 0
        assert int(self.t.pool_head_blocks([row])) == 0

    # ------------------------------------------------------------------ invariants
    @invariant()
    def bookkeeping_is_consistent(self) -> None:
        self.t.check_invariants(self.valid)
        owned = sum(len(g) for g in self.granted)
        assert owned + len(self.free_blocks) == LAYOUT.num_blocks
        held = self.t.held_head_blocks(range(ROWS)) + self.t.pool_head_blocks(range(ROWS))
        assert held.tolist() == [len(g) * LAYOUT.heads_per_block for g in self.granted]

    @invariant()
    def contents_follow_their_entries(self) -> None:
        keys, values = ops.gather_kv(self.pool, self.t.block_tables)
        assert torch.equal(keys[..., 0][self.valid], self.ids[self.valid].float())
        assert torch.equal(values[..., 0][self.valid], -self.ids[self.valid].float())
        assert bool((self.ids[~self.valid] == -1).all())

    @invariant()
    def vllm_layout_until_heads_diverge(self) -> None:
        for row in range(ROWS):
            if self.diverged[row]:
                continue
            blocks = torch.tensor(self.granted[row] + [0] * MAX_HEAD_BLOCKS, dtype=torch.long)
            for layer in range(HEADS[0]):
                for head in range(HEADS[1]):
                    n = int(self.t.num_head_blocks[row, layer, head])
                    expect = LAYOUT.head_block_id(blocks[:n], layer, head)
                    assert self.t.block_tables[row, layer, head, :n].tolist() == expect.tolist()


TablesMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_tables_state_machine = TablesMachine.TestCase
