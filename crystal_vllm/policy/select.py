"""Vectorised building blocks shared by the policies: GQA reduction, masked writes, and
picking the lowest-ranked entries per head with per-head counts.

Everything works on ``[..., S]`` tensors with one independent problem per leading index and
contains no Python loop over rows, layers, heads or slots.
"""

from __future__ import annotations

from typing import Any

import torch

#: Largest per-head eviction count handled by repeated arg-min instead of a full sort. In
#: steady state a head evicts one entry per step, and a few masked reductions are an order of
#: magnitude cheaper than sorting every head's slots.
FAST_PATH_MAX_EVICT = 4

GQA_REDUCE_MODES = ("mean", "max")


def gqa_reduce(probs: torch.Tensor, num_kv_heads: int, mode: str) -> torch.Tensor:
    """Combine the ``G`` query heads of each KV head into one distribution.

    ``probs`` is ``[..., Hq, S]`` with query head ``q`` belonging to KV head ``q // G``.
    ``mean`` averages the group's softmax probabilities (still a distribution); ``max``
    max-pools them and renormalises so that the top-p threshold keeps its meaning.
    """
    hq = probs.shape[-2]
    if hq % num_kv_heads:
        raise ValueError(f"{hq} query heads are not a multiple of {num_kv_heads} KV heads")
    if probs.dtype not in (torch.float32, torch.float64):
        probs = probs.float()
    if hq == num_kv_heads:
        return probs
    grouped = probs.unflatten(-2, (num_kv_heads, hq // num_kv_heads))
    if mode == "mean":
        return grouped.mean(-2)
    if mode == "max":
        pooled = grouped.amax(-2)
        total = pooled.sum(-1, keepdim=True)
        return torch.where(total > 0, pooled / total.clamp_min(torch.finfo(pooled.dtype).tiny), 0)
    raise ValueError(f"gqa_reduce must be one of {GQA_REDUCE_MODES}, got {mode!r}")


def row_index(rows: torch.Tensor, num_rows: int) -> torch.Tensor | slice:
    """``rows`` as an index; ``slice(None)`` when it is every row in order, so reads are
    views instead of gathers and writes need no scatter (the common all-rows step)."""
    if rows.numel() == num_rows and bool(
        (rows == torch.arange(num_rows, device=rows.device)).all()
    ):
        return slice(None)
    return rows


def masked_update(field: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor, value: Any) -> None:
    """``field[rows] = where(mask, value, field[rows])`` in place, for fields with extra dims.

    ``mask`` is ``[b, L, H, S]``; a field with trailing dims (``[R, L, H, S, W]``) has the
    mask broadcast over them.
    """
    index = row_index(rows, field.shape[0])
    current = field[index]
    m = mask.view(mask.shape + (1,) * (current.dim() - mask.dim()))
    if isinstance(index, slice) and not isinstance(value, torch.Tensor):
        current.masked_fill_(m, value)  # `current` is a view: update in place
        return
    if not isinstance(value, torch.Tensor):
        value = torch.tensor(value, dtype=field.dtype, device=field.device)
    field[index] = torch.where(m, value.to(field.dtype), current)


def recency_key(primary: torch.Tensor, secondary: torch.Tensor) -> torch.Tensor:
    """Pack a non-negative int ``primary`` (< 2**31) and ``secondary`` (< 2**32) into one
    int64 whose order is lexicographic (primary, secondary)."""
    return (primary << 32) | secondary


def select_lowest(
    primary: torch.Tensor,
    secondary: torch.Tensor,
    candidates: torch.Tensor,
    count: torch.Tensor,
) -> torch.Tensor:
    """Mark, per problem, the ``count`` lowest candidates by ``(primary, secondary)``.

    ``primary`` is a float score, ``secondary`` an int64 tie-break that must be unique among
    a problem's candidates (so the result is a strict, device-independent order). ``count``
    has the leading shape and is clamped to the number of candidates.
    """
    count = torch.minimum(count, candidates.sum(-1))
    most = int(count.max()) if count.numel() else 0
    if most == 0:
        return torch.zeros_like(candidates)
    if most <= FAST_PATH_MAX_EVICT:
        return _select_lowest_iterative(primary, secondary, candidates, count, most)
    return _select_lowest_sorted(primary, secondary, candidates, count)


def _select_lowest_iterative(
    primary: torch.Tensor,
    secondary: torch.Tensor,
    candidates: torch.Tensor,
    count: torch.Tensor,
    most: int,
) -> torch.Tensor:
    """``most`` rounds of a lexicographic arg-min (``most`` is a small constant)."""
    inf = torch.tensor(float("inf"), dtype=primary.dtype, device=primary.device)
    big = torch.iinfo(torch.int64).max
    picked = torch.zeros_like(candidates)
    remaining = candidates.clone()
    for i in range(most):
        score = torch.where(remaining, primary, inf)
        lowest = score.amin(-1, keepdim=True)
        tied = remaining & (score == lowest)
        j = torch.where(tied, secondary, big).argmin(-1, keepdim=True)
        take = (count > i).unsqueeze(-1)
        hit = torch.zeros_like(candidates).scatter_(-1, j, take)
        picked |= hit
        remaining &= ~hit
    return picked


def _select_lowest_sorted(
    primary: torch.Tensor,
    secondary: torch.Tensor,
    candidates: torch.Tensor,
    count: torch.Tensor,
) -> torch.Tensor:
    """Rank every candidate with two stable sorts (secondary, then primary)."""
    rank = ascending_rank(primary, secondary, candidates)
    return candidates & (rank < count.unsqueeze(-1))


def ascending_rank(
    primary: torch.Tensor, secondary: torch.Tensor, candidates: torch.Tensor
) -> torch.Tensor:
    """Rank (0 = lowest) of each slot by ``(primary, secondary)``; non-candidates rank last."""
    inf = torch.tensor(float("inf"), dtype=primary.dtype, device=primary.device)
    big = torch.iinfo(torch.int64).max
    order = torch.where(candidates, secondary, big).argsort(dim=-1, stable=True)
    p = torch.where(candidates, primary, inf).gather(-1, order)
    order = order.gather(-1, p.argsort(dim=-1, stable=True))
    return inverse_permutation(order)


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """``rank`` such that ``rank[..., order[..., i]] == i``."""
    iota = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, iota)
