"""Paged decode attention over per-head block tables, with the per-entry probabilities.

Flash-decoding in two kernels:

1. :func:`_partial_kernel`, one program per (request, KV head, split of the slots): all
   ``G`` query heads of the KV head at once (padded to a power of two, >= 16 for tensor
   cores, and masked, so any GQA ratio works), the slots of its split in tiles of
   ``BLOCK_N``, each slot's head-block looked up in the head's own table row. It writes
   the raw scores ``scale * q.k`` (``-inf`` on dead slots) into the probabilities buffer
   and the split's running max, sum of exponentials and unnormalised output.
2. :func:`_combine_kernel` (attention alone) combines the splits into the output and the
   softmax max/sum, then rebuilds each probability in place as ``exp(score - max) / sum``,
   which is the reference's formula, so no second pass over K is needed. The fused LRFU
   step (:mod:`.lrfu`) consumes the same partials and scores instead.

Numerics follow :func:`crystal_vllm.ops.torch_ref.paged_decode_attention`: scores, softmax
and the weighted sum of V in float32 (16-bit operands go through tensor cores, see
:func:`.common.weighted_sum_v`), dead slots never read (free memory may hold NaN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import (
    ERR_OUT_OF_RANGE,
    ERR_UNASSIGNED,
    FLOAT32_TINY,
    INTERPRETED,
    cast_rne,
    dot_f32,
    next_power_of_2,
    num_sms,
    pv_mode,
    weighted_sum_v,
)

#: Fewest slots per split: below this the combine costs more than the parallelism gains.
MIN_SPLIT = 256
#: Programs to aim for per streaming multiprocessor when choosing the number of splits.
PROGRAMS_PER_SM = 4


@triton.jit
def _partial_kernel(
    q_ptr,
    stride_qb,
    stride_qh,
    pool_ptr,
    stride_pb,
    stride_pkv,
    stride_pt,
    num_head_blocks,
    tab_ptr,
    stride_tr,
    stride_th,
    stride_tm,
    valid_ptr,
    stride_vr,
    stride_vh,
    stride_vs,
    rows_ptr,
    scores_ptr,
    stride_sb,
    stride_sh,
    m_ptr,
    l_ptr,
    acc_ptr,
    err_ptr,
    scale,
    num_kv_heads,
    num_slots,
    split_size,
    num_splits,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    QK_16BIT: tl.constexpr,
    PV_MODE: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    i = bh // num_kv_heads
    h = bh % num_kv_heads
    row = tl.load(rows_ptr + i).to(tl.int64) if HAS_ROWS else i.to(tl.int64)
    g = tl.arange(0, GP)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < G
    d_ok = d < D

    q = tl.load(
        q_ptr + i.to(tl.int64) * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :],
        mask=g_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if not QK_16BIT:
        q = q.to(tl.float32)
    tab_row = tab_ptr + row * stride_tr + h * stride_th
    valid_row = valid_ptr + row * stride_vr + h * stride_vh
    score_rows = scores_ptr + i.to(tl.int64) * stride_sb + (h * G + g)[:, None] * stride_sh

    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, BLOCK_D], tl.float32)
    lo = split * split_size
    hi = tl.minimum(lo + split_size, num_slots)
    for start in range(lo, hi, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        inside = offs < hi
        live = tl.load(valid_row + offs * stride_vs, mask=inside, other=0) != 0
        hb = tl.load(tab_row + (offs // BS) * stride_tm, mask=live, other=0).to(tl.int64)
        unassigned = live & (hb < 0)
        out_of_range = live & (hb >= num_head_blocks)
        flag = tl.zeros_like(offs)
        tl.store(err_ptr + ERR_UNASSIGNED + flag, 1, mask=unassigned)
        tl.store(err_ptr + ERR_OUT_OF_RANGE + flag, 1, mask=out_of_range)
        live = live & ~unassigned & ~out_of_range

        base = tl.where(live, hb, 0) * stride_pb + (offs % BS) * stride_pt
        kv_mask = live[:, None] & d_ok[None, :]
        k = tl.load(pool_ptr + base[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(pool_ptr + stride_pkv + base[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if QK_16BIT:
            s = dot_f32(q, tl.trans(k), INTERPRET)
        else:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        s = tl.where(live[None, :], s * scale, float("-inf"))
        tl.store(score_rows + offs[None, :], s, mask=g_ok[:, None] & inside[None, :])

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no live slot yet: -inf - -inf
        alpha = tl.exp(m_i - m_use)
        p = tl.exp(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + weighted_sum_v(p, v, PV_MODE, INTERPRET)
        m_i = m_new

    part = (bh * num_splits + split).to(tl.int64) * GP + g
    tl.store(m_ptr + part, m_i)
    tl.store(l_ptr + part, l_i)
    tl.store(acc_ptr + part[:, None] * BLOCK_D + d[None, :], acc)


@triton.jit
def combine_splits(m_ptr, l_ptr, acc_ptr, bh, num_splits, GP: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merge one (request, KV head)'s split partials: ``(max, sum, acc)`` per query head,
    ``max`` already made finite (0 for a head without live slots, whose sum is 0)."""
    g = tl.arange(0, GP)
    d = tl.arange(0, BLOCK_D)
    first = bh.to(tl.int64) * num_splits * GP
    m_max = tl.full([GP], float("-inf"), tl.float32)
    for s in range(num_splits):
        m_max = tl.maximum(m_max, tl.load(m_ptr + first + s * GP + g))
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    total = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, BLOCK_D], tl.float32)
    for s in range(num_splits):
        part = first + s * GP + g
        w = tl.exp(tl.load(m_ptr + part) - m_max)
        total += tl.load(l_ptr + part) * w
        acc += tl.load(acc_ptr + part[:, None] * BLOCK_D + d[None, :]) * w[:, None]
    return m_max, total, acc


@triton.jit
def store_output(
    out_ptr,
    stride_ob,
    stride_oh,
    i,
    h,
    acc,
    total,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TINY: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """``acc / total`` in the output dtype (a head without live slots has ``acc == 0`` and
    ``total == 0``: 0, like the reference's division by ``max(total, TINY)``)."""
    g = tl.arange(0, GP)
    d = tl.arange(0, BLOCK_D)
    out = acc / tl.maximum(total, TINY)[:, None]
    ptrs = out_ptr + i.to(tl.int64) * stride_ob + (h * G + g)[:, None] * stride_oh + d[None, :]
    out = cast_rne(out, out_ptr.dtype.element_ty, INTERPRET)
    tl.store(ptrs, out, mask=(g < G)[:, None] & (d < D)[None, :])


@triton.jit
def _combine_kernel(
    m_ptr,
    l_ptr,
    acc_ptr,
    probs_ptr,
    stride_pb,
    stride_ph,
    out_ptr,
    stride_ob,
    stride_oh,
    num_kv_heads,
    num_slots,
    split_size,
    num_splits,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TINY: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    i = bh // num_kv_heads
    h = bh % num_kv_heads
    m_max, total, acc = combine_splits(m_ptr, l_ptr, acc_ptr, bh, num_splits, GP, BLOCK_D)
    if split == 0:
        store_output(
            out_ptr, stride_ob, stride_oh, i, h, acc, total, G, GP, D, BLOCK_D, TINY, INTERPRET
        )

    # Each program rebuilds the probabilities of its own split, in place over the scores.
    g = tl.arange(0, GP)
    rows = probs_ptr + i.to(tl.int64) * stride_pb + (h * G + g)[:, None] * stride_ph
    denominator = tl.maximum(total, TINY)
    lo = split * split_size
    hi = tl.minimum(lo + split_size, num_slots)
    for start in range(lo, hi, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        mask = (g < G)[:, None] & (offs < hi)[None, :]
        s = tl.load(rows + offs[None, :], mask=mask, other=float("-inf"))
        p = tl.exp(s - m_max[:, None]) / denominator[:, None]
        tl.store(rows + offs[None, :], p, mask=mask)


@dataclass(frozen=True)
class SplitPlan:
    """How the slots of each (request, KV head) are cut into splits."""

    block_n: int
    split_size: int
    num_splits: int


def plan_splits(
    num_heads: int,
    num_slots: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    split_size: int | None,
) -> SplitPlan:
    """Enough splits for ``PROGRAMS_PER_SM`` programs per SM, none under ``MIN_SPLIT`` slots.

    Tiles of ``BLOCK_N`` slots hold 4096 K (and V) elements of a 16-bit pool, 16 slots of a
    float32 one: sizes that compile without register spills for sm_90 (checked with
    ``cuobjdump``; the per-element gather addresses dominate the register count).
    ``split_size`` forces the split length (a power of two >= 16; tests use small ones to
    run the multi-split path on toy sizes).
    """
    block_n = 16 if dtype == torch.float32 else max(16, 4096 // next_power_of_2(head_dim))
    if split_size is not None:
        block_n = min(block_n, split_size)
    else:
        wanted = triton.cdiv(PROGRAMS_PER_SM * num_sms(device), max(num_heads, 1))
        splits = max(1, min(wanted, num_slots // MIN_SPLIT))
        split_size = triton.cdiv(triton.cdiv(max(num_slots, 1), splits), block_n) * block_n
    return SplitPlan(block_n, split_size, max(1, triton.cdiv(num_slots, split_size)))


@dataclass
class Partials:
    """Stage-1 results: scores in the probabilities buffer, per-split softmax partials."""

    scores: torch.Tensor  # float32 [b, Hq, S]
    m: torch.Tensor  # float32 [b * H, splits, GP]
    l: torch.Tensor  # float32 [b * H, splits, GP]  # noqa: E741
    acc: torch.Tensor  # float32 [b * H, splits, GP, BLOCK_D]
    plan: SplitPlan
    group: int
    group_padded: int
    block_d: int


def attention_partials(
    query: torch.Tensor,
    kv_pool: torch.Tensor,
    tables: torch.Tensor,
    valid: torch.Tensor,
    scale: float,
    errors: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    split_size: int | None = None,
) -> Partials:
    """Launch stage 1 over ``valid``'s slots of each (request, KV head).

    ``tables [R, H, MB]`` and ``valid [R, H, S]`` (bool) are indexed by ``rows [b]`` when
    given (the fused step reads the policy state in place), else by the batch index.
    ``errors`` (int32, see :func:`.common.new_errors`) receives the flags of bad table entries.
    """
    b, hq, head_dim = query.shape
    h, num_slots = valid.shape[1], valid.shape[2]
    group = hq // h
    # Tensor cores work on 16 rows anyway; IEEE float32 dots pay for every padded row.
    group_padded = next_power_of_2(group, 1 if kv_pool.dtype == torch.float32 else 16)
    block_d = next_power_of_2(head_dim, 16)
    plan = plan_splits(b * h, num_slots, head_dim, kv_pool.dtype, kv_pool.device, split_size)
    device = kv_pool.device
    scores = torch.empty(b, hq, num_slots, dtype=torch.float32, device=device)
    m = torch.empty(b * h, plan.num_splits, group_padded, dtype=torch.float32, device=device)
    l = torch.empty_like(m)  # noqa: E741
    acc = torch.empty(*m.shape, block_d, dtype=torch.float32, device=device)
    qk_16bit = query.dtype == kv_pool.dtype and query.dtype != torch.float32
    valid_bytes = valid.view(torch.uint8)
    if b * h and num_slots:
        _partial_kernel[(b * h, plan.num_splits)](
            query,
            query.stride(0),
            query.stride(1),
            kv_pool,
            kv_pool.stride(0),
            kv_pool.stride(1),
            kv_pool.stride(2),
            kv_pool.shape[0],
            tables,
            tables.stride(0),
            tables.stride(1),
            tables.stride(2),
            valid_bytes,
            valid_bytes.stride(0),
            valid_bytes.stride(1),
            valid_bytes.stride(2),
            rows if rows is not None else tables,  # unused without HAS_ROWS
            scores,
            scores.stride(0),
            scores.stride(1),
            m,
            l,
            acc,
            errors,
            float(scale),
            h,
            num_slots,
            plan.split_size,
            plan.num_splits,
            G=group,
            GP=group_padded,
            D=head_dim,
            BLOCK_D=block_d,
            BS=kv_pool.shape[2],
            BLOCK_N=plan.block_n,
            HAS_ROWS=rows is not None,
            QK_16BIT=qk_16bit,
            PV_MODE=pv_mode(kv_pool.dtype),
            INTERPRET=INTERPRETED,
            num_warps=4,
        )
    return Partials(scores, m, l, acc, plan, group, group_padded, block_d)


def decode_attention(
    query: torch.Tensor,
    kv_pool: torch.Tensor,
    tables: torch.Tensor,
    valid: torch.Tensor,
    scale: float,
    errors: torch.Tensor,
    *,
    split_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [b, Hq, D] in the query dtype, probs [b, Hq, S] float32)``; see
    :func:`crystal_vllm.ops.torch_ref.paged_decode_attention`. Inputs are trusted to have
    the reference's shapes; bad table entries are flagged in ``errors`` and read as dead."""
    b, hq, head_dim = query.shape
    h = valid.shape[1]
    parts = attention_partials(query, kv_pool, tables, valid, scale, errors, split_size=split_size)
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if b * h == 0:
        return out, parts.scores
    if valid.shape[2] == 0:
        return out.zero_(), parts.scores
    _combine_kernel[(b * h, parts.plan.num_splits)](
        parts.m,
        parts.l,
        parts.acc,
        parts.scores,
        parts.scores.stride(0),
        parts.scores.stride(1),
        out,
        out.stride(0),
        out.stride(1),
        h,
        valid.shape[2],
        parts.plan.split_size,
        parts.plan.num_splits,
        G=parts.group,
        GP=parts.group_padded,
        D=head_dim,
        BLOCK_D=parts.block_d,
        BLOCK_N=parts.plan.block_n,
        TINY=FLOAT32_TINY,
        INTERPRET=INTERPRETED,
        num_warps=4,
    )
    return out, parts.scores
