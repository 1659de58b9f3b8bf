"""The C++ CPU kernels (``crystal_vllm.ops.cpu``) against the torch reference.

Error bounds, per output:

* ``probs`` (float32 in every dtype): both sides compute scores, softmax and sums in
  float32 from the same inputs; only summation order and the ``exp`` implementation
  (polynomial, ~1 ulp) differ, so ``|cpu - ref| <= 1e-5 * ref + 1e-9`` elementwise.
* ``out`` in float32: the weighted sum of V in float32, so the error relative to the row's
  largest |value| stays below 1e-5.
* ``out`` in bfloat16/float16: both sides round a float32 result once to the 8-bit
  (11-bit) mantissa. The float32 results differ by ~1e-6 relative, which can only flip a
  rounding whose midpoint lies between them: the two outputs differ by at most one unit in
  the last place of the output dtype, i.e. ``|cpu - ref| <= eps * |ref|`` with eps = 2**-7
  for bfloat16 (2**-10 for float16), plus the float32 term ``1e-5 * max|ref row|`` that
  only matters for tiny outputs (cancellation, float16 subnormals); and at least 90% of
  the elements are bit-identical.
"""

from __future__ import annotations

import pytest
import torch

from crystal_vllm import ops
from crystal_vllm.ops import torch_ref

try:
    from crystal_vllm.ops import cpu
except ImportError as exc:
    pytest.skip(
        f"the C++ extension is not built (pip install -e . --no-build-isolation): {exc}",
        allow_module_level=True,
    )

_ALL_ISAS = ("avx512", "avx2", "scalar")


def _supported_isas() -> list[str]:
    supported = []
    previous = cpu.set_cpu_isa("auto")
    try:
        for isa in _ALL_ISAS:
            try:
                cpu.set_cpu_isa(isa)
            except ValueError:
                continue
            supported.append(isa)
    finally:
        cpu.set_cpu_isa(previous)
    return supported


@pytest.fixture(params=_ALL_ISAS)
def isa(request: pytest.FixtureRequest):
    """Run the test once per kernel ISA this CPU can execute."""
    if request.param not in _supported_isas():
        pytest.skip(f"this CPU cannot run the {request.param} kernels")
    previous = cpu.set_cpu_isa(request.param)
    yield request.param
    cpu.set_cpu_isa(previous)


def _random_layout(
    gen: torch.Generator,
    b: int,
    h: int,
    mb: int,
    bs: int,
    d: int,
    dtype: torch.dtype,
    num_slots: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A pool, per-head tables and a validity mask shaped like real per-head caches.

    Each head uses a random subset of its table entries (unassigned ``-1`` entries both
    inside and after the used ones), a random number of valid slots in them (from none
    to all, with holes), and everything that is not a valid slot holds NaN, so a kernel
    that reads a free slot or an unassigned block produces NaN.
    """
    num_head_blocks = b * h * mb + 3
    tables = torch.randperm(num_head_blocks, generator=gen)[: b * h * mb].view(b, h, mb)
    assigned = torch.rand(b, h, mb, generator=gen) < 0.8
    tables = torch.where(assigned, tables, -1).to(torch.int32)
    s = mb * bs if num_slots is None else num_slots
    slot_assigned = assigned.repeat_interleave(bs, dim=-1)[..., :s]
    occupancy = torch.rand(b, h, 1, generator=gen)  # per-head fill ratio, 0 to 1
    valid = slot_assigned & (torch.rand(b, h, s, generator=gen) < occupancy)
    valid[0, 0] = False  # always one head with no entry at all

    pool = torch.full((num_head_blocks, 2, bs, d), float("nan"), dtype=dtype)
    r, k, slot = valid.nonzero(as_tuple=True)
    head_block = tables[r, k, slot // bs].long()
    pool[head_block, :, slot % bs] = torch.randn(len(slot), 2, d, generator=gen).to(dtype)
    return pool, tables, valid


def _assert_matches_reference(query, pool, tables, valid, scale) -> None:
    out, probs = cpu.paged_decode_attention(query, pool, tables, valid, scale)
    ref_out, ref_probs = torch_ref.paged_decode_attention(query, pool, tables, valid, scale)

    assert out.dtype == query.dtype and out.shape == ref_out.shape
    assert probs.dtype == torch.float32 and probs.shape == ref_probs.shape
    assert torch.isfinite(out).all() and torch.isfinite(probs).all()

    group = query.shape[1] // tables.shape[1]
    dead = ~valid.repeat_interleave(group, dim=1)
    assert (probs[dead] == 0).all(), "invalid slots must get exactly 0"
    torch.testing.assert_close(probs, ref_probs, rtol=1e-5, atol=1e-9)

    diff = (out.float() - ref_out.float()).abs()
    row_scale = ref_out.float().abs().amax(dim=-1, keepdim=True)
    if query.dtype == torch.float32:
        rel = (diff / row_scale.clamp_min(1e-30)).max()
        assert rel < 1e-5, f"float32 output relative error {rel:.3g}"
    else:
        # One unit in the last place of |ref| (2**-7 bf16, 2**-10 fp16), plus the float32
        # error, which matters only for tiny outputs (cancellation, fp16 subnormals).
        ulp = torch.finfo(query.dtype).eps
        bound = ulp * ref_out.float().abs() + 1e-5 * row_scale
        assert (diff <= bound).all(), (
            f"{query.dtype} outputs differ by more than one unit in the last place: "
            f"max diff {diff.max():.3g}"
        )
        assert (diff == 0).float().mean() > 0.9, "most outputs should be bit-identical"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32, 128])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 4, 7])
def test_matches_reference(group: int, head_dim: int, block_size: int, dtype: torch.dtype):
    seed = group * 10_000 + head_dim * 10 + block_size + (dtype == torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    b, h = 3, 2
    mb = max(2, 256 // block_size)
    pool, tables, valid = _random_layout(gen, b, h, mb, block_size, head_dim, dtype)
    query = torch.randn(b, h * group, head_dim, generator=gen).to(dtype)
    _assert_matches_reference(query, pool, tables, valid, head_dim**-0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128, 80, 40])
def test_every_isa_matches_reference(isa: str, head_dim: int, dtype: torch.dtype):
    """All builds; 80 and 40 take the generic-D (80) and scalar (40, not a multiple of
    the AVX2 width) code."""
    gen = torch.Generator().manual_seed(head_dim)
    b, h, group, bs = 2, 3, 3, 16
    # A narrow mask (not a multiple of the vector width or block size) exercises tails.
    pool, tables, valid = _random_layout(gen, b, h, 7, bs, head_dim, dtype, num_slots=101)
    query = (3 * torch.randn(b, h * group, head_dim, generator=gen)).to(dtype)
    _assert_matches_reference(query, pool, tables, valid, head_dim**-0.5)


def test_large_scores_and_far_tails_are_stable(isa: str):
    """Scores spread over hundreds of units: a naive softmax overflows, and probabilities
    below exp(-87) must come out as 0 (not NaN or garbage)."""
    gen = torch.Generator().manual_seed(5)
    pool, tables, valid = _random_layout(gen, 2, 2, 4, 16, 64, torch.float32)
    query = 40 * torch.randn(2, 4, 64, generator=gen)
    out, probs = cpu.paged_decode_attention(query, pool, tables, valid, 1.0)
    ref_out, ref_probs = torch_ref.paged_decode_attention(query, pool, tables, valid, 1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(probs, ref_probs, rtol=1e-5, atol=1e-30)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)


def test_heads_without_entries_and_empty_mask_give_zeros():
    gen = torch.Generator().manual_seed(1)
    pool, tables, valid = _random_layout(gen, 2, 2, 3, 16, 64, torch.bfloat16)
    valid[:] = False
    query = torch.randn(2, 4, 64, generator=gen).bfloat16()
    out, probs = cpu.paged_decode_attention(query, pool, tables, valid, 0.125)
    assert (out == 0).all() and (probs == 0).all()

    out, probs = cpu.paged_decode_attention(query, pool, tables, valid[..., :0], 0.125)
    assert (out == 0).all() and probs.shape == (2, 4, 0)


def test_probabilities_sum_to_one_per_live_head():
    gen = torch.Generator().manual_seed(2)
    pool, tables, valid = _random_layout(gen, 4, 2, 4, 32, 64, torch.bfloat16)
    query = torch.randn(4, 8, 64, generator=gen).bfloat16()
    _, probs = cpu.paged_decode_attention(query, pool, tables, valid, 0.125)
    live = valid.any(-1).repeat_interleave(4, dim=1)
    sums = probs.sum(-1)
    torch.testing.assert_close(sums[live], torch.ones_like(sums[live]), rtol=0, atol=1e-5)
    assert (sums[~live] == 0).all()


def test_strided_pool_view():
    """A pool that is a view with padded rows (last dim still contiguous) is read in place."""
    gen = torch.Generator().manual_seed(3)
    pool, tables, valid = _random_layout(gen, 2, 2, 3, 16, 64, torch.float32)
    padded = torch.full((*pool.shape[:3], 80), float("nan"))
    padded[..., :64] = pool
    view = padded[..., :64]
    assert not view.is_contiguous()
    query = torch.randn(2, 4, 64, generator=gen)
    out, probs = cpu.paged_decode_attention(query, view, tables, valid, 0.125)
    ref_out, ref_probs = torch_ref.paged_decode_attention(query, pool, tables, valid, 0.125)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs, ref_probs, rtol=1e-5, atol=1e-9)


def test_bad_inputs_raise_like_the_reference():
    gen = torch.Generator().manual_seed(4)
    pool, tables, valid = _random_layout(gen, 2, 2, 3, 16, 64, torch.float32)
    query = torch.randn(2, 4, 64)
    bad = tables.clone()
    r, k, slot = valid.nonzero(as_tuple=True)
    bad[r[0], k[0], slot[0] // 16] = -1
    with pytest.raises(ValueError, match="unassigned"):
        cpu.paged_decode_attention(query, pool, bad, valid, 0.125)
    bad[r[0], k[0], slot[0] // 16] = pool.shape[0]
    with pytest.raises(IndexError, match="head-block"):
        cpu.paged_decode_attention(query, pool, bad, valid, 0.125)
    with pytest.raises(ValueError, match="multiple"):
        cpu.paged_decode_attention(torch.randn(2, 3, 64), pool, tables, valid, 0.125)
    with pytest.raises(ValueError, match="more than the table"):
        wide = torch.zeros(2, 2, 3 * 16 + 1, dtype=torch.bool)
        cpu.paged_decode_attention(query, pool, tables, wide, 0.125)


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_write_kv_matches_reference(pool_dtype: torch.dtype):
    gen = torch.Generator().manual_seed(7)
    b, h, mb, bs, d, t = 3, 2, 4, 16, 64, 5
    tables = torch.randperm(b * h * mb + 2, generator=gen)[: b * h * mb].view(b, h, mb).int()
    tables[1, 0, 3] = -1
    # Distinct slots per head inside assigned blocks; -1 pads some positions.
    slots = torch.stack([torch.randperm(3 * bs, generator=gen)[:t] for _ in range(b * h)])
    slots = slots.view(b, h, t)
    slots[2, 1, 1] = -1
    key = torch.randn(b, t, h, d, generator=gen)  # float32: converted to the pool dtype
    value = torch.randn(b, t, h, d, generator=gen)
    pool = torch.randn(b * h * mb + 2, 2, bs, d, generator=gen).to(pool_dtype)
    expected = pool.clone()
    torch_ref.write_kv(expected, tables, slots, key, value)
    cpu.write_kv(pool, tables, slots, key, value)
    assert torch.equal(pool, expected)


def test_write_kv_rejects_bad_slots_without_writing():
    pool = torch.zeros(4, 2, 16, 8)
    tables = torch.tensor([[[0, -1]]], dtype=torch.int32)
    key = torch.ones(1, 2, 1, 8)
    with pytest.raises(ValueError, match="out of range"):
        cpu.write_kv(pool, tables, torch.tensor([[[0, 32]]]), key, key)
    with pytest.raises(ValueError, match="unassigned"):
        cpu.write_kv(pool, tables, torch.tensor([[[0, 16]]]), key, key)
    assert (pool == 0).all(), "a rejected call must not write anything"


def test_unsupported_pool_dtype_falls_back_to_reference():
    gen = torch.Generator().manual_seed(8)
    pool, tables, valid = _random_layout(gen, 2, 2, 3, 16, 64, torch.float64)
    query = torch.randn(2, 4, 64, generator=gen, dtype=torch.float64)
    out, probs = cpu.paged_decode_attention(query, pool, tables, valid, 0.125)
    ref_out, ref_probs = torch_ref.paged_decode_attention(query, pool, tables, valid, 0.125)
    assert torch.equal(out, ref_out) and torch.equal(probs, ref_probs)


def test_dispatch_selects_the_kernels(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(ops.ENV_VAR, "cpu")
    assert ops.get_impl() is cpu
    assert "cpu" in ops.available()
    assert cpu.cpu_isa() in _ALL_ISAS
    with pytest.raises(ValueError, match="unknown ISA"):
        cpu.set_cpu_isa("sse9")


def test_threads_split_work_items_without_changing_results():
    """(request, KV head) items are independent, so any thread count gives the same bits."""
    gen = torch.Generator().manual_seed(9)
    pool, tables, valid = _random_layout(gen, 5, 3, 4, 32, 64, torch.bfloat16)
    query = torch.randn(5, 9, 64, generator=gen).bfloat16()
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.paged_decode_attention(query, pool, tables, valid, 0.125)
        torch.set_num_threads(2)
        two = cpu.paged_decode_attention(query, pool, tables, valid, 0.125)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_first_free_slots_matches_reference():
    gen = torch.Generator().manual_seed(5)
    valid = torch.rand(6, 3, 2, 40, generator=gen) < 0.9
    valid[0, 0, 0] = True  # a full head: -1
    valid[1, 1, 1, :17] = True  # no hole below its end
    valid[1, 1, 1, 17:] = False
    rows = torch.tensor([4, 0, 1, 5])
    got = cpu.first_free_slots(valid, rows)
    assert torch.equal(got, torch_ref.first_free_slots(valid, rows))
    assert got[1, 0, 0] == -1 and got[2, 1, 1] == 17
    with pytest.raises(IndexError, match="row 6 is out of range"):
        cpu.first_free_slots(valid, torch.tensor([6]))
