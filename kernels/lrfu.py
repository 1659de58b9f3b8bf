"""The fused LRFU decode step of one layer (policies ``crystal``, ``crystal-lite``, ``lru``).

Three launches per layer: the K/V write with the policy-state insert of the new entry
(:mod:`.write_kv`), attention stage 1 over the state's own validity mask (:mod:`.attention`),
and :func:`_lrfu_kernel`, one program per (request, KV head) holding the head's whole slot
range in registers, which

1. combines the attention splits into the output, and the softmax max/sum;
2. rebuilds the head's probabilities from the saved scores and reduces its ``G`` query
   heads to one distribution (mean, or max then renormalise), never writing them out;
3. marks the top-p hits exactly (see :func:`top_p_hits`);
4. applies ``crf = lam**(t - tau) * crf + 1, tau = t`` to hits not yet rewarded at ``t``;
5. evicts the lowest decayed CRF (ties: smaller ``tau``, then smaller position) down to
   ``max(budget, #entries born at t)``, never an entry born at ``t`` (see
   :func:`lowest_entries`), and resets the victims' slots to the state's EMPTY values.

``lam**age`` is read from tables computed once per ``(lam, device)`` with the same
``torch.pow(lam, age)`` call the policy library makes, so decayed scores equal the
reference's on the same device; ages of 65,536 steps and more use the product of two
table entries (within an ulp or two of ``torch.pow``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .attention import attention_partials, combine_splits, store_output
from .common import (
    ERR_BAD_SLOT,
    ERR_OUT_OF_RANGE,
    ERR_UNASSIGNED,
    FLOAT32_TINY,
    INTERPRETED,
    next_power_of_2,
)
from .write_kv import write_kv

#: ``lam**age`` = ``low[age % 2**DECAY_LOW_BITS] * high[age >> DECAY_LOW_BITS]``.
DECAY_LOW_BITS = 16
DECAY_HIGH_LEN = 1 << 15  # every int32 age


@functools.cache
def decay_tables(lam: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``lam**age`` for ``age < 2**16`` and for multiples of ``2**16`` (float32)."""
    low = torch.arange(1 << DECAY_LOW_BITS, dtype=torch.float32, device=device)
    high = torch.arange(DECAY_HIGH_LEN, dtype=torch.float32, device=device) * (1 << DECAY_LOW_BITS)
    return torch.pow(lam, low), torch.pow(lam, high)


@triton.jit
def kth_smallest(key, mask, k):
    """The smallest ``x`` with ``#{mask & key <= x} >= k``, for ``1 <= k <= #mask``
    (``key`` int32 in ``(-2**31, 2**31)``): a bisection over the key range, one count per
    step, with the common ``k == 1`` (minimum) and ``k == #mask`` (maximum) answered at
    once."""
    big = 0x7FFFFFFF
    smallest = tl.min(tl.where(mask, key, big))
    largest = tl.max(tl.where(mask, key, -big))
    n = tl.sum(mask.to(tl.int32))
    lo = tl.where(k >= n, largest - 1, smallest - 1)  # fewer than k keys are <= lo
    hi = tl.where(k == 1, smallest, largest)  # at least k keys are <= hi
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        enough = tl.sum((mask & (key <= mid)).to(tl.int32)) >= k
        hi = tl.where(enough, mid, hi)
        lo = tl.where(enough, lo, mid)
    return hi


@triton.jit
def top_p_hits(p, valid, position, top_p):
    """The reference's top-p mask (:func:`crystal_vllm.policy.topp.top_p_mask`), ``top_p < 1``.

    In the order (probability desc, position desc) an entry is a hit iff the mass before it
    is ``< top_p * total``, so the hits are a prefix of that order. Its last probability
    ``v`` is the smallest one whose mass strictly above stays under the threshold: a
    bisection over the float32 bit patterns (non-negative floats order like their bits),
    about 30 reductions. Entries above ``v`` are hits; of the entries equal to ``v``, the
    ``c`` most recent are, ``c`` found by a bisection over the count. Masses are summed in
    float64 and rounded, as the reference's cumulative sum is on the CPU.
    """
    p = tl.where(valid, p, 0.0)
    total = tl.sum(p.to(tl.float64)).to(tl.float32)
    threshold = top_p * total
    bits = p.to(tl.int32, bitcast=True)
    hit = tl.zeros_like(valid)  # a head whose probabilities are all 0 has no hits
    if threshold > 0:
        lo = tl.full([], 0, tl.int32)  # the mass above 0 is the total: not under it
        hi = tl.max(bits)  # nothing is above the largest
        while hi - lo > 1:
            mid = lo + (hi - lo) // 2
            above = tl.sum(tl.where(bits > mid, p, 0.0).to(tl.float64)).to(tl.float32)
            under = above < threshold
            hi = tl.where(under, mid, hi)
            lo = tl.where(under, lo, mid)
        above_v = bits > hi
        tied = valid & (bits == hi)
        mass = tl.sum(tl.where(above_v, p, 0.0).to(tl.float64))
        v = hi.to(tl.float32, bitcast=True).to(tl.float64)
        # The r-th tied entry (latest position first) is a hit iff mass + r * v < threshold;
        # r = 0 is one by the choice of v.
        r_lo = tl.full([], 0, tl.int32)
        r_hi = tl.sum(tied.to(tl.int32))
        while r_hi - r_lo > 1:
            mid = r_lo + (r_hi - r_lo) // 2
            under = (mass + mid.to(tl.float64) * v).to(tl.float32) < threshold
            r_lo = tl.where(under, mid, r_lo)
            r_hi = tl.where(under, r_hi, mid)
        newest = -kth_smallest(-position, tied, r_lo + 1)
        hit = valid & (above_v | (tied & (position >= newest)))
    return hit


@triton.jit
def lowest_entries(score, tau, position, candidates, k):
    """The ``k`` candidates lowest by ``(score, tau, position)``; ``score`` float32 >= 0.

    Three exact selections: the ``k``-th smallest score (by bit pattern), then among the
    entries at that score the remaining count by ``tau``, then by position (unique per
    head, so the count comes out exact).
    """
    victim = tl.zeros_like(candidates)
    if k > 0:
        key = score.to(tl.int32, bitcast=True)
        x = kth_smallest(key, candidates, k)
        below = candidates & (key < x)
        tied = candidates & (key == x)
        k_tau = k - tl.sum(below.to(tl.int32))
        y = kth_smallest(tau, tied, k_tau)
        below_tau = tied & (tau < y)
        tied_tau = tied & (tau == y)
        k_pos = k_tau - tl.sum(below_tau.to(tl.int32))
        z = kth_smallest(position, tied_tau, k_pos)
        victim = below | below_tau | (tied_tau & (position <= z))
    return victim


@triton.jit
def _lrfu_kernel(
    scores_ptr,
    stride_sb,
    stride_sh,
    m_ptr,
    l_ptr,
    acc_ptr,
    num_splits,
    out_ptr,
    stride_ob,
    stride_oh,
    rows_ptr,
    step_ptr,
    valid_ptr,
    position_ptr,
    born_ptr,
    crf_ptr,
    tau_ptr,
    prompt_ptr,
    stride_er,
    stride_eh,
    stride_es,
    budget_ptr,
    stride_bb,
    stride_bh,
    evicted_ptr,
    decay_low_ptr,
    decay_high_ptr,
    err_ptr,
    top_p,
    recent_window,
    num_kv_heads,
    num_slots,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    S_PAD: tl.constexpr,
    LOW_BITS: tl.constexpr,
    GQA_MAX: tl.constexpr,
    PROTECT_PROMPT: tl.constexpr,
    ALL_HITS: tl.constexpr,
    TINY: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    bh = tl.program_id(0)
    i = bh // num_kv_heads
    h = bh % num_kv_heads
    row = tl.load(rows_ptr + i).to(tl.int64)
    # Steps and positions are held as int32 (they stay below 2**31): half the registers
    # of int64, and the whole head's slots live in registers.
    t = tl.load(step_ptr + row).to(tl.int32)

    m_max, total, acc = combine_splits(m_ptr, l_ptr, acc_ptr, bh, num_splits, GP, BLOCK_D)
    store_output(
        out_ptr, stride_ob, stride_oh, i, h, acc, total, G, GP, D, BLOCK_D, TINY, INTERPRET
    )
    # After a flagged input the step stops where the reference raises: after the insert.
    errors = tl.load(err_ptr + ERR_UNASSIGNED) + tl.load(err_ptr + ERR_OUT_OF_RANGE)
    ok = errors + tl.load(err_ptr + ERR_BAD_SLOT) == 0

    offs = tl.arange(0, S_PAD)
    inside = offs < num_slots
    entry = row * stride_er + h * stride_eh + offs * stride_es
    valid = tl.load(valid_ptr + entry, mask=inside, other=0) != 0
    position = tl.load(position_ptr + entry, mask=inside, other=-1).to(tl.int32)

    # This step's probabilities of the head, GQA-reduced (policy.select.gqa_reduce).
    g = tl.arange(0, GP)
    denominator = tl.maximum(total, TINY)
    head_scores = scores_ptr + i.to(tl.int64) * stride_sb + (h * G) * stride_sh
    p = tl.zeros([S_PAD], tl.float32)
    for q in tl.static_range(G):
        m_q = tl.sum(tl.where(g == q, m_max, 0.0))
        den_q = tl.sum(tl.where(g == q, denominator, 0.0))
        s = tl.load(head_scores + q * stride_sh + offs, mask=inside, other=float("-inf"))
        p_q = tl.exp(s - m_q) / den_q
        p = tl.maximum(p, p_q) if GQA_MAX else p + p_q
    if G > 1:
        if GQA_MAX:
            pooled = tl.sum(p)
            p = tl.where(pooled > 0, p / tl.maximum(pooled, TINY), 0.0)
        else:
            p = p / G

    hit = valid if ALL_HITS else top_p_hits(p, valid, position, top_p)

    tau = tl.load(tau_ptr + entry, mask=inside, other=0).to(tl.int32)
    crf = tl.load(crf_ptr + entry, mask=inside, other=0.0)
    age = tl.maximum(t - tau, 0)
    decay = tl.load(decay_low_ptr + (age & ((1 << LOW_BITS) - 1)))
    decay = decay * tl.load(decay_high_ptr + (age >> LOW_BITS))
    decayed = crf * decay
    rewarded = hit & (tau != t)
    crf = tl.where(rewarded, decayed + 1.0, crf)
    tau = tl.where(rewarded, t, tau)
    score = tl.where(rewarded, crf, decayed)  # lam**0 == 1

    born = tl.load(born_ptr + entry, mask=inside, other=0).to(tl.int32)
    # Protected prompt entries are attended and rewarded, never counted nor evicted.
    decoded = tl.load(prompt_ptr + entry, mask=inside, other=0) == 0
    counted = valid
    if PROTECT_PROMPT:
        counted = valid & decoded
    budget = tl.load(budget_ptr + i.to(tl.int64) * stride_bb + h * stride_bh)
    # Recent (never evicted): born at t, or a decode entry of the last min(window, budget)
    # steps.
    window = tl.maximum(tl.minimum(budget, recent_window), 1).to(tl.int32)
    recent = counted & ((born == t) | (decoded & (born > t - window)))
    keep = tl.maximum(budget, tl.sum(recent.to(tl.int32)))
    candidates = counted & ~recent
    excess = tl.sum(counted.to(tl.int32)) - keep
    excess = tl.minimum(tl.maximum(excess, 0), tl.sum(candidates.to(tl.int32)))
    victim = lowest_entries(score, tau, position, candidates, excess)

    # tl.where rather than `& ok`: the interpreter mis-broadcasts a scalar bool operand.
    changed = tl.where(ok, (rewarded | victim) & inside, False)
    tl.store(crf_ptr + entry, tl.where(victim, 0.0, crf), mask=changed)
    tl.store(tau_ptr + entry, tl.where(victim, 0, tau), mask=changed)
    gone = tl.where(ok, victim & inside, False)
    tl.store(valid_ptr + entry, 0, mask=gone)
    tl.store(position_ptr + entry, -1, mask=gone)
    tl.store(born_ptr + entry, 0, mask=gone)
    tl.store(prompt_ptr + entry, 0, mask=gone)
    evicted = tl.where(ok, tl.sum(victim.to(tl.int32)), 0)
    tl.store(evicted_ptr + i * num_kv_heads + h, evicted)


def lrfu_decode_step(
    state: dict[str, torch.Tensor],
    rows: torch.Tensor,
    slots: torch.Tensor,
    budgets: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_pool: torch.Tensor,
    tables: torch.Tensor,
    scale: float,
    *,
    lam: float,
    top_p: float,
    gqa_max: bool,
    protect_prompt: bool,
    recent_window: int,
    errors: torch.Tensor,
    split_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's step; see :func:`crystal_vllm.ops.fused_lrfu_decode` (its oracle is the
    policy's generic step, :meth:`crystal_vllm.policy.KVPolicy.decode_layer`).

    ``state`` holds the layer's ``[R, H, S]`` views (``valid``, ``position``, ``born``,
    ``crf``, ``tau``, ``prompt``; equal strides, bools viewed as uint8), ``step [R]`` and
    ``positions [b]``; ``tables`` is the layer's ``[R, H, MB]`` view. Inputs are trusted
    to have the reference's shapes and dtypes; bad values are flagged in ``errors``.
    Returns ``(out [b, Hq, D], evicted [b, H] int32)``.
    """
    b, num_kv_heads = slots.shape
    num_slots = state["valid"].shape[2]
    write_kv(
        kv_pool,
        tables,
        slots[:, :, None],
        key[:, None],
        value[:, None],
        errors,
        rows=rows,
        state=state,
    )
    parts = attention_partials(
        query,
        kv_pool,
        tables,
        state["valid"],
        scale,
        errors,
        rows=rows,
        split_size=split_size,
    )
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    evicted = torch.zeros(b, num_kv_heads, dtype=torch.int32, device=query.device)
    if b * num_kv_heads == 0:
        return out, evicted
    decay_low, decay_high = decay_tables(float(lam), kv_pool.device)
    s_pad = next_power_of_2(num_slots, 16)
    valid = state["valid"]
    _lrfu_kernel[(b * num_kv_heads,)](
        parts.scores,
        parts.scores.stride(0),
        parts.scores.stride(1),
        parts.m,
        parts.l,
        parts.acc,
        parts.plan.num_splits,
        out,
        out.stride(0),
        out.stride(1),
        rows,
        state["step"],
        valid,
        state["position"],
        state["born"],
        state["crf"],
        state["tau"],
        state["prompt"],
        valid.stride(0),
        valid.stride(1),
        valid.stride(2),
        budgets,
        budgets.stride(0),
        budgets.stride(1),
        evicted,
        decay_low,
        decay_high,
        errors,
        float(top_p),
        int(recent_window),
        num_kv_heads,
        num_slots,
        G=parts.group,
        GP=parts.group_padded,
        D=query.shape[2],
        BLOCK_D=parts.block_d,
        S_PAD=s_pad,
        LOW_BITS=DECAY_LOW_BITS,
        GQA_MAX=gqa_max,
        PROTECT_PROMPT=protect_prompt,
        ALL_HITS=top_p >= 1.0,
        TINY=FLOAT32_TINY,
        INTERPRET=INTERPRETED,
        # 4 to 8 slots per thread: 2048 slots compile without spills for sm_90, 4096 spill
        # about 28 registers per thread to local memory (cuobjdump).
        num_warps=min(16, max(4, s_pad // 128)),
        # No fused multiply-add: `crf * decay + 1` rounds twice, like the reference.
        enable_fp_fusion=False,
    )
    return out, evicted
