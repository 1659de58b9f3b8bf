"""Per-head scatter of new K/V into the head-block pool (and, in the fused LRFU step, the
policy-state insert of the new entry).

One program per (request, KV head, token): the slot maps through the head's own table row
to ``(head-block, offset)``, where the head's ``D`` values of K and V are stored, converted
to the pool dtype with round-to-nearest-even like ``Tensor.to``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    ERR_BAD_SLOT,
    ERR_OUT_OF_RANGE,
    ERR_UNASSIGNED,
    INTERPRETED,
    cast_rne,
    next_power_of_2,
)


@triton.jit
def _write_kernel(
    key_ptr,
    stride_kb,
    stride_kt,
    stride_kh,
    value_ptr,
    stride_vb,
    stride_vt,
    stride_vh,
    slots_ptr,
    stride_sb,
    stride_sh,
    stride_st,
    tab_ptr,
    stride_tr,
    stride_th,
    stride_tm,
    rows_ptr,
    pool_ptr,
    stride_pb,
    stride_pkv,
    stride_pt,
    num_head_blocks,
    err_ptr,
    step_ptr,
    positions_ptr,
    valid_ptr,
    position_ptr,
    born_ptr,
    crf_ptr,
    tau_ptr,
    prompt_ptr,
    stride_er,
    stride_eh,
    stride_es,
    num_kv_heads,
    capacity,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BS: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    INSERT: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    bh = tl.program_id(0)
    t_idx = tl.program_id(1)
    i = bh // num_kv_heads
    h = bh % num_kv_heads
    row = tl.load(rows_ptr + i).to(tl.int64) if HAS_ROWS else i.to(tl.int64)
    slot = tl.load(slots_ptr + i * stride_sb + h * stride_sh + t_idx * stride_st).to(tl.int64)
    used = slot >= 0
    tl.store(err_ptr + ERR_BAD_SLOT, 1, mask=used & (slot >= capacity))
    ok = used & (slot < capacity)
    hb = tl.load(
        tab_ptr + row * stride_tr + h * stride_th + (slot // BS) * stride_tm, mask=ok, other=0
    ).to(tl.int64)
    tl.store(err_ptr + ERR_UNASSIGNED, 1, mask=ok & (hb < 0))
    tl.store(err_ptr + ERR_OUT_OF_RANGE, 1, mask=ok & (hb >= num_head_blocks))
    ok = ok & (hb >= 0) & (hb < num_head_blocks)

    d = tl.arange(0, BLOCK_D)
    mask = tl.where(ok, d < D, False)  # not `& ok`: the interpreter mis-broadcasts it
    i64 = i.to(tl.int64)
    k = tl.load(key_ptr + i64 * stride_kb + t_idx * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(value_ptr + i64 * stride_vb + t_idx * stride_vt + h * stride_vh + d, mask=mask)
    pool_ty = pool_ptr.dtype.element_ty
    if key_ptr.dtype.element_ty != pool_ty:
        k = cast_rne(k.to(tl.float32), pool_ty, INTERPRET)
    if value_ptr.dtype.element_ty != pool_ty:
        v = cast_rne(v.to(tl.float32), pool_ty, INTERPRET)
    dst = pool_ptr + tl.where(ok, hb, 0) * stride_pb + (slot % BS) * stride_pt + d
    tl.store(dst, k, mask=mask)
    tl.store(dst + stride_pkv, v, mask=mask)

    if INSERT:  # the new entry of a decode step: a hit at step t, born at t
        t = tl.load(step_ptr + row)
        entry = row * stride_er + h * stride_eh + tl.where(ok, slot, 0) * stride_es
        tl.store(valid_ptr + entry, 1, mask=ok)
        tl.store(position_ptr + entry, tl.load(positions_ptr + i), mask=ok)
        tl.store(born_ptr + entry, t, mask=ok)
        tl.store(crf_ptr + entry, 1.0, mask=ok)
        tl.store(tau_ptr + entry, t, mask=ok)
        tl.store(prompt_ptr + entry, 0, mask=ok)


def write_kv(
    kv_pool: torch.Tensor,
    tables: torch.Tensor,
    slots: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    errors: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Scatter ``key``/``value [b, T, H, D]`` to ``slots [b, H, T]`` (``< 0`` skips) through
    ``tables [R, H, MB]`` (indexed by ``rows [b]`` when given, else the batch index).

    With ``state`` (the fused step, ``T == 1``): also insert each written entry into the
    policy state. ``state`` maps ``valid, position, born, crf, tau, prompt`` to one layer's
    ``[R, H, S]`` views with equal strides (bools viewed as uint8), plus ``step [R]`` and
    ``positions [b]``; a slot must then also lie below ``S``. Bad slots and table entries
    are flagged in ``errors`` and skipped.
    """
    b, num_kv_heads, num_tokens = slots.shape
    if b * num_kv_heads * num_tokens == 0:
        return
    head_dim = kv_pool.shape[3]
    block_size = kv_pool.shape[2]
    insert = state is not None
    capacity = tables.shape[2] * block_size
    if insert:
        capacity = min(capacity, state["valid"].shape[2])
    valid = state["valid"] if insert else kv_pool  # placeholders are never dereferenced
    fields = [state[n] if insert else kv_pool for n in ("position", "born", "crf", "tau")]
    _write_kernel[(b * num_kv_heads, num_tokens)](
        key,
        key.stride(0),
        key.stride(1),
        key.stride(2),
        value,
        value.stride(0),
        value.stride(1),
        value.stride(2),
        slots,
        slots.stride(0),
        slots.stride(1),
        slots.stride(2),
        tables,
        tables.stride(0),
        tables.stride(1),
        tables.stride(2),
        rows if rows is not None else slots,
        kv_pool,
        kv_pool.stride(0),
        kv_pool.stride(1),
        kv_pool.stride(2),
        kv_pool.shape[0],
        errors,
        state["step"] if insert else slots,
        state["positions"] if insert else slots,
        valid,
        *fields,
        state["prompt"] if insert else kv_pool,
        valid.stride(0) if insert else 0,
        valid.stride(1) if insert else 0,
        valid.stride(2) if insert else 0,
        num_kv_heads,
        capacity,
        D=head_dim,
        BLOCK_D=next_power_of_2(head_dim, 16),
        BS=block_size,
        HAS_ROWS=rows is not None,
        INSERT=insert,
        INTERPRET=INTERPRETED,
        num_warps=1 if head_dim <= 128 else 2,
    )
