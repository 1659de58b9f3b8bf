"""Per-(request, layer, KV head) block tables over a shared pool of head-blocks.

Each request row owns the head-blocks of the vLLM blocks the scheduler granted it. A
head-block owned by a row is either *attached* to one of the row's heads (it appears in
that head's block table) or sits in the row's *pool*, free for any of its heads. Heads
grow by attaching head-blocks from the pool and shrink by compacting their live entries
into their first head-blocks and returning the rest, so memory moves between the layers
and heads of a request without vLLM noticing.

Invariants (checked by :meth:`HeadBlockTables.check_invariants`):

* a head's table is dense: entries ``0 .. n-1`` are head-block ids, the rest ``-1``, where
  ``n = num_head_blocks[row, layer, head]``; the head's slots are ``0 .. n * bs - 1``;
* no owned head-block is attached twice, and every attached head-block belongs to a vLLM
  block granted to the same row;
* the pool of a row is exactly its owned head-blocks that are not attached;
* a row's first ``num_borrowed`` grants are *borrowed*: full prompt blocks another request
  wrote, shared through vLLM's prefix cache. They are attached to every head at once, in
  vLLM's own layout (head ``(l, h)`` holds ``(granted[j], l, h)`` at position ``j``), never
  pooled, never released into a pool and never owned by the row (their writer, if still
  running, owns them).

Occupancy (which slots hold a live entry) is owned by the caller's ``valid`` mask
``[max_rows, L, H, max_head_blocks * bs]``; functions that need it take it as an argument.
Tensors live on one device; the per-step paths are batched over rows, layers and heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from crystal_vllm import ops
from crystal_vllm.cache.layout import HeadBlockLayout

__all__ = ["HeadBlockTables", "PoolExhaustedError", "ShrinkPlan"]


class PoolExhaustedError(RuntimeError):
    """A head needed a head-block but its row's pool was empty (an upstream quota bug)."""


@dataclass(frozen=True)
class ShrinkPlan:
    """Moves that compact shrinking heads, as returned by :meth:`HeadBlockTables.plan_shrink`.

    ``src`` and ``dst`` are ``[b, L, H, M]`` slot pairs (``-1`` pads) for the heads of
    ``rows``; sources are live slots of released head-blocks, destinations are holes of
    kept ones, so the two sets are disjoint. ``block_tables`` is a copy of those rows'
    tables *before* the release, which the K/V move must use
    (``ops.move_entries(kv_pool, plan.block_tables, plan.src, plan.dst)``). Apply the K/V
    moves before the next slot assignment: a released head-block may be re-attached then.
    """

    rows: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    block_tables: torch.Tensor

    @property
    def num_moves(self) -> int:
        return int((self.src >= 0).sum())

    def apply(self, per_entry: torch.Tensor, fill: float | bool | None = None) -> None:
        """Move per-slot state ``[max_rows, L, H, S, ...]`` (e.g. CRF, tau, ``valid``).

        With ``fill`` given, the vacated source slots are set to it afterwards (pass
        ``False`` for the validity mask).
        """
        b, li, hi, mi = (self.src >= 0).nonzero(as_tuple=True)
        r = self.rows[b]
        src, dst = self.src[b, li, hi, mi], self.dst[b, li, hi, mi]
        moved = per_entry[r, li, hi, src].clone()
        if fill is not None:
            per_entry[r, li, hi, src] = fill
        per_entry[r, li, hi, dst] = moved


def _as_rows(rows: torch.Tensor | Sequence[int] | int, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(rows, dtype=torch.long, device=device).reshape(-1)


class HeadBlockTables:
    """Bookkeeping of which head-blocks each (row, layer, KV head) uses.

    Args:
        layout: geometry of the head-block pool.
        max_rows: number of persistent request rows.
        max_blocks_per_row: most vLLM blocks one row can be granted.
        max_head_blocks: most head-blocks one head can hold (table width); a head's slots
            are ``0 .. max_head_blocks * block_size - 1``.
        device: where the tensors live.
        debug: run :meth:`check_invariants` after every mutation (slow; for tests).
    """

    def __init__(
        self,
        layout: HeadBlockLayout,
        max_rows: int,
        max_blocks_per_row: int,
        max_head_blocks: int,
        device: torch.device | str = "cpu",
        debug: bool = False,
    ) -> None:
        for name, value in (
            ("max_rows", max_rows),
            ("max_blocks_per_row", max_blocks_per_row),
            ("max_head_blocks", max_head_blocks),
        ):
            if value < 1:
                raise ValueError(f"HeadBlockTables: {name}={value} must be >= 1")
        self.layout = layout
        self.max_rows = max_rows
        self.max_blocks_per_row = max_blocks_per_row
        self.max_head_blocks = max_head_blocks
        self.device = torch.device(device)
        self.debug = debug
        lay, dev = layout, self.device
        shape = (max_rows, lay.num_layers, lay.num_kv_heads)
        self.block_tables = torch.full((*shape, max_head_blocks), -1, dtype=torch.int32, device=dev)
        self.num_head_blocks = torch.zeros(shape, dtype=torch.int32, device=dev)
        # vLLM block ids granted to each row, in grant order (-1 pads).
        self.granted = torch.full((max_rows, max_blocks_per_row), -1, dtype=torch.int32, device=dev)
        self.num_granted = torch.zeros(max_rows, dtype=torch.int32, device=dev)
        self.block_owner = torch.full((lay.num_blocks,), -1, dtype=torch.long, device=dev)
        # Leading grants of each row that are borrowed, and how many rows borrow each block.
        self.num_borrowed = torch.zeros(max_rows, dtype=torch.int32, device=dev)
        self.borrowers = torch.zeros(lay.num_blocks, dtype=torch.long, device=dev)
        # True for head-blocks owned by some row and in its pool (not attached).
        self.in_pool = torch.zeros(lay.num_head_blocks, dtype=torch.bool, device=dev)
        self.pool_size = torch.zeros(max_rows, dtype=torch.long, device=dev)
        self._layer = torch.arange(lay.num_layers, device=dev)
        self._head = torch.arange(lay.num_kv_heads, device=dev)

    @property
    def num_slots(self) -> int:
        """Slots per head: the width ``S`` of the caller's ``valid`` mask."""
        return self.max_head_blocks * self.layout.block_size

    # ------------------------------------------------------------------ grants
    def add_blocks(self, row: int, block_ids: Sequence[int] | torch.Tensor) -> None:
        """Row ``row`` was granted more vLLM blocks: their head-blocks join its pool."""
        ids = torch.as_tensor(block_ids, dtype=torch.long, device=self.device).reshape(1, -1)
        self.add_blocks_batch(torch.tensor([row], device=self.device), ids)

    def add_blocks_batch(self, rows: torch.Tensor | Sequence[int], block_ids: torch.Tensor) -> None:
        """Vectorised :meth:`add_blocks`: ``block_ids [b, k]`` per distinct row, ``-1`` pads.

        Runs when the scheduler grants blocks (rarely, at most once per ``block_size``
        tokens), so it validates its inputs, at the cost of a host sync.
        """
        rows = _as_rows(rows, self.device)
        self._check_rows(rows)
        block_ids = block_ids.to(self.device, torch.long)
        if block_ids.dim() != 2 or block_ids.shape[0] != rows.numel():
            raise ValueError(
                f"add_blocks_batch: block_ids must be [{rows.numel()}, k], "
                f"got {tuple(block_ids.shape)}"
            )
        mask = block_ids >= 0
        new = block_ids[mask]
        if new.numel() == 0:
            return
        if int(new.max()) >= self.layout.num_blocks:
            raise ValueError(
                f"add_blocks: block id {int(new.max())} out of range [0, {self.layout.num_blocks})"
            )
        # A block may be borrowed by other rows already: its writer is granted it in the
        # step that writes it, and a reader may come first in that step's batch.
        if new.unique().numel() != new.numel() or bool((self.block_owner[new] >= 0).any()):
            raise ValueError("add_blocks: a block is granted twice (already owned or repeated)")
        count = mask.sum(1)
        total = self.num_granted[rows].long() + count
        if bool((total > self.max_blocks_per_row).any()):
            bad = int(total.argmax())
            raise ValueError(
                f"add_blocks: row {int(rows[bad])} would hold {int(total[bad])} blocks, "
                f"more than max_blocks_per_row={self.max_blocks_per_row}"
            )
        pos = self.num_granted[rows].long()[:, None] + mask.long().cumsum(1) - 1
        row_of = rows[:, None].expand_as(block_ids)
        self.granted[row_of[mask], pos[mask]] = new.to(torch.int32)
        self.num_granted[rows] = total.to(torch.int32)
        self.block_owner[new] = row_of[mask]
        self.in_pool[self._all_head_blocks(new).reshape(-1)] = True
        self.pool_size[rows] += count * self.layout.heads_per_block
        self._after_mutation()

    def borrow_blocks(self, row: int, block_ids: Sequence[int] | torch.Tensor) -> None:
        """A fresh row starts with ``block_ids``: full prompt blocks shared through vLLM's
        prefix cache, already written in vLLM's layout by the request that computed them.

        Each head gets its own head-block of every one of them, in order, so the row reads
        the shared entries where their writer put them; nothing is pooled or owned, so no
        later grant, shrink or release of this row can hand them to a head or a row.
        """
        ids = torch.as_tensor(block_ids, dtype=torch.long, device=self.device).reshape(-1)
        self._check_rows(_as_rows(row, self.device))
        if int(self.num_granted[row]):
            raise ValueError(f"borrow_blocks: row {row} already holds blocks")
        count = ids.numel()
        if count == 0:
            return
        if count > self.max_head_blocks or count > self.max_blocks_per_row:
            raise ValueError(
                f"borrow_blocks: {count} blocks exceed a row's "
                f"{min(self.max_head_blocks, self.max_blocks_per_row)}"
            )
        if int(ids.min()) < 0 or int(ids.max()) >= self.layout.num_blocks:
            raise ValueError(f"borrow_blocks: a block id is out of [0, {self.layout.num_blocks})")
        if ids.unique().numel() != count:
            raise ValueError("borrow_blocks: a block is repeated")
        self.granted[row, :count] = ids.to(torch.int32)
        self.num_granted[row] = self.num_borrowed[row] = count
        self.borrowers[ids] += 1
        self.block_tables[row, :, :, :count] = self.vllm_layout(ids).to(torch.int32)
        self.num_head_blocks[row] = count
        self._after_mutation()

    def release(self, rows: torch.Tensor | Sequence[int]) -> None:
        """Forget ``rows`` (finished, aborted or preempted requests): all blocks go back.

        Only the bookkeeping is reset; the caller clears its own per-entry state
        (``valid`` and the policy tensors) for these rows.
        """
        rows = _as_rows(rows, self.device)
        self._check_rows(rows)
        granted = self.granted[rows].long()
        borrowed = self._borrowed_grants(rows)
        self.borrowers.index_add_(0, granted[borrowed], torch.full_like(granted[borrowed], -1))
        blocks = granted[(granted >= 0) & ~borrowed]
        self.in_pool[self._all_head_blocks(blocks).reshape(-1)] = False
        self.block_owner[blocks] = -1
        self.granted[rows] = -1
        self.num_granted[rows] = 0
        self.num_borrowed[rows] = 0
        self.block_tables[rows] = -1
        self.num_head_blocks[rows] = 0
        self.pool_size[rows] = 0
        self._after_mutation()

    # ------------------------------------------------------------------ slots
    def assign_slots(
        self, rows: torch.Tensor, valid: torch.Tensor, need: torch.Tensor
    ) -> torch.Tensor:
        """One free slot for each head that needs one for a new token (the decode path).

        Args:
            rows: ``[b]`` distinct row indices.
            valid: ``[max_rows, L, H, S]`` occupancy; not modified (mark the returned
                slots valid once the token is written).
            need: ``[b, L, H]`` bool.

        Returns:
            ``[b, L, H]`` long: the lowest free slot of the head, attaching a head-block
            from the row's pool when the head has no hole; ``-1`` where not needed.

        Raises:
            PoolExhaustedError: a row's pool cannot supply the head-blocks needed.
        """
        rows = _as_rows(rows, self.device)
        self._check_valid(valid)
        if self.debug:
            self._check_rows(rows)
        slot = ops.first_free_slots(valid, rows)
        if bool((need & (slot < 0)).any()):
            raise RuntimeError(
                "assign_slots: a head needs a slot but all its "
                f"{self.num_slots} slots (max_head_blocks={self.max_head_blocks}) are live"
            )
        block_size = self.layout.block_size
        held = self.num_head_blocks[rows].long()
        extra = torch.where(need, (slot // block_size + 1 - held).clamp_min(0), 0)
        self._attach(rows, extra)
        return torch.where(need, slot, -1)

    def assign_prefill_slots(
        self,
        rows: torch.Tensor,
        num_tokens: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Slots for ``num_tokens[b, L, H]`` new tokens per head, in token order.

        Token ``t`` of a head gets the head's ``t``-th lowest free slot, so an empty head
        gets slots ``0 .. n-1``. ``valid`` (``[max_rows, L, H, S]``) is needed only when
        the heads already hold entries (a later prefill chunk, or appending after
        evictions); without it every head is taken to be empty.

        Returns:
            ``[b, L, H, T]`` long with ``T = max(num_tokens)``; ``-1`` pads heads with
            fewer tokens. Head-blocks are attached from the row's pool as needed.
        """
        rows = _as_rows(rows, self.device)
        if self.debug:
            self._check_rows(rows)
        num_tokens = num_tokens.to(self.device, torch.long)
        lay = self.layout
        if valid is None:
            free = torch.ones(
                (rows.numel(), lay.num_layers, lay.num_kv_heads, self.num_slots),
                dtype=torch.bool,
                device=self.device,
            )
        else:
            self._check_valid(valid)
            free = ~valid[rows]
        rank = free.cumsum(dim=-1, dtype=torch.int32) - 1
        if bool((rank[..., -1] + 1 < num_tokens).any()):
            raise RuntimeError(
                f"assign_prefill_slots: a head needs more slots than its {self.num_slots} "
                f"(max_head_blocks={self.max_head_blocks}) can hold"
            )
        take = free & (rank < num_tokens.unsqueeze(-1))
        width = int(num_tokens.max()) if num_tokens.numel() else 0
        slots = torch.full((*num_tokens.shape, width), -1, dtype=torch.long, device=self.device)
        b, li, hi, s = take.nonzero(as_tuple=True)
        slots[b, li, hi, rank[b, li, hi, s]] = s
        last = slots.amax(dim=-1) if width else torch.full_like(num_tokens, -1)
        held = self.num_head_blocks[rows].long()
        extra = (torch.div(last, lay.block_size, rounding_mode="floor") + 1 - held).clamp_min(0)
        self._attach(rows, extra)
        return slots

    # ------------------------------------------------------------------ shrink
    def plan_shrink(
        self, rows: torch.Tensor, valid: torch.Tensor, keep_head_blocks: torch.Tensor
    ) -> ShrinkPlan:
        """Shrink heads to ``keep_head_blocks[b, L, H]`` head-blocks and release the rest.

        Live entries in the released head-blocks are planned to move into the lowest
        holes of the kept ones; the tables are updated at once and the plan returned for
        the caller to move K/V (``ops.move_entries``) and its per-entry state
        (:meth:`ShrinkPlan.apply`). Heads already at or below their target are left as
        they are (growing is lazy, through slot assignment). The caller must have
        evicted down to ``keep * block_size`` live entries first.

        Runs every ``realloc_interval`` steps, not per step; batched all the same.
        """
        rows = _as_rows(rows, self.device)
        self._check_rows(rows)
        keep = keep_head_blocks.to(self.device, torch.long)
        if bool((keep < 0).any()):
            raise ValueError(f"plan_shrink: keep_head_blocks must be >= 0, got {int(keep.min())}")
        self._check_valid(valid)
        held = self.num_head_blocks[rows].long()
        # Borrowed head-blocks stay: they hold shared prompt entries that never move.
        borrowed = self.num_borrowed[rows].long().view(-1, 1, 1)
        kept = torch.maximum(torch.minimum(held, keep), borrowed)
        live = valid[rows]
        slot = torch.arange(self.num_slots, device=self.device)
        inside = slot < kept.unsqueeze(-1) * self.layout.block_size
        movers = live & ~inside
        holes = ~live & inside
        mover_rank = movers.cumsum(dim=-1, dtype=torch.int32)  # 1-based at set positions
        hole_rank = holes.cumsum(dim=-1, dtype=torch.int32)
        num_moves = mover_rank[..., -1]
        short = num_moves > hole_rank[..., -1]
        if bool(short.any()):
            b, la, h = (int(x[0]) for x in short.nonzero(as_tuple=True))
            raise RuntimeError(
                f"plan_shrink: row {int(rows[b])} layer {la} head {h} holds "
                f"{int(live[b, la, h].sum())} live entries, more than "
                f"{int(kept[b, la, h])} head-blocks x {self.layout.block_size} slots; "
                "evict before shrinking"
            )
        width = int(num_moves.max()) if num_moves.numel() else 0
        src = self._ranked_slots(movers, mover_rank, num_moves, width)
        dst = self._ranked_slots(holes, hole_rank, num_moves, width)

        tables = self.block_tables[rows]
        position = torch.arange(self.max_head_blocks, device=self.device)
        released = (position >= kept.unsqueeze(-1)) & (tables >= 0)
        self.in_pool[tables[released].long()] = True
        self.pool_size[rows] += released.sum(dim=(1, 2, 3))
        self.block_tables[rows] = tables.masked_fill(released, -1)
        self.num_head_blocks[rows] = kept.to(torch.int32)
        self._after_mutation()
        return ShrinkPlan(rows=rows, src=src, dst=dst, block_tables=tables)

    # ------------------------------------------------------------------ observability
    def head_blocks_in_use(self) -> int:
        """Distinct head-blocks attached to some head: a shared (borrowed) prompt block
        counts once, however many rows read it."""
        owned = int(self.num_head_blocks.sum()) - int(self.num_borrowed.sum()) * (
            self.layout.heads_per_block
        )
        # Borrowed blocks whose writer still runs are among its own attached head-blocks.
        orphans = int(((self.borrowers > 0) & (self.block_owner < 0)).sum())
        return owned + orphans * self.layout.heads_per_block

    def vllm_layout(self, blocks: torch.Tensor) -> torch.Tensor:
        """``[L, H, n]`` head-block ids of vLLM blocks ``[n]`` in vLLM's own layout: head
        ``(l, h)``'s ``j``-th head-block is ``(blocks[j], l, h)``."""
        return self._all_head_blocks(blocks).permute(1, 2, 0)

    def held_head_blocks(self, rows: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Head-blocks attached to the heads of each row, ``[b]``."""
        return self.num_head_blocks[_as_rows(rows, self.device)].long().sum(dim=(1, 2))

    def pool_head_blocks(self, rows: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Head-blocks owned by each row but attached to no head, ``[b]``."""
        return self.pool_size[_as_rows(rows, self.device)].clone()

    def granted_blocks(self, rows: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """vLLM blocks granted to each row, ``[b]``."""
        return self.num_granted[_as_rows(rows, self.device)].long()

    def check_invariants(self, valid: torch.Tensor | None = None) -> None:
        """Raise ``AssertionError`` naming the first broken invariant (see module doc).

        With ``valid``, also check that no live entry lies outside its head's slots.
        """
        lay = self.layout
        held = self.num_head_blocks.long()
        if bool(((held < 0) | (held > self.max_head_blocks)).any()):
            raise AssertionError("head-block count out of [0, max_head_blocks]")
        position = torch.arange(self.max_head_blocks, device=self.device)
        attached = self.block_tables >= 0
        if not torch.equal(attached, position < held.unsqueeze(-1)):
            raise AssertionError("a block table is not dense or disagrees with its count")
        borrowed_at = position < self.num_borrowed.long().view(-1, 1, 1, 1)
        borrowed_at = borrowed_at.expand_as(attached)
        if bool((borrowed_at & ~attached).any()):
            raise AssertionError("a head lost a borrowed head-block")
        grant = self.granted[:, : self.max_head_blocks].long().clamp_min(0)
        canonical = lay.head_block_id(
            grant.view(self.max_rows, 1, 1, -1),
            self._layer.view(1, -1, 1, 1),
            self._head.view(1, 1, -1, 1),
        )
        if grant.shape[-1] < self.max_head_blocks:
            canonical = F.pad(canonical, (0, self.max_head_blocks - grant.shape[-1]), value=-1)
        if not torch.equal(self.block_tables[borrowed_at].long(), canonical[borrowed_at]):
            raise AssertionError("a borrowed head-block is not at its position in vLLM's layout")
        owned = attached & ~borrowed_at
        ids = self.block_tables[owned].long()
        if ids.unique().numel() != ids.numel():
            raise AssertionError("a head-block is attached to two heads")
        if bool(((ids < 0) | (ids >= lay.num_head_blocks)).any()):
            raise AssertionError("an attached head-block id is out of range")
        row_of = torch.arange(self.max_rows, device=self.device).view(-1, 1, 1, 1)
        row_of = row_of.expand_as(self.block_tables)[owned]
        block, _, _ = lay.split_head_block_id(ids)
        if not torch.equal(self.block_owner[block], row_of):
            raise AssertionError("a head-block is attached to a row that was not granted it")
        if bool(self.in_pool[ids].any()):
            raise AssertionError("a head-block is both attached and in the pool")

        grant_pos = torch.arange(self.max_blocks_per_row, device=self.device)
        granted_mask = self.granted >= 0
        if not torch.equal(granted_mask, grant_pos < self.num_granted.unsqueeze(-1)):
            raise AssertionError("a grant list is not dense or disagrees with num_granted")
        borrowed_grants = self._borrowed_grants(torch.arange(self.max_rows, device=self.device))
        owned_grants = granted_mask & ~borrowed_grants
        owner = torch.full_like(self.block_owner, -1)
        grant_rows = torch.arange(self.max_rows, device=self.device).unsqueeze(-1)
        owner[self.granted[owned_grants].long()] = grant_rows.expand_as(self.granted)[owned_grants]
        if not torch.equal(owner, self.block_owner):
            raise AssertionError("block_owner disagrees with the grant lists")
        borrowers = torch.bincount(self.granted[borrowed_grants].long(), minlength=lay.num_blocks)
        if not torch.equal(borrowers, self.borrowers):
            raise AssertionError("borrowers disagrees with the borrowed grants")
        all_ids = torch.arange(lay.num_head_blocks, device=self.device)
        owner_of_hb = self.block_owner[lay.split_head_block_id(all_ids)[0]]
        if bool((self.in_pool & (owner_of_hb < 0)).any()):
            raise AssertionError("an unowned head-block is in a pool")
        pool_count = torch.bincount(owner_of_hb[self.in_pool], minlength=self.max_rows)
        if not torch.equal(pool_count, self.pool_size):
            raise AssertionError("pool_size disagrees with the pooled head-blocks")
        total = held.sum(dim=(1, 2)) + self.pool_size
        if not torch.equal(total, self.num_granted.long() * lay.heads_per_block):
            raise AssertionError("attached + pooled head-blocks != granted blocks x L x H")
        if valid is not None:
            slot = torch.arange(valid.shape[-1], device=self.device)
            outside = valid & (slot >= held.unsqueeze(-1) * lay.block_size)
            if bool(outside.any()):
                raise AssertionError("a live entry lies outside its head's head-blocks")

    # ------------------------------------------------------------------ internals
    def _check_rows(self, rows: torch.Tensor) -> None:
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.max_rows):
            raise ValueError(f"row index out of range [0, {self.max_rows}): {rows.tolist()}")
        if rows.unique().numel() != rows.numel():
            raise ValueError(f"rows must be distinct: {rows.tolist()}")

    def _check_valid(self, valid: torch.Tensor) -> None:
        lay = self.layout
        expected = (self.max_rows, lay.num_layers, lay.num_kv_heads, self.num_slots)
        if valid.shape != expected or valid.dtype != torch.bool:
            raise ValueError(
                f"valid must be a bool tensor of shape [max_rows, L, H, S] = {expected}, "
                f"got {valid.dtype} {tuple(valid.shape)}"
            )

    def _borrowed_grants(self, rows: torch.Tensor) -> torch.Tensor:
        """``[b, max_blocks_per_row]``: which grant positions of ``rows`` are borrowed."""
        position = torch.arange(self.max_blocks_per_row, device=self.device)
        return position < self.num_borrowed[rows].long().unsqueeze(-1)

    def _after_mutation(self) -> None:
        if self.debug:
            self.check_invariants()

    def _all_head_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """``[n]`` vLLM block ids -> ``[n, L, H]`` head-block ids."""
        return self.layout.head_block_id(
            blocks.view(-1, 1, 1), self._layer.view(1, -1, 1), self._head.view(1, 1, -1)
        )

    @staticmethod
    def _ranked_slots(
        mask: torch.Tensor, seen: torch.Tensor, count: torch.Tensor, width: int
    ) -> torch.Tensor:
        """The first ``count`` set positions of ``mask [..., S]``, ascending, ``-1`` padded.

        ``seen`` is ``mask``'s int32 cumsum along the last dim (shared with the caller).
        """
        take = mask & (seen <= count.to(torch.int32).unsqueeze(-1))
        out = torch.full((*count.shape, width), -1, dtype=torch.long, device=mask.device)
        *lead, s = take.nonzero(as_tuple=True)
        out[(*lead, seen[(*lead, s)].long() - 1)] = s
        return out

    def _attach(self, rows: torch.Tensor, extra: torch.Tensor) -> None:
        """Append ``extra[b, L, H]`` head-blocks from each row's pool to each head's table.

        A head first takes its own head-blocks ``(granted[j], l, h)`` in grant order, so
        that until heads diverge the layout is vLLM's; what is still missing comes from
        any pooled head-block of the row, lowest (grant index, layer, head) first.
        """
        if not bool((extra > 0).any()):
            return
        held = self.num_head_blocks[rows].long()
        if bool((held + extra > self.max_head_blocks).any()):
            raise RuntimeError(
                f"a head needs more than max_head_blocks={self.max_head_blocks} head-blocks"
            )
        per_row = extra.sum(dim=(1, 2))
        short_rows = per_row > self.pool_size[rows]
        if bool(short_rows.any()):
            i = int(short_rows.nonzero()[0])
            raise PoolExhaustedError(
                f"row {int(rows[i])} needs {int(per_row[i])} more head-blocks but its pool "
                f"holds {int(self.pool_size[rows[i]])} (granted "
                f"{int(self.num_granted[rows[i]])} blocks); the scheduler's quota is too small"
            )
        bi, li, hi = (extra > 0).nonzero(as_tuple=True)
        want = extra[bi, li, hi]
        row = rows[bi]
        base = held[bi, li, hi]

        # 1. The head's own head-blocks, in grant order.
        grants = self.granted[row].long()  # [n, MBR]
        own = self.layout.head_block_id(grants, li.unsqueeze(-1), hi.unsqueeze(-1))
        # A borrowed block's head-blocks may sit in its writer's pool: never the row's.
        owned = (grants >= 0) & ~self._borrowed_grants(row)
        usable = owned & self.in_pool[own.clamp_min(0)]
        rank = usable.long().cumsum(dim=-1) - 1
        take = usable & (rank < want.unsqueeze(-1))
        n, j = take.nonzero(as_tuple=True)
        self._put(row[n], li[n], hi[n], base[n] + rank[n, j], own[n, j])
        got = take.sum(dim=-1)

        # 2. Any pooled head-block of the row, matched in order within each row.
        missing = want - got
        if bool((missing > 0).any()):
            need = missing > 0
            row_n, li_n, hi_n = row[need], li[need], hi[need]
            count, start = missing[need], (base + got)[need]
            uniq, inverse = torch.unique(row_n, return_inverse=True)
            candidates = self._all_head_blocks(self.granted[uniq].long().clamp_min(0))
            candidates = candidates.view(uniq.numel(), -1)  # [u, MBR * L * H]
            ok = (self.granted[uniq] >= 0) & ~self._borrowed_grants(uniq)
            ok = ok.repeat_interleave(self.layout.heads_per_block, dim=1)
            ok &= self.in_pool[candidates]
            per_u = torch.zeros(uniq.numel(), dtype=torch.long, device=self.device)
            per_u.index_add_(0, inverse, count)
            crank = ok.long().cumsum(dim=-1) - 1
            u, c = (ok & (crank < per_u.unsqueeze(-1))).nonzero(as_tuple=True)
            chosen = candidates[u, c]  # sorted by row group, then candidate order
            # Expand the heads by their shortfall and sort by row group to line up.
            head = torch.arange(count.numel(), device=self.device).repeat_interleave(count)
            offset = torch.arange(head.numel(), device=self.device) - (
                (count.cumsum(0) - count).repeat_interleave(count)
            )
            order = torch.sort(inverse[head], stable=True).indices
            head, offset = head[order], offset[order]
            self._put(row_n[head], li_n[head], hi_n[head], start[head] + offset, chosen)
        self.num_head_blocks[rows] += extra.to(torch.int32)
        self.pool_size[rows] -= per_row
        self._after_mutation()

    def _put(
        self,
        row: torch.Tensor,
        layer: torch.Tensor,
        head: torch.Tensor,
        position: torch.Tensor,
        head_block: torch.Tensor,
    ) -> None:
        self.block_tables[row, layer, head, position] = head_block.to(torch.int32)
        self.in_pool[head_block] = False
