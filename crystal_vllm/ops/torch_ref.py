"""Reference implementation of the per-head paged KV operations in plain torch.

This is the oracle the faster implementations (C++, Triton) are tested against, so it
favours obvious correctness over speed: it is batched (no Python loop over requests,
layers or heads) but gathers whole head-blocks and validates its inputs, which costs a
host sync on accelerators.

Shared conventions (see ``crystal_vllm.cache.layout``):

* ``kv_pool``: ``[num_head_blocks, 2, block_size, head_dim]``, index 0 of dim 1 is K,
  index 1 is V. Any floating dtype.
* ``block_tables``: int32/int64 head-block ids, ``-1`` marks an unused entry. Slot ``s``
  of a head lives in head-block ``block_tables[..., s // block_size]`` at offset
  ``s % block_size``.
* Slot tensors (``slots``, ``src``, ``dst``) are integer tensors; a negative slot means
  "padding, skip this position".
"""

from __future__ import annotations

import torch

__all__ = [
    "first_free_slots",
    "gather_kv",
    "move_entries",
    "paged_decode_attention",
    "write_kv",
]


def _check_pool(kv_pool: torch.Tensor) -> int:
    if kv_pool.dim() != 4 or kv_pool.shape[1] != 2:
        raise ValueError(
            "kv_pool must have shape [num_head_blocks, 2, block_size, head_dim], "
            f"got {tuple(kv_pool.shape)}"
        )
    return kv_pool.shape[2]


def _slot_to_head_block(
    block_tables: torch.Tensor, slots: torch.Tensor, block_size: int, what: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Map slots ``[..., n]`` through ``block_tables [..., MB]`` (same leading dims).

    Returns ``(mask, head_block, offset)`` where ``mask`` marks the non-padding slots.
    Raises if a non-padding slot is out of range or falls into an unused table entry,
    since writing there would silently corrupt another head's memory.
    """
    num_slots = block_tables.shape[-1] * block_size
    mask = slots >= 0
    if bool((slots >= num_slots).any()):
        raise ValueError(
            f"{what}: slot {int(slots.max())} is out of range; the block table has "
            f"{block_tables.shape[-1]} entries of {block_size} slots = {num_slots} slots"
        )
    safe = slots.clamp_min(0).long()
    head_block = block_tables.long().gather(-1, safe // block_size)
    if bool((mask & (head_block < 0)).any()):
        raise ValueError(f"{what}: a slot falls into an unassigned (-1) block-table entry")
    return mask, head_block, safe % block_size


def _gather(kv_pool: torch.Tensor, block_tables: torch.Tensor, which: int) -> torch.Tensor:
    """K (``which=0``) or V (1) of ``[..., MB]`` head-blocks as ``[..., MB * bs, D]``.

    Unused (``-1``) entries read head-block 0; callers mask them.
    """
    blocks = kv_pool[:, which][block_tables.long().clamp_min(0)]  # [..., MB, bs, D]
    return blocks.flatten(-3, -2)


def write_kv(
    kv_pool: torch.Tensor,
    block_tables: torch.Tensor,
    slots: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
) -> None:
    """Scatter ``T`` new tokens per KV head of one layer into their slots, in place.

    Args:
        kv_pool: ``[num_head_blocks, 2, block_size, D]``.
        block_tables: ``[b, H, MB]`` head-block ids of this layer.
        slots: ``[b, H, T]`` destination slot of token ``t`` for head ``h``; ``< 0`` skips.
        key, value: ``[b, T, H, D]`` (the layout projections produce); cast to the pool
            dtype.

    Two non-padding entries must not name the same (head, slot): the result would depend
    on scatter order.
    """
    block_size = _check_pool(kv_pool)
    b, h, _ = block_tables.shape
    if slots.shape[:2] != (b, h) or key.shape != value.shape:
        raise ValueError(
            f"write_kv: shapes disagree: block_tables {tuple(block_tables.shape)}, "
            f"slots {tuple(slots.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
        )
    expected = (b, slots.shape[2], h, kv_pool.shape[3])
    if key.shape != expected:
        raise ValueError(
            f"write_kv: key must have shape [b, T, H, D] = {expected}, got {tuple(key.shape)}"
        )
    mask, head_block, offset = _slot_to_head_block(block_tables, slots, block_size, "write_kv")
    hb, off = head_block[mask], offset[mask]
    kv_pool[hb, 0, off] = key.transpose(1, 2)[mask].to(kv_pool.dtype)
    kv_pool[hb, 1, off] = value.transpose(1, 2)[mask].to(kv_pool.dtype)


def gather_kv(
    kv_pool: torch.Tensor, block_tables: torch.Tensor, num_slots: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the K and V of every slot: ``[..., MB]`` tables -> two ``[..., S, D]`` tensors.

    ``S`` is ``num_slots`` (default ``MB * block_size``, at most that). Slots of unused
    (``-1``) table entries read as zeros; slots that are merely free read whatever was
    last written there, so callers must apply their own validity mask.
    """
    block_size = _check_pool(kv_pool)
    capacity = block_tables.shape[-1] * block_size
    if num_slots is None:
        num_slots = capacity
    if not 0 <= num_slots <= capacity:
        raise ValueError(f"gather_kv: num_slots={num_slots} must be in [0, {capacity}]")
    tables = block_tables[..., : -(-num_slots // block_size)]
    unused = (tables < 0).repeat_interleave(block_size, dim=-1)[..., :num_slots, None]
    keys = _gather(kv_pool, tables, 0)[..., :num_slots, :].masked_fill_(unused, 0)
    values = _gather(kv_pool, tables, 1)[..., :num_slots, :].masked_fill_(unused, 0)
    return keys, values


def paged_decode_attention(
    query: torch.Tensor,
    kv_pool: torch.Tensor,
    block_tables: torch.Tensor,
    valid: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-token attention over each KV head's own paged entries, plus the probabilities.

    Args:
        query: ``[b, Hq, D]``; query head ``q`` reads KV head ``q // (Hq // H)`` (GQA).
        kv_pool: ``[num_head_blocks, 2, block_size, D]``.
        block_tables: ``[b, H, MB]`` head-block ids of this layer.
        valid: ``[b, H, S]`` bool, which slots hold a live entry. ``S <= MB * block_size``
            and only the first ``S`` slots are considered (a caller that knows every head
            holds fewer entries can pass a narrower mask to save work).
        scale: multiplier of ``q . k`` (usually ``head_dim ** -0.5``).

    Returns:
        ``out [b, Hq, D]`` in the query dtype and ``probs [b, Hq, S]`` in float32: the
        softmax over the valid slots of the head, exactly 0 on invalid slots. A head with
        no valid slot gives an all-zero output and all-zero probabilities. Scores,
        softmax and the weighted sum of V are computed in float32.
    """
    block_size = _check_pool(kv_pool)
    b, hq, d = query.shape
    _, h, mb = block_tables.shape
    s = valid.shape[-1]
    if block_tables.shape[0] != b or valid.shape != (b, h, s) or kv_pool.shape[3] != d:
        raise ValueError(
            f"paged_decode_attention: shapes disagree: query {tuple(query.shape)}, "
            f"kv_pool {tuple(kv_pool.shape)}, block_tables {tuple(block_tables.shape)}, "
            f"valid {tuple(valid.shape)}"
        )
    if hq % h:
        raise ValueError(f"paged_decode_attention: {hq} query heads is not a multiple of {h}")
    if s > mb * block_size:
        raise ValueError(
            f"paged_decode_attention: valid has {s} slots, more than the table's "
            f"{mb} x {block_size} = {mb * block_size}"
        )
    needed = -(-s // block_size)
    tables = block_tables[..., :needed]
    padded = torch.nn.functional.pad(valid, (0, needed * block_size - s))
    if bool((padded.view(b, h, needed, block_size).any(-1) & (tables < 0)).any()):
        raise ValueError("paged_decode_attention: a valid slot lies in an unassigned head-block")

    # Both gathers return fresh tensors (float() copies or is a no-op on them), so the
    # in-place masking below never touches the pool.
    k = _gather(kv_pool, tables, 0)[:, :, :s].float()  # [b, H, S, D]
    v = _gather(kv_pool, tables, 1)[:, :, :s].float()
    # Zero dead values: free memory may hold NaN/inf bit patterns and 0 * NaN is NaN.
    # Dead keys need no care: their scores are overwritten with -inf.
    v.masked_fill_(~valid.unsqueeze(-1), 0.0)
    q = query.float().view(b, h, hq // h, d)
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)  # [b, H, G, S]
    scores.masked_fill_(~valid.unsqueeze(2), float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    probs = scores.sub_(row_max).exp_()  # exp(-inf) == 0 exactly
    probs.div_(probs.sum(dim=-1, keepdim=True).clamp_min_(torch.finfo(torch.float32).tiny))
    out = torch.matmul(probs, v)
    return out.reshape(b, hq, d).to(query.dtype), probs.reshape(b, hq, s)


def move_entries(
    kv_pool: torch.Tensor, block_tables: torch.Tensor, src: torch.Tensor, dst: torch.Tensor
) -> None:
    """Apply a compaction plan: copy K/V of slot ``src`` to slot ``dst`` per head, in place.

    Args:
        kv_pool: ``[num_head_blocks, 2, block_size, D]``.
        block_tables: ``[..., MB]`` tables that were current when the plan was made (the
            source head-blocks may already have been released by the bookkeeping).
        src, dst: ``[..., M]`` slot pairs with the tables' leading dims; ``-1`` pads
            (both must be padding at the same positions).

    All sources are read before any destination is written, so a plan whose sources and
    destinations overlap still behaves like a simultaneous move.
    """
    block_size = _check_pool(kv_pool)
    if src.shape != dst.shape or src.shape[:-1] != block_tables.shape[:-1]:
        raise ValueError(
            f"move_entries: shapes disagree: block_tables {tuple(block_tables.shape)}, "
            f"src {tuple(src.shape)}, dst {tuple(dst.shape)}"
        )
    if not torch.equal(src >= 0, dst >= 0):
        raise ValueError("move_entries: src and dst must be padded (-1) at the same positions")
    mask, src_hb, src_off = _slot_to_head_block(block_tables, src, block_size, "move_entries")
    _, dst_hb, dst_off = _slot_to_head_block(block_tables, dst, block_size, "move_entries")
    moved = kv_pool[src_hb[mask], :, src_off[mask]]  # [n, 2, D]
    kv_pool[dst_hb[mask], :, dst_off[mask]] = moved


def first_free_slots(valid: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The lowest free slot of every head of ``rows``: ``valid [R, L, H, S]`` bool,
    ``rows [b]`` -> ``[b, L, H]`` int64, ``-1`` where every slot is live."""
    has_free, slot = (~valid[rows]).view(torch.uint8).max(dim=-1)  # first maximal index
    return torch.where(has_free.bool(), slot, -1)
