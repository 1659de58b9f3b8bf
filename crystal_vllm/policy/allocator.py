"""Adaptive layer/head budget allocation (paper Algorithm 2, docs/algorithm.md §5).

Per request: ``eta_l = sum_h S[l,h] / sum_h B[l,h]`` gives layer ``l`` the share
``B_l = total * eta_l / sum_l eta_l``; within the layer, ``eta_lh = S[l,h] / B[l,h]`` gives
head ``h`` the share ``B_l * eta_lh / sum_h eta_lh``. The real-valued targets are then
clamped to ``[floor, max_per_head]`` by water-filling (one common scale on the targets, so
the result stays proportional to them wherever no bound binds) and rounded with the
largest-remainder method so that the integers sum to ``total`` exactly.

Infeasible totals (documented behaviour, never an error):

* ``total < floor * L * H``: the floor is lowered to ``total // (L * H)`` for that request.
* ``total > max_per_head * L * H``: every head gets ``max_per_head``; the sum is below
  ``total`` (the quota cannot hold more).
* A request with no utilisation at all (every ``S`` is 0) is split uniformly.
"""

from __future__ import annotations

import torch

#: Bisection steps for the water-filling scale: float64 resolves it long before this.
_BISECTION_STEPS = 64


def allocate_budgets(
    utilisation: torch.Tensor,
    budgets: torch.Tensor,
    total: torch.Tensor,
    *,
    floor_ratio: float,
    min_tokens: int,
    max_per_head: int | torch.Tensor,
) -> torch.Tensor:
    """New integer budgets ``[b, L, H]`` for ``utilisation`` ``S`` and current ``budgets``.

    ``total`` is ``[b]`` (``B * L * H`` per request); the floor per head is
    ``max(ceil(floor_ratio * total / (L * H)), min_tokens)``. ``max_per_head`` is an int or a
    ``[b]`` tensor (what the request's memory quota can hold per head).
    """
    if utilisation.shape != budgets.shape or utilisation.dim() != 3:
        raise ValueError(
            f"utilisation and budgets must both be [b, L, H], got {tuple(utilisation.shape)} "
            f"and {tuple(budgets.shape)}"
        )
    b, num_layers, num_heads = utilisation.shape
    n = num_layers * num_heads
    device = utilisation.device
    total = torch.as_tensor(total, dtype=torch.int64, device=device).expand(b)
    cap = torch.as_tensor(max_per_head, dtype=torch.int64, device=device).expand(b)
    if (total < 0).any() or (cap < 0).any():
        raise ValueError("total and max_per_head must be >= 0")

    floor = torch.minimum(head_floor(total, n, floor_ratio, min_tokens), cap)

    target = _algorithm2(utilisation.double(), budgets.double(), total.double())
    real = _water_fill(target.view(b, n), floor.double(), cap.double(), total.double())
    return _largest_remainder(real, total, cap).view(b, num_layers, num_heads)


def head_floor(total: torch.Tensor, n: int, floor_ratio: float, min_tokens: int) -> torch.Tensor:
    """The least budget per head, ``[b]``: ``max(ceil(floor_ratio * total / n), min_tokens)``,
    lowered to ``total // n`` where the total cannot give every head that much."""
    floor = torch.clamp_min(torch.ceil(floor_ratio * total.double() / n).long(), min_tokens)
    return torch.minimum(floor, total // n)


def _algorithm2(s: torch.Tensor, budgets: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Real-valued targets ``[b, L, H]`` summing to ``total`` (uniform when ``S == 0``)."""
    b_safe = budgets.clamp_min(1.0)
    eta_layer = s.sum(-1) / b_safe.sum(-1)  # [b, L]
    layer_share = _share(eta_layer, total.unsqueeze(-1))  # [b, L]
    eta_head = s / b_safe  # [b, L, H]
    head = _share(eta_head, layer_share.unsqueeze(-1))
    uniform = (total / s[0].numel()).view(-1, 1, 1).expand_as(head)
    return torch.where((eta_layer.sum(-1) > 0).view(-1, 1, 1), head, uniform)


def _share(weight: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
    """``amount * weight / sum(weight)`` along the last dim, 0 where the sum is 0."""
    denom = weight.sum(-1, keepdim=True)
    return torch.where(denom > 0, amount * weight / denom.clamp_min(1e-300), 0.0)


def _water_fill(
    weight: torch.Tensor, low: torch.Tensor, high: torch.Tensor, total: torch.Tensor
) -> torch.Tensor:
    """``clamp(scale * weight, low, high)`` per row with ``scale`` chosen so the row sums to
    ``total`` (or as close as the bounds allow); the sum is nondecreasing in ``scale``.

    Heads with zero weight would stay at ``low`` for any scale; when that leaves the row
    short, a second fill raises every head towards a common level instead.
    """
    low, high, total = low.unsqueeze(-1), high.unsqueeze(-1), total.unsqueeze(-1)
    positive = torch.where(weight > 0, weight, torch.inf).amin(-1, keepdim=True)
    hi_scale = torch.where(torch.isfinite(positive), high / positive, 0.0).clamp_min(1.0)
    filled = _bisect(lambda s: torch.minimum(torch.maximum(s * weight, low), high), hi_scale, total)
    level = _bisect(lambda s: torch.minimum(torch.maximum(s, filled), high), high, total)
    return torch.where(filled.sum(-1, keepdim=True) < total, level, filled)


def _bisect(fill, hi: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``fill(s)`` at the smallest ``s`` in ``[0, hi]`` (to float64 precision) with
    ``sum(fill(s)) >= total``, or ``fill(hi)`` when none reaches it."""
    lo = torch.zeros_like(hi)
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        enough = fill(mid).sum(-1, keepdim=True) >= total
        hi = torch.where(enough, mid, hi)
        lo = torch.where(enough, lo, mid)
    return fill(hi)


def _largest_remainder(real: torch.Tensor, total: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """Round ``real [b, n]`` down, then hand the missing units to the largest fractional parts
    (ties: lower head index) among heads still below ``cap``."""
    # The bisection may overshoot the exact solution by a few ulps: trim before flooring.
    base = torch.floor(real + 1e-9).long()
    base = torch.minimum(base, cap.unsqueeze(-1))
    missing = (total - base.sum(-1)).clamp_min(0)
    frac = torch.where(base < cap.unsqueeze(-1), real - base, -torch.inf)
    order = frac.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(real.shape[-1], device=real.device).expand_as(order)
    )
    extra = (rank < missing.unsqueeze(-1)) & (base < cap.unsqueeze(-1))
    return base + extra.long()


def converge(held: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-head budgets ``[b, L, H]`` for the next step, moving what each head ``held`` now
    toward its target without leaving budget unused and without exceeding the total.

    Every head below its target grows by one (it keeps its next token). The heads above
    theirs give up, between them, exactly what that growth would put over the targets'
    total, the largest surplus first and never more than their surplus. Every other head
    holds what it holds. So a reallocation takes effect as fast as the growing heads can
    fill, and a request never holds more than its total budget.
    """
    if held.shape != targets.shape or held.dim() != 3:
        raise ValueError(
            f"held and targets must both be [b, L, H], got {tuple(held.shape)} "
            f"and {tuple(targets.shape)}"
        )
    b = held.shape[0]
    h, t = held.reshape(b, -1), targets.reshape(b, -1).to(held.dtype)
    grow = (h < t).to(h.dtype)
    surplus = (h - t).clamp_min(0)
    over = (h.sum(-1) + grow.sum(-1) - t.sum(-1)).clamp_min(0)
    drops = _take_from_largest(surplus, torch.minimum(over, surplus.sum(-1)))
    return (h + grow - drops).view_as(held)


def _take_from_largest(surplus: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
    """Integer drops ``[b, n]`` summing to ``amount [b]`` (<= the row's surplus), that
    lower the largest surpluses first: down to a common level, ties by lower index."""
    lo = torch.zeros_like(amount)  # the level: the largest with enough above it
    hi = surplus.amax(-1) if surplus.shape[-1] else torch.zeros_like(amount)
    while bool((lo < hi).any()):
        mid = (lo + hi + 1) // 2
        enough = (surplus - mid[:, None]).clamp_min(0).sum(-1) >= amount
        lo = torch.where(enough, mid, lo)
        hi = torch.where(enough, hi, mid - 1)
    drops = (surplus - lo[:, None]).clamp_min(0)
    # Above the level every dropping head gives up one too many in total by `extra`:
    # the highest-index ones among those exactly at the level + 1 keep it.
    extra = drops.sum(-1) - amount
    at_level = surplus > lo[:, None]
    order = torch.cumsum(at_level.flip(-1).long(), -1).flip(-1)  # rank from the right
    keep_one = at_level & (order <= extra[:, None])
    return drops - keep_one.long()


def boundary_targets(
    scores: torch.Tensor,
    targets: torch.Tensor,
    *,
    move: float,
    floor: int | torch.Tensor,
    max_per_head: int | torch.Tensor,
) -> torch.Tensor:
    """New targets ``[b, L, H]`` that move budget, within each layer, from the heads whose
    weakest entries score lowest to the heads whose next victim scores highest.

    ``scores [b, L, H, S]`` is each counted entry's score (``inf`` elsewhere): LRFU's
    decayed CRF. Per layer, ``m = max(1, round(move * layer total))`` units leave the heads
    owning the layer's ``m`` lowest-scored entries (never below ``floor``) and go to the
    heads in proportion to their *boundary* score, the score of the entry they would evict
    next (largest remainder; never above ``max_per_head``). Layer totals are unchanged, so
    no layer can take another's memory (utilisation-driven Algorithm 2 gave the diffuse
    layer 0 about twice its share). Heads whose boundaries are equal keep their shares up
    to a churn of ``m`` units.
    """
    b, num_layers, num_heads, _ = scores.shape
    device = targets.device
    floor_t = torch.as_tensor(floor, device=device).expand(b).view(b, 1, 1)
    cap = torch.as_tensor(max_per_head, device=device).expand(b).view(b, 1, 1)
    counted = torch.isfinite(scores)
    held = counted.sum(-1)
    boundary = torch.where(counted, scores, torch.inf).amin(-1)
    boundary = torch.where(held > 0, boundary, 0.0).clamp_min(0.0)
    total = targets.sum(-1)  # [b, L]
    m = (move * total.double()).round().long().clamp_min(1)

    # Donors: the m lowest-scored entries of the layer, a head giving at most down to floor.
    ascending = torch.where(counted, scores, torch.inf).sort(dim=-1).values
    can_give = (targets - floor_t).clamp_min(0)
    rank = torch.arange(scores.shape[-1], device=device)
    giveable = rank < can_give.unsqueeze(-1)
    pool = torch.where(giveable, ascending, torch.inf).flatten(2)  # [b, L, H * S]
    order = pool.argsort(dim=-1, stable=True)
    first = torch.arange(pool.shape[-1], device=device) < m.unsqueeze(-1)
    taken = first & torch.isfinite(pool.gather(-1, order))
    head_of = torch.div(order, scores.shape[-1], rounding_mode="floor")
    give = torch.zeros_like(targets).scatter_add_(-1, head_of, taken.long())
    moved = give.sum(-1)  # [b, L]: what was actually freed

    # Receivers: by boundary score, largest remainder, within the cap.
    room = (cap - (targets - give)).clamp_min(0)
    weight = torch.where(room > 0, boundary.double(), 0.0)
    weight = torch.where(weight.sum(-1, keepdim=True) > 0, weight, (room > 0).double())
    share = moved.unsqueeze(-1).double() * weight / weight.sum(-1, keepdim=True).clamp_min(1e-300)
    get = torch.minimum(torch.floor(share + 1e-9).long(), room)
    missing = (moved - get.sum(-1)).unsqueeze(-1)
    frac = torch.where(get < room, share - get, -torch.inf)
    order = frac.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(num_heads, device=device).expand_as(order)
    )
    get = get + ((rank < missing) & (get < room)).long()
    # Units the cap turned away go back to their donors, never above what each gave nor,
    # for a donor that also received, above the cap.
    short = moved - get.sum(-1)
    returnable = torch.minimum(give, (cap - (targets - give + get)).clamp_min(0))
    back = _take_from_largest(returnable.view(-1, num_heads), short.view(-1)).view_as(give)
    return targets - give + get + back


def fit_blocks(
    targets: torch.Tensor,
    fixed: torch.Tensor,
    *,
    block_size: int,
    capacity: torch.Tensor,
    floor: int | torch.Tensor,
) -> torch.Tensor:
    """Integer targets ``[b, L, H]`` whose heads fit ``capacity [b]`` blocks of
    ``block_size`` entries, with the same per-request total.

    A head needs ``ceil((fixed + target) / block_size)`` blocks (``fixed``: the entries it
    holds outside the budget, e.g. its kept prompt). When the request needs more blocks
    than it has, the heads whose last block is least used give it up (their target drops
    to the block boundary, never below ``floor``) and the entries they gave up go to the
    room left in other heads' last blocks. Rows that cannot be fitted so get a uniform
    split, which always fits (it is what the capacity was sized for).
    """
    b = targets.shape[0]
    out = targets.clone()
    flat, fixed_flat = out.view(b, -1), fixed.reshape(b, -1)
    floor_t = torch.as_tensor(floor, device=targets.device).expand(b)
    for i in range(b):
        t, f = flat[i], fixed_flat[i]
        excess = int((-torch.div(-(t + f), block_size, rounding_mode="floor")).sum()) - int(
            capacity[i]
        )
        if excess <= 0:
            continue
        used = (t + f) % block_size  # entries in the last, partial block (0: full)
        cheap = (used > 0) & (t - used >= floor_t[i])
        if int(cheap.sum()) < excess:
            flat[i] = _uniform(int(t.sum()), t.numel(), t)
            continue
        order = torch.where(cheap, used, block_size + 1).argsort(stable=True)[:excess]
        freed = int(used[order].sum())
        t[order] -= used[order]
        rest = torch.ones_like(cheap)
        rest[order] = False
        room = torch.where(rest & (used > 0), block_size - used, 0)
        # The strongest heads (largest targets) get the freed entries first.
        by_size = torch.where(room > 0, t, -1).argsort(descending=True, stable=True)
        fill = room[by_size].cumsum(0)
        add = (freed - (fill - room[by_size])).clamp(min=0)
        t[by_size] += torch.minimum(add, room[by_size])
    return out


def _uniform(total: int, n: int, like: torch.Tensor) -> torch.Tensor:
    base = torch.full_like(like, total // n)
    base[: total % n] += 1
    return base


def fit_growth(
    budgets: torch.Tensor,
    next_held: torch.Tensor,
    fixed: torch.Tensor,
    targets: torch.Tensor,
    *,
    block_size: int,
    capacity: torch.Tensor,
) -> torch.Tensor:
    """``budgets [b, L, H]`` (from :func:`converge`) with the growth that would need more
    blocks than the request has held back: a head that would start a new block grows
    only when a block is free. Meanwhile every head of that request above its target
    shrinks by one more per step, so that one of them frees a block within
    ``block_size`` steps (otherwise a request whose blocks are exactly full would keep
    its old split for ever: :func:`converge` shrinks the heads above their targets only
    as fast as the others grow)."""
    b = budgets.shape[0]
    need = -torch.div(-(budgets + fixed).view(b, -1), block_size, rounding_mode="floor")
    excess = need.sum(-1) - capacity
    if not bool((excess > 0).any()):
        return budgets
    nh = next_held.view(b, -1)
    starts_block = (budgets.view(b, -1) > nh) & ((nh + fixed.view(b, -1)) % block_size == 0)
    rank = starts_block.long().cumsum(-1)
    hold = starts_block & (rank <= excess.clamp_min(0).unsqueeze(-1))
    fitted = torch.where(hold, nh, budgets.view(b, -1))
    shrink = hold.any(-1, keepdim=True) & (fitted > targets.reshape(b, -1))
    return (fitted - shrink.long()).view_as(budgets)
