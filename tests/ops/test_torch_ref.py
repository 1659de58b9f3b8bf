"""The torch reference ops against dense, loop-based oracles on random paged layouts."""

from __future__ import annotations

import math

import pytest
import torch

from crystal_vllm.ops import torch_ref


def _random_tables(
    gen: torch.Generator, b: int, h: int, mb: int, num_head_blocks: int
) -> torch.Tensor:
    """Distinct random head-block ids; each head uses a random-length prefix of its row."""
    ids = torch.randperm(num_head_blocks, generator=gen)[: b * h * mb].view(b, h, mb)
    used = torch.randint(1, mb + 1, (b, h, 1), generator=gen)
    ids = torch.where(torch.arange(mb) < used, ids, -1)
    return ids.to(torch.int32)


def _scatter_dense(
    gen: torch.Generator, tables: torch.Tensor, bs: int, d: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, dict[tuple[int, int], tuple[list[int], torch.Tensor]]]:
    """Place random per-head entries at random slots (holes, scrambled order).

    Returns the pool (NaN everywhere nothing was written, so leaks show), the validity
    mask, and per (row, head) the slots used and the dense ``[n, 2, D]`` contents.
    """
    b, h, mb = tables.shape
    pool = torch.full((int(tables.max()) + 8, 2, bs, d), float("nan"), dtype=dtype)
    valid = torch.zeros(b, h, mb * bs, dtype=torch.bool)
    dense = {}
    for r in range(b):
        for k in range(h):
            capacity = int((tables[r, k] >= 0).sum()) * bs
            n = int(torch.randint(0, capacity + 1, (), generator=gen))
            slots = torch.randperm(capacity, generator=gen)[:n].tolist()
            entries = torch.randn(n, 2, d, generator=gen).to(dtype)
            for i, s in enumerate(slots):
                pool[int(tables[r, k, s // bs]), :, s % bs] = entries[i]
                valid[r, k, s] = True
            dense[(r, k)] = (slots, entries)
    return pool, valid, dense


def _dense_attention(q: torch.Tensor, entries: torch.Tensor, scale: float):
    """float64 softmax attention of one query over one head's dense entries."""
    if entries.shape[0] == 0:
        return torch.zeros_like(q, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    k, v = entries[:, 0].double(), entries[:, 1].double()
    p = torch.softmax((k @ q.double()) * scale, dim=0)
    return p @ v, p


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 3, 4, 7])
def test_paged_decode_attention_matches_dense(group: int, head_dim: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(group * 1000 + head_dim)
    b, h, mb, bs = 3, 2, 3, 8
    tables = _random_tables(gen, b, h, mb, num_head_blocks=b * h * mb + 5)
    pool, valid, dense = _scatter_dense(gen, tables, bs, head_dim, dtype)
    query = torch.randn(b, h * group, head_dim, generator=gen).to(dtype)
    scale = head_dim**-0.5

    out, probs = torch_ref.paged_decode_attention(query, pool, tables, valid, scale)

    assert out.dtype == dtype and probs.dtype == torch.float32
    ref_out = torch.zeros(b, h * group, head_dim, dtype=torch.float64)
    ref_probs = torch.zeros(b, h * group, mb * bs, dtype=torch.float64)
    for r in range(b):
        for q in range(h * group):
            slots, entries = dense[(r, q // group)]
            o, p = _dense_attention(query[r, q], entries, scale)
            ref_out[r, q] = o
            ref_probs[r, q, slots] = p
    # Probabilities are float32 in both dtypes: only summation order differs.
    assert torch.allclose(probs.double(), ref_probs, rtol=1e-5, atol=1e-7)
    assert bool((probs[~valid.repeat_interleave(group, dim=1)] == 0).all())
    err = (out.double() - ref_out).abs().max() / ref_out.abs().max()
    # fp32: accumulation-order error only. bf16: K/V/q are the same bf16 values in the
    # oracle and the result is accumulated in fp32, so the error is dominated by the final
    # rounding of `out` to bf16 (8-bit significand: relative error <= 2**-8 per element).
    bound = 1e-5 if dtype == torch.float32 else 2**-8
    assert float(err) < bound


def test_narrow_valid_mask_only_considers_first_slots():
    gen = torch.Generator().manual_seed(7)
    b, h, mb, bs, d, s = 2, 3, 4, 4, 16, 10  # s is not a multiple of bs
    tables = torch.arange(b * h * mb, dtype=torch.int32).view(b, h, mb)
    pool = torch.randn(b * h * mb, 2, bs, d, generator=gen)
    valid = torch.rand(b, h, mb * bs, generator=gen) < 0.6
    valid[..., 0] = True
    query = torch.randn(b, h, d, generator=gen)

    out, probs = torch_ref.paged_decode_attention(query, pool, tables, valid[..., :s], 0.25)

    wide_valid = valid.clone()
    wide_valid[..., s:] = False
    ref_out, ref_probs = torch_ref.paged_decode_attention(query, pool, tables, wide_valid, 0.25)
    assert probs.shape == (b, h, s)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(probs, ref_probs[..., :s])
    assert bool((ref_probs[..., s:] == 0).all())


def test_head_without_entries_gives_zeros():
    pool = torch.full((4, 2, 4, 8), float("nan"))
    tables = torch.tensor([[[0, 1], [2, -1]]], dtype=torch.int32)
    valid = torch.zeros(1, 2, 8, dtype=torch.bool)
    valid[0, 0, 3] = True
    pool[0, :, 3] = 1.0
    out, probs = torch_ref.paged_decode_attention(torch.ones(1, 4, 8), pool, tables, valid, 1.0)
    assert bool((out[0, 2:] == 0).all()) and bool((probs[0, 2:] == 0).all())
    assert torch.equal(out[0, :2], torch.ones(2, 8))
    assert float(probs[0, 0, 3]) == 1.0


def test_valid_slot_in_unassigned_block_is_rejected():
    pool = torch.zeros(4, 2, 4, 8)
    tables = torch.tensor([[[0, -1]]], dtype=torch.int32)
    valid = torch.zeros(1, 1, 8, dtype=torch.bool)
    valid[0, 0, 5] = True
    with pytest.raises(ValueError, match="unassigned"):
        torch_ref.paged_decode_attention(torch.ones(1, 1, 8), pool, tables, valid, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_then_gather_round_trips(dtype: torch.dtype):
    gen = torch.Generator().manual_seed(11)
    b, h, mb, bs, d, t = 3, 4, 3, 4, 8, 5
    tables = _random_tables(gen, b, h, mb, num_head_blocks=b * h * mb + 3)
    pool = torch.randn(b * h * mb + 3, 2, bs, d, generator=gen).to(dtype)
    before = pool.clone()
    slots = torch.full((b, h, t), -1, dtype=torch.long)
    for r in range(b):
        for k in range(h):
            capacity = int((tables[r, k] >= 0).sum()) * bs
            n = min(t, capacity)
            slots[r, k, :n] = torch.randperm(capacity, generator=gen)[:n]
            slots[r, k] = slots[r, k, torch.randperm(t, generator=gen)]  # padding anywhere
    key = torch.randn(b, t, h, d, generator=gen)
    value = torch.randn(b, t, h, d, generator=gen)

    torch_ref.write_kv(pool, tables, slots, key, value)
    k_all, v_all = torch_ref.gather_kv(pool, tables)

    assert k_all.shape == (b, h, mb * bs, d) and k_all.dtype == dtype
    expect = before.clone()
    for r in range(b):
        for k in range(h):
            for i in range(t):
                s = int(slots[r, k, i])
                if s >= 0:
                    hb = int(tables[r, k, s // bs])
                    expect[hb, 0, s % bs] = key[r, i, k].to(dtype)
                    expect[hb, 1, s % bs] = value[r, i, k].to(dtype)
                    assert torch.equal(k_all[r, k, s], key[r, i, k].to(dtype))
                    assert torch.equal(v_all[r, k, s], value[r, i, k].to(dtype))
    assert torch.equal(pool, expect)  # nothing else was touched
    unused = (tables < 0).repeat_interleave(bs, dim=-1)
    assert bool((k_all[unused] == 0).all()) and bool((v_all[unused] == 0).all())


def test_gather_kv_num_slots():
    pool = torch.randn(6, 2, 4, 8)
    tables = torch.tensor([[[5, 2], [1, -1]]], dtype=torch.int32)
    k, v = torch_ref.gather_kv(pool, tables, num_slots=6)
    assert k.shape == (1, 2, 6, 8)
    assert torch.equal(k[0, 0, 4:6], pool[2, 0, :2]) and torch.equal(v[0, 1, :4], pool[1, 1])
    with pytest.raises(ValueError, match="num_slots"):
        torch_ref.gather_kv(pool, tables, num_slots=9)


def test_write_kv_rejects_bad_slots():
    pool = torch.zeros(4, 2, 4, 8)
    tables = torch.tensor([[[0, -1]]], dtype=torch.int32)
    kv = torch.ones(1, 1, 1, 8)
    with pytest.raises(ValueError, match="unassigned"):
        torch_ref.write_kv(pool, tables, torch.tensor([[[4]]]), kv, kv)
    with pytest.raises(ValueError, match="out of range"):
        torch_ref.write_kv(pool, tables, torch.tensor([[[8]]]), kv, kv)
    with pytest.raises(ValueError, match=r"\[b, T, H, D\]"):
        bad = torch.ones(1, 1, 1, 4)
        torch_ref.write_kv(pool, tables, torch.tensor([[[1]]]), bad, bad)
    assert bool((pool == 0).all())


def test_move_entries_matches_loop():
    gen = torch.Generator().manual_seed(3)
    b, layers, h, mb, bs, d, m = 2, 3, 2, 3, 4, 8, 5
    nhb = b * layers * h * mb
    tables = torch.randperm(nhb, generator=gen).view(b, layers, h, mb).int()
    pool = torch.randn(nhb, 2, bs, d, generator=gen)
    src = torch.full((b, layers, h, m), -1, dtype=torch.long)
    dst = src.clone()
    for idx in range(b * layers * h):
        n = int(torch.randint(0, m + 1, (), generator=gen))
        perm = torch.randperm(mb * bs, generator=gen)
        src.view(-1, m)[idx, :n] = perm[:n]
        dst.view(-1, m)[idx, :n] = perm[n : 2 * n]
    expect = pool.clone()
    for r in range(b):
        for la in range(layers):
            for k in range(h):
                for i in range(m):
                    s, t = int(src[r, la, k, i]), int(dst[r, la, k, i])
                    if s >= 0:
                        row = tables[r, la, k]
                        expect[int(row[t // bs]), :, t % bs] = pool[int(row[s // bs]), :, s % bs]

    torch_ref.move_entries(pool, tables, src, dst)

    assert torch.equal(pool, expect)


def test_move_entries_is_simultaneous():
    pool = torch.arange(2 * 2 * 4 * 1, dtype=torch.float32).view(2, 2, 4, 1)
    tables = torch.tensor([[[0, 1]]], dtype=torch.int32)
    src = torch.tensor([[[0, 5]]])
    dst = torch.tensor([[[5, 0]]])
    expect = pool.clone()
    expect[0, :, 0], expect[1, :, 1] = pool[1, :, 1], pool[0, :, 0]
    torch_ref.move_entries(pool, tables, src, dst)
    assert torch.equal(pool, expect)
    with pytest.raises(ValueError, match="padded"):
        torch_ref.move_entries(pool, tables, torch.tensor([[[0, -1]]]), torch.tensor([[[1, 2]]]))


def test_scale_is_applied():
    pool = torch.zeros(1, 2, 2, 1)
    pool[0, 0, :, 0] = torch.tensor([0.0, 1.0])
    tables = torch.zeros(1, 1, 1, dtype=torch.int32)
    valid = torch.ones(1, 1, 2, dtype=torch.bool)
    _, probs = torch_ref.paged_decode_attention(torch.ones(1, 1, 1), pool, tables, valid, 2.0)
    expect = torch.tensor([1.0, math.exp(2.0)]) / (1 + math.exp(2.0))
    torch.testing.assert_close(probs[0, 0], expect)
