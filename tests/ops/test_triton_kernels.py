"""The Triton kernels (``crystal_vllm.ops.triton``) against the torch reference.

Where they run: on a GPU when this process has CUDA, else in Triton's interpreter on the
CPU. The interpreter must be chosen before ``triton`` is first imported (Triton builds its
own reductions as jitted functions at import), and in a shared pytest process something
else (vLLM, the ops dispatcher) may have imported it already; setting the variable for the
whole session would also put vLLM's Triton kernels in interpreter mode for the other
tests. So without CUDA or ``TRITON_INTERPRET=1`` this module runs itself again in a child
pytest with the variable set (``test_kernels_in_child_process``), and its test classes
skip here.

Error bounds, per output (the derivation of test_cpu_kernels.py):

* ``probs`` (float32 in every dtype): scores, softmax and sums in float32 from the same
  inputs on both sides; only the summation order differs (and, on a GPU, ``exp`` is the
  hardware approximation), so ``|triton - ref| <= 1e-5 * ref + 1e-9`` elementwise.
* ``out`` in float32: the weighted sum of V in float32 (tensor cores are never used for
  float32), so the error relative to the row's largest |value| stays below 1e-5.
* ``out`` in bfloat16/float16: the weights go through tensor cores as two bfloat16 parts
  (about 2**-16 relative each), then both sides round the float32 result once to the
  output dtype: at most one unit in the last place of the output apart, plus the float32
  term ``1e-5 * max|ref row|`` for tiny outputs, and at least 90% bit-identical.
* the LRFU state: ``valid``, ``position``, ``born``, ``tau``, ``prompt`` and the eviction
  counts exactly, ``crf`` to 1e-6 relative (the decay factors are the reference's own
  ``torch.pow`` values). The probabilities differ by an ulp, so a victim may differ, but
  only between two candidates whose reference decayed scores agree to 1e-6 relative.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

from crystal_vllm import ops  # noqa: E402
from crystal_vllm.ops import DecodeLayer, torch_ref  # noqa: E402
from crystal_vllm.policy import KVPolicy, make_policy  # noqa: E402
from crystal_vllm.policy.select import recency_key, select_lowest  # noqa: E402
from crystal_vllm.policy.topp import top_p_mask  # noqa: E402

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
RUNS_HERE = INTERPRETER or torch.cuda.is_available()
DEVICE = torch.device("cpu" if INTERPRETER or not torch.cuda.is_available() else "cuda")
REPO = Path(__file__).resolve().parents[2]

needs_kernels = pytest.mark.skipif(
    not RUNS_HERE, reason="no CUDA and no interpreter here: run by test_kernels_in_child_process"
)

if RUNS_HERE:
    from crystal_vllm.kernels.lrfu import lowest_entries, top_p_hits

    from crystal_vllm.ops import triton_ops


@pytest.mark.slow
@pytest.mark.skipif(RUNS_HERE, reason="the kernels run in this process")
def test_kernels_in_child_process() -> None:
    """Every test of this module that needs the kernels, in Triton's interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    here = Path(__file__).relative_to(REPO)
    for parent_only in (
        "test_kernels_in_child_process",
        "test_kernels_compile_for_cuda_without_spilling",
    ):
        command += ["--deselect", f"{here}::{parent_only}"]
    command.append(__file__)
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]


def test_kernels_install_as_a_crystal_vllm_subpackage() -> None:
    """``kernels/`` is importable as ``crystal_vllm.kernels``, never as a top-level
    ``kernels`` (the PyPI name it would clash with), and the explicit package list in
    pyproject.toml (needed for the mapping) names every package of the source tree."""
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"crystal_vllm.kernels": "kernels"}
    on_disk = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "crystal_vllm").rglob("__init__.py")
    }
    assert set(setuptools["packages"]) == on_disk | {"crystal_vllm.kernels"}
    assert "kernels" not in setuptools["packages"]
    if RUNS_HERE:
        from crystal_vllm import kernels

        assert Path(kernels.__file__).resolve().parent == REPO / "kernels"


# -- compiling for a GPU without one ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETER, reason="needs Triton's compiler, not its interpreter")
def test_kernels_compile_for_cuda_without_spilling(monkeypatch: pytest.MonkeyPatch) -> None:
    """The interpreter accepts code the GPU compiler rejects (loop-carried types, dot
    shapes), so every kernel is also compiled ahead of time for sm_90 (H100/H200), each
    launch of a decode step captured instead of run. The attention and write kernels must
    not spill registers to local memory (checked with the wheel's ``cuobjdump``)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction, mangle_type

    from crystal_vllm import kernels

    target = GPUTarget("cuda", 90, 32)
    compiled = {}

    def capture(kernel: JITFunction):
        def run(*args, grid, warmup, **kwargs):
            options = {k: kwargs.pop(k) for k in ("num_warps", "enable_fp_fusion") if k in kwargs}
            bound = dict(zip(kernel.arg_names, args, strict=False)) | kwargs
            constants = {
                n: bound[n] for i, n in enumerate(kernel.arg_names) if i in kernel.constexprs
            }
            signature = {
                n: "constexpr" if n in constants else mangle_type(bound[n])
                for n in kernel.arg_names
            }
            source = ASTSource(kernel, signature, constants)
            compiled[kernel.fn.__name__] = triton.compile(source, target=target, options=options)

        return run

    for module in ("attention", "write_kv", "lrfu"):
        for value in vars(sys.modules[f"crystal_vllm.kernels.{module}"]).values():
            if isinstance(value, JITFunction) and value.fn.__name__.endswith("_kernel"):
                monkeypatch.setattr(value, "run", capture(value))

    b, h, g, d, bs, s = 2, 2, 4, 128, 16, 4096
    policy = make_policy("crystal-lite")
    state = policy.init_state(b, 1, h, s)
    views = {
        n: getattr(state, n)[:, 0] for n in ("valid", "position", "born", "crf", "tau", "prompt")
    }
    views |= {
        "valid": views["valid"].view(torch.uint8),
        "prompt": views["prompt"].view(torch.uint8),
    }
    views |= {"step": state.step, "positions": torch.zeros(b, dtype=torch.long)}
    pool = torch.zeros(b * h * s // bs, 2, bs, d, dtype=torch.bfloat16)
    tables = torch.zeros(b, h, s // bs, dtype=torch.int32)
    query = torch.zeros(b, h * g, d, dtype=torch.bfloat16)
    kv = torch.zeros(b, h, d, dtype=torch.bfloat16)
    errors = kernels.new_errors(torch.device("cpu"))
    kernels.decode_attention(query, pool, tables, state.valid[:, 0], d**-0.5, errors)
    slots = torch.zeros(b, h, dtype=torch.long)
    budgets = torch.ones(b, h, dtype=torch.long)
    rows = torch.arange(b)
    kernels.lrfu_decode_step(
        views,
        rows,
        slots,
        budgets,
        query,
        kv,
        kv,
        pool,
        tables,
        d**-0.5,
        lam=0.6,
        top_p=0.9,
        gqa_max=False,
        protect_prompt=True,  # the default prompt mode, keep
        recent_window=1,
        errors=errors,
    )
    assert set(compiled) == {"_partial_kernel", "_combine_kernel", "_write_kernel", "_lrfu_kernel"}

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        return
    for name in ("_partial_kernel", "_combine_kernel", "_write_kernel"):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled[name].asm["cubin"])
            cubin.flush()
            usage = subprocess.run(
                [cuobjdump, "--dump-resource-usage", cubin.name], capture_output=True, text=True
            ).stdout
        assert "STACK:0 " in usage, f"{name} spills registers: {usage}"


# -- random inputs ---------------------------------------------------------------------


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
    """A pool, per-head tables and a validity mask shaped like real per-head caches: each
    head uses a random subset of its table entries (``-1`` inside and after the used
    ones) and a random number of valid slots in them (none to all, with holes). Every
    other slot holds NaN, so a kernel that reads a dead slot produces NaN."""
    num_head_blocks = b * h * mb + 3
    tables = torch.randperm(num_head_blocks, generator=gen)[: b * h * mb].view(b, h, mb)
    assigned = torch.rand(b, h, mb, generator=gen) < 0.8
    tables = torch.where(assigned, tables, -1).to(torch.int32)
    s = mb * bs if num_slots is None else num_slots
    slot_assigned = assigned.repeat_interleave(bs, dim=-1)[..., :s]
    occupancy = torch.rand(b, h, 1, generator=gen)
    valid = slot_assigned & (torch.rand(b, h, s, generator=gen) < occupancy)
    valid[0, 0] = False  # always one head with no entry at all
    pool = torch.full((num_head_blocks, 2, bs, d), float("nan"), dtype=dtype)
    r, k, slot = valid.nonzero(as_tuple=True)
    head_block = tables[r, k, slot // bs].long()
    pool[head_block, :, slot % bs] = torch.randn(len(slot), 2, d, generator=gen).to(dtype)
    return pool.to(DEVICE), tables.to(DEVICE), valid.to(DEVICE)


def _assert_out_close(out: torch.Tensor, ref: torch.Tensor, *, bit_identical: bool) -> None:
    diff = (out.float() - ref.float()).abs()
    row_scale = ref.float().abs().amax(dim=-1, keepdim=True)
    if ref.dtype == torch.float32:
        rel = (diff / row_scale.clamp_min(1e-30)).max()
        assert rel < 1e-5, f"float32 output relative error {rel:.3g}"
        return
    bound = torch.finfo(ref.dtype).eps * ref.float().abs() + 1e-5 * row_scale
    assert bool((diff <= bound).all()), (
        f"{ref.dtype} outputs differ by more than one unit in the last place: "
        f"max diff {diff.max():.3g}"
    )
    if bit_identical:
        assert (diff == 0).float().mean() > 0.9, "most outputs should be bit-identical"


@pytest.fixture
def no_reference(monkeypatch: pytest.MonkeyPatch):
    """Fail if the Triton implementation falls back to the reference (the test would then
    compare the reference with itself)."""

    class _Forbidden:
        def __getattr__(self, name: str):
            raise AssertionError(f"ops.triton_ops fell back to torch_ref.{name}")

    monkeypatch.setattr(triton_ops, "torch_ref", _Forbidden())


@pytest.fixture
def split_size():
    """``split_size(n)`` forces the attention split length for the test."""
    previous = triton_ops.set_split_size(None)

    def force(n: int | None) -> None:
        triton_ops.set_split_size(n)

    yield force
    triton_ops.set_split_size(previous)


# -- paged decode attention ------------------------------------------------------------


@needs_kernels
@pytest.mark.usefixtures("no_reference")
class TestAttention:
    def _check(self, query, pool, tables, valid, scale, *, bit_identical=True) -> None:
        out, probs = triton_ops.paged_decode_attention(query, pool, tables, valid, scale)
        ref_out, ref_probs = torch_ref.paged_decode_attention(query, pool, tables, valid, scale)
        assert out.dtype == query.dtype and out.shape == ref_out.shape
        assert probs.dtype == torch.float32 and probs.shape == ref_probs.shape
        assert torch.isfinite(out).all() and torch.isfinite(probs).all()
        group = query.shape[1] // tables.shape[1]
        dead = ~valid.repeat_interleave(group, dim=1)
        assert (probs[dead] == 0).all(), "invalid slots must get exactly 0"
        torch.testing.assert_close(probs, ref_probs, rtol=1e-5, atol=1e-9)
        _assert_out_close(out, ref_out, bit_identical=bit_identical)

    @pytest.mark.parametrize(
        ("group", "head_dim", "dtype", "split"),
        [
            (1, 64, torch.float32, None),
            (1, 128, torch.bfloat16, 16),
            (2, 128, torch.bfloat16, None),
            (2, 64, torch.float32, 32),
            (4, 64, torch.bfloat16, 16),
            (4, 128, torch.float32, None),
            (7, 128, torch.float32, 16),
            (7, 64, torch.bfloat16, None),
            (3, 64, torch.float16, 16),
        ],
    )
    def test_matches_reference(self, group, head_dim, dtype, split, split_size) -> None:
        split_size(split)
        gen = torch.Generator().manual_seed(group * 1000 + head_dim + (split or 0))
        b, h, mb, bs = 2, 2, 5, 16
        pool, tables, valid = _random_layout(gen, b, h, mb, bs, head_dim, dtype)
        query = torch.randn(b, h * group, head_dim, generator=gen).to(dtype).to(DEVICE)
        self._check(query, pool, tables, valid, head_dim**-0.5)

    def test_split_path_covers_many_splits_and_block_sizes(self, split_size) -> None:
        """Splits shorter than a head-block and longer than one, over a narrow mask whose
        length is not a multiple of the split or block size."""
        gen = torch.Generator().manual_seed(21)
        for split, bs in ((16, 32), (64, 8)):
            split_size(split)
            pool, tables, valid = _random_layout(gen, 2, 1, 6, bs, 64, torch.bfloat16, 41)
            query = torch.randn(2, 2, 64, generator=gen).bfloat16().to(DEVICE)
            self._check(query, pool, tables, valid, 0.125)

    def test_head_dim_that_is_not_a_power_of_two(self) -> None:
        gen = torch.Generator().manual_seed(3)
        pool, tables, valid = _random_layout(gen, 2, 2, 3, 16, 80, torch.float32)
        query = torch.randn(2, 6, 80, generator=gen).to(DEVICE)
        self._check(query, pool, tables, valid, 80**-0.5)

    def test_large_scores_and_far_tails_are_stable(self) -> None:
        """Scores spread over hundreds of units: a naive softmax overflows, and
        probabilities below exp(-87) must come out as 0 or tiny, never NaN."""
        gen = torch.Generator().manual_seed(5)
        pool, tables, valid = _random_layout(gen, 2, 2, 4, 16, 64, torch.float32)
        query = (40 * torch.randn(2, 4, 64, generator=gen)).to(DEVICE)
        out, probs = triton_ops.paged_decode_attention(query, pool, tables, valid, 1.0)
        ref_out, ref_probs = torch_ref.paged_decode_attention(query, pool, tables, valid, 1.0)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(probs, ref_probs, rtol=1e-5, atol=1e-30)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)

    def test_heads_without_entries_and_empty_mask_give_zeros(self) -> None:
        gen = torch.Generator().manual_seed(1)
        pool, tables, valid = _random_layout(gen, 2, 2, 3, 16, 64, torch.bfloat16)
        valid[:] = False
        query = torch.randn(2, 4, 64, generator=gen).bfloat16().to(DEVICE)
        out, probs = triton_ops.paged_decode_attention(query, pool, tables, valid, 0.125)
        assert (out == 0).all() and (probs == 0).all()
        out, probs = triton_ops.paged_decode_attention(query, pool, tables, valid[..., :0], 0.1)
        assert (out == 0).all() and probs.shape == (2, 4, 0)

    def test_probabilities_sum_to_one_per_live_head(self) -> None:
        gen = torch.Generator().manual_seed(2)
        pool, tables, valid = _random_layout(gen, 3, 2, 4, 16, 64, torch.bfloat16)
        query = torch.randn(3, 8, 64, generator=gen).bfloat16().to(DEVICE)
        _, probs = triton_ops.paged_decode_attention(query, pool, tables, valid, 0.125)
        live = valid.any(-1).repeat_interleave(4, dim=1)
        sums = probs.sum(-1)
        torch.testing.assert_close(sums[live], torch.ones_like(sums[live]), rtol=0, atol=1e-5)
        assert (sums[~live] == 0).all()

    def test_strided_pool_view(self) -> None:
        """A pool that is a view with padded rows (last dim contiguous) is read in place."""
        gen = torch.Generator().manual_seed(3)
        pool, tables, valid = _random_layout(gen, 2, 2, 3, 16, 64, torch.float32)
        padded = torch.full((*pool.shape[:3], 80), float("nan"), device=DEVICE)
        padded[..., :64] = pool
        view = padded[..., :64]
        assert not view.is_contiguous()
        query = torch.randn(2, 4, 64, generator=gen).to(DEVICE)
        out, probs = triton_ops.paged_decode_attention(query, view, tables, valid, 0.125)
        ref_out, ref_probs = torch_ref.paged_decode_attention(query, pool, tables, valid, 0.125)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(probs, ref_probs, rtol=1e-5, atol=1e-9)

    def test_bad_inputs_raise_like_the_reference(self) -> None:
        gen = torch.Generator().manual_seed(4)
        pool, tables, valid = _random_layout(gen, 2, 2, 3, 16, 64, torch.float32)
        query = torch.randn(2, 4, 64).to(DEVICE)
        bad = tables.clone()
        r, k, slot = valid.nonzero(as_tuple=True)
        bad[r[0], k[0], slot[0] // 16] = -1
        with pytest.raises(ValueError, match="unassigned"):
            triton_ops.paged_decode_attention(query, pool, bad, valid, 0.125)
        bad[r[0], k[0], slot[0] // 16] = pool.shape[0]
        with pytest.raises(IndexError, match="head-block"):
            triton_ops.paged_decode_attention(query, pool, bad, valid, 0.125)
        with pytest.raises(ValueError, match="multiple"):
            triton_ops.paged_decode_attention(query[:, :3], pool, tables, valid, 0.125)
        with pytest.raises(ValueError, match="more than the table"):
            wide = torch.zeros(2, 2, 3 * 16 + 1, dtype=torch.bool, device=DEVICE)
            triton_ops.paged_decode_attention(query, pool, tables, wide, 0.125)


# -- write_kv ----------------------------------------------------------------------------


def _write_inputs(gen: torch.Generator, key_dtype: torch.dtype, pool_dtype: torch.dtype):
    b, h, mb, bs, d, t = 3, 2, 4, 16, 64, 5
    tables = torch.randperm(b * h * mb + 2, generator=gen)[: b * h * mb].view(b, h, mb).int()
    tables[1, 0, 3] = -1
    slots = torch.stack([torch.randperm(3 * bs, generator=gen)[:t] for _ in range(b * h)])
    slots = slots.view(b, h, t)
    slots[2, 1, 1] = -1
    key = torch.randn(b, t, h, d, generator=gen).to(key_dtype)
    value = torch.randn(b, t, h, d, generator=gen).to(key_dtype)
    pool = torch.randn(b * h * mb + 2, 2, bs, d, generator=gen).to(pool_dtype)
    return [x.to(DEVICE) for x in (pool, tables, slots, key, value)]


@needs_kernels
@pytest.mark.usefixtures("no_reference")
class TestWriteKV:
    @pytest.mark.parametrize(
        ("key_dtype", "pool_dtype"),
        [
            (torch.float32, torch.float32),
            (torch.float32, torch.bfloat16),
            (torch.float32, torch.float16),
            (torch.bfloat16, torch.bfloat16),
            (torch.float16, torch.bfloat16),
            (torch.bfloat16, torch.float16),
        ],
    )
    def test_matches_reference(self, key_dtype, pool_dtype) -> None:
        """Bit for bit, conversions included (round to nearest even, like Tensor.to)."""
        gen = torch.Generator().manual_seed(7)
        pool, tables, slots, key, value = _write_inputs(gen, key_dtype, pool_dtype)
        expected = pool.clone()
        torch_ref.write_kv(expected, tables, slots, key, value)
        triton_ops.write_kv(pool, tables, slots, key, value)
        assert torch.equal(pool, expected)

    def test_rejects_bad_slots_without_writing(self) -> None:
        pool = torch.zeros(4, 2, 16, 8, device=DEVICE)
        tables = torch.tensor([[[0, -1]]], dtype=torch.int32, device=DEVICE)
        key = torch.ones(1, 2, 1, 8, device=DEVICE)

        def slots(a: int, b: int) -> torch.Tensor:
            return torch.tensor([[[a, b]]], device=DEVICE)

        with pytest.raises(ValueError, match="out of range"):
            triton_ops.write_kv(pool, tables, slots(0, 32), key, key)
        with pytest.raises(ValueError, match="unassigned"):
            triton_ops.write_kv(pool, tables, slots(0, 16), key, key)
        with pytest.raises(IndexError, match="head-block"):
            triton_ops.write_kv(pool, tables.clone().fill_(9), slots(0, 1), key, key)
        assert (pool == 0).all(), "a rejected call must not write anything"

    def test_without_value_checks_bad_slots_are_skipped(self) -> None:
        """The kernels never follow a bad slot or table entry, checked or not."""
        pool = torch.zeros(4, 2, 16, 8, device=DEVICE)
        tables = torch.tensor([[[0, -1], [7, 1]]], dtype=torch.int32, device=DEVICE)
        slots = torch.tensor([[[3, 40, 17], [2, 5, 20]]], device=DEVICE)
        key = torch.arange(1, 7, dtype=torch.float32, device=DEVICE).view(1, 3, 2, 1)
        previous = triton_ops.set_value_checks(False)
        try:
            triton_ops.write_kv(
                pool, tables, slots, key.expand(-1, -1, -1, 8), -key.expand(-1, -1, -1, 8)
            )
        finally:
            triton_ops.set_value_checks(previous)
        written = pool[..., 0].nonzero().tolist()
        # head 0: slot 3 (block 0); slot 40 is out of range, 17 unassigned. Head 1: slot
        # 20 in block 1; block 7 does not exist.
        assert written == [[0, 0, 3], [0, 1, 3], [1, 0, 4], [1, 1, 4]]
        assert pool[0, 0, 3, 0] == 1 and pool[1, 1, 4, 0] == -6


# -- the fused LRFU step ------------------------------------------------------------------


class _Scenario:
    """Random tables over a pool, prompt entries already in place, and a driver that
    schedules decode steps: rows in random subsets and orders, per-head budgets that change
    every step (so heads evict one or several entries, or none), unassigned table entries,
    and the reference and the kernels each on their own copy of the state and pool."""

    ROWS, LAYERS, BS = 4, 2, 4

    def __init__(self, policy, h, g, d, max_blocks, dtype, seed, same_keys=False):
        self.gen = torch.Generator().manual_seed(seed)
        self.policy, self.h, self.g, self.d, self.dtype = policy, h, g, d, dtype
        self.same_keys = same_keys
        r, layers, bs = self.ROWS, self.LAYERS, self.BS
        ids = torch.randperm(r * layers * h * max_blocks, generator=self.gen)
        ids = ids.view(r, layers, h, max_blocks)
        assigned = torch.randint(2, max_blocks + 1, (r, layers, h, 1), generator=self.gen)
        columns = torch.arange(max_blocks).view(1, 1, 1, -1)
        self.tables = torch.where(columns < assigned, ids, -1).to(torch.int32).to(DEVICE)
        pool = torch.randn(r * layers * h * max_blocks, 2, bs, d, generator=self.gen)
        self.pool = pool.to(dtype).to(DEVICE)
        self.got_pool = self.pool.clone()
        self.state = policy.init_state(r, layers, h, max_blocks * bs, DEVICE)
        self.next_position = self._prefill(max_blocks * bs)
        self.got = type(self.state)(**{k: v.clone() for k, v in vars(self.state).items()})

    def _prefill(self, num_slots: int) -> torch.Tensor:
        """Each head starts with a random subset of its row's prompt positions (what a
        prompt evicted down to its budget leaves) in random assigned slots, at least one
        slot left free. Returns each row's next position."""
        gen = self.gen
        r, layers, h = self.ROWS, self.LAYERS, self.h
        prompt_len = torch.randint(1, num_slots, (r,), generator=gen)
        new = torch.zeros(r, layers, h, num_slots, dtype=torch.bool)
        positions = torch.full(new.shape, -1, dtype=torch.long)
        assigned = (self.tables >= 0).cpu().repeat_interleave(self.BS, dim=-1)
        for index in torch.cartesian_prod(torch.arange(r), torch.arange(layers), torch.arange(h)):
            row, layer, head = index.tolist()
            free = assigned[row, layer, head].nonzero().flatten()
            most = min(int(prompt_len[row]), len(free) - 1)
            n = int(torch.randint(0, most + 1, (1,), generator=gen))
            slots = free[torch.randperm(len(free), generator=gen)[:n]]
            new[row, layer, head, slots] = True
            kept = torch.randperm(int(prompt_len[row]), generator=gen)[:n]
            positions[row, layer, head, slots] = kept
        every_row = torch.arange(r, device=DEVICE)
        self.policy.insert(
            self.state, every_row, new.to(DEVICE), positions.to(DEVICE), prefill=True
        )
        return prompt_len

    def step(self, layers: int = 1, budget_floor: int = 1) -> tuple[int, int]:
        """One decode step over ``layers`` layers; returns (evictions, near-tie swaps)."""
        gen, policy, bs = self.gen, self.policy, self.BS
        n = int(torch.randint(1, self.ROWS + 1, (1,), generator=gen))
        rows = torch.randperm(self.ROWS, generator=gen)[:n].to(DEVICE)
        policy.begin_step(self.state, rows)
        policy.begin_step(self.got, rows)
        positions = self.next_position[rows.cpu()].to(DEVICE)
        self.next_position[rows.cpu()] += 1
        evictions = swaps = 0
        for layer in range(layers):
            tables = self.tables[rows, layer]
            assigned = (tables >= 0).repeat_interleave(bs, dim=-1)
            free = assigned & ~self.state.valid[rows, layer]
            slots = free.float().argmax(-1)  # the lowest free slot of each head
            capacity = (tables >= 0).sum(-1).cpu() * bs
            span = (capacity - budget_floor).clamp_min(1)
            budgets = torch.randint(0, 1 << 30, (n, self.h), generator=gen) % span + budget_floor
            query = 2 * torch.randn(n, self.h * self.g, self.d, generator=gen)
            key = torch.randn(n, self.h, self.d, generator=gen)
            if self.same_keys:
                key = torch.ones(n, self.h, self.d)
            value = torch.randn(n, self.h, self.d, generator=gen)
            q, k, v = (x.to(self.dtype).to(DEVICE) for x in (query, key, value))
            args = (layer, rows, slots, positions, budgets.to(DEVICE), q, k, v)
            scale = self.d**-0.5
            ref_out, ref_ev = KVPolicy.decode_layer(
                policy, self.state, DecodeLayer(*args, self.pool, self.tables, scale)
            )
            got_out, got_ev = triton_ops.lrfu_decode(
                DecodeLayer(*args, self.got_pool, self.tables, scale),
                self.got,
                **policy.kernel_params(),
            )
            assert got_out.dtype == ref_out.dtype and got_ev.dtype == torch.int32
            _assert_out_close(got_out, ref_out, bit_identical=False)
            assert torch.equal(self.pool, self.got_pool), "the K/V writes differ"
            swaps += self._compare_states(rows, layer, ref_ev, got_ev)
            evictions += int(ref_ev.sum())
        return evictions, swaps

    def _decayed(self, state, row: int, layer: int, head: int, slot: int) -> float:
        age = (state.step[row] - state.tau[row, layer, head, slot]).float()
        decay = torch.pow(self.policy.config.step_decay, age)
        return float(state.crf[row, layer, head, slot] * decay)

    def _compare_states(self, rows, layer, ref_evicted, got_evicted) -> int:
        """Assert the states agree up to near-tie victim swaps; returns how many swaps."""
        ref, got = self.state, self.got
        swaps = 0
        for i, row in enumerate(rows.tolist()):
            for head in range(self.h):
                ref_valid, got_valid = ref.valid[row, layer, head], got.valid[row, layer, head]
                if torch.equal(ref_valid, got_valid):
                    continue
                kept_by_ref_only = (ref_valid & ~got_valid).nonzero().flatten().tolist()
                kept_by_got_only = (got_valid & ~ref_valid).nonzero().flatten().tolist()
                assert len(kept_by_ref_only) == len(kept_by_got_only), "eviction counts differ"
                for a, c in zip(kept_by_ref_only, kept_by_got_only, strict=True):
                    # Each side dropped its victim's score: read it from the other side,
                    # whose CRF values agree with the reference's to float rounding.
                    sa = self._decayed(ref, row, layer, head, a)
                    sc = self._decayed(got, row, layer, head, c)
                    assert abs(sa - sc) <= 1e-6 * max(abs(sa), abs(sc), 1e-30), (
                        f"row {row} head {head}: victims differ beyond a near-tie ({sa} vs {sc})"
                    )
                swaps += 1
                for name in ref.entry_fields():  # resynchronise that head
                    getattr(got, name)[row, layer, head] = getattr(ref, name)[row, layer, head]
            assert torch.equal(ref_evicted[i], got_evicted[i])
        for name in ("valid", "position", "born", "tau", "prompt"):
            assert torch.equal(getattr(ref, name), getattr(got, name)), name
        torch.testing.assert_close(got.crf, ref.crf, rtol=1e-6, atol=0)
        return swaps


def _run(policy_name, params, *, h, g, d, dtype, seed, steps, **kwargs) -> int:
    """``params`` over prompt mode ``evict``: the scenario's prefilled entries stand for a
    prompt already evicted down to its budget, and they are evictable."""
    layers = kwargs.pop("layers", 1)
    policy = make_policy(policy_name, {"prompt": "evict", **params})
    scenario = _Scenario(policy, h, g, d, dtype=dtype, seed=seed, **kwargs)
    evictions = swaps = 0
    for _ in range(steps):
        e, s = scenario.step(layers)
        evictions += e
        swaps += s
    assert evictions > steps // 2, f"only {evictions} evictions: the scenario tests little"
    return swaps


@needs_kernels
@pytest.mark.usefixtures("no_reference")
class TestLRFUDecodeLayer:
    @pytest.fixture(autouse=True)
    def _torch_reference(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The generic step (the reference) runs on the torch ops, whatever the device."""
        monkeypatch.setenv(ops.ENV_VAR, "torch")

    @pytest.mark.parametrize(
        ("policy_name", "params", "h", "g", "d", "dtype", "split"),
        [
            ("crystal-lite", {}, 2, 2, 64, torch.float32, None),
            ("lru", {"top_p": 0.5}, 1, 7, 128, torch.bfloat16, None),
            ("crystal", {"gqa_reduce": "max"}, 2, 4, 64, torch.float32, 16),
            ("crystal-lite", {"top_p": 1.0, "lam": 1.0}, 2, 1, 64, torch.float16, None),
            ("crystal-lite", {"top_p": 0.5, "lam": 0.5}, 1, 2, 128, torch.bfloat16, 16),
            # the window (often wider than a head's random budget) and the prefilled
            # entries (prompt entries: outside it)
            ("crystal", {"recent_window": 3}, 2, 2, 64, torch.float32, None),
        ],
    )
    def test_matches_reference_over_random_steps(
        self, policy_name, params, h, g, d, dtype, split, split_size
    ) -> None:
        split_size(split)
        seed = h * 100 + g * 10 + d
        swaps = _run(
            policy_name, params, h=h, g=g, d=d, dtype=dtype, seed=seed, steps=6, max_blocks=5
        )
        assert swaps <= 1  # near-ties are rare on continuous random inputs

    def test_kept_prompt_entries_are_protected(self, split_size) -> None:
        """``prompt`` ``keep``: the prefilled entries are attended, never counted nor
        evicted (the kernel's PROTECT_PROMPT path against the generic step)."""
        split_size(16)
        params = {"prompt": "keep"}
        assert (
            _run(
                "crystal-lite",
                params,
                h=2,
                g=2,
                d=64,
                dtype=torch.float32,
                seed=21,
                steps=16,
                max_blocks=3,
            )
            <= 1
        )

    def test_two_layers_and_long_heads(self, split_size) -> None:
        """Layers are independent slices of one state; a head longer than a split."""
        split_size(16)
        assert (
            _run(
                "crystal-lite",
                {},
                h=1,
                g=2,
                d=64,
                dtype=torch.bfloat16,
                seed=9,
                steps=4,
                max_blocks=9,
                layers=2,
            )
            <= 1
        )

    def test_exact_ties_follow_the_tie_rules(self) -> None:
        """Identical keys make every probability of a head equal: hits go to the latest
        positions and victims are chosen by (score, tau, position) alone; no tolerance."""
        assert (
            _run(
                "crystal-lite",
                {"top_p": 0.5},
                h=2,
                g=2,
                d=64,
                dtype=torch.float32,
                seed=11,
                steps=6,
                max_blocks=3,
                same_keys=True,
            )
            == 0
        )

    def test_bad_rows_and_slots_are_rejected_before_any_write(self) -> None:
        policy = make_policy("crystal-lite")
        sc = _Scenario(policy, 2, 1, 64, max_blocks=2, dtype=torch.float32, seed=0)
        policy.begin_step(sc.state, torch.tensor([1], device=DEVICE))
        before = {k: v.clone() for k, v in vars(sc.state).items()}
        pool_before = sc.pool.clone()
        q = torch.randn(2, 2, 64, device=DEVICE)
        kv = torch.randn(2, 2, 64, device=DEVICE)
        budgets = torch.ones(2, 2, dtype=torch.long, device=DEVICE)
        zeros = torch.zeros(2, dtype=torch.long, device=DEVICE)

        def call(rows, slots):
            step = DecodeLayer(0, rows, slots, zeros, budgets, q, kv, kv, sc.pool, sc.tables, 0.125)
            triton_ops.lrfu_decode(step, sc.state, **policy.kernel_params())

        ok_slots = torch.zeros(2, 2, dtype=torch.long, device=DEVICE)
        with pytest.raises(ValueError, match="row 1 appears twice"):
            call(torch.tensor([1, 1], device=DEVICE), ok_slots)
        with pytest.raises(ValueError, match="out of range"):
            call(torch.tensor([1, 2], device=DEVICE), ok_slots + sc.state.num_slots)
        with pytest.raises(IndexError, match="rows"):
            call(torch.tensor([1, 4], device=DEVICE), ok_slots)
        for name, value in before.items():
            assert torch.equal(value, getattr(sc.state, name)), name
        assert torch.equal(pool_before, sc.pool)

    def test_pools_the_kernel_does_not_take_are_refused(self) -> None:
        """A float64 pool: no silent fallback, the ops hand out no kernel for it."""
        policy = make_policy("crystal-lite")
        sc = _Scenario(policy, 1, 1, 16, max_blocks=2, dtype=torch.float64, seed=0)
        assert not triton_ops.lrfu_decode_applies(sc.pool)
        one = torch.zeros(1, dtype=torch.long, device=DEVICE)
        x = torch.zeros(1, 1, 16, dtype=torch.float64, device=DEVICE)
        slots, budgets = one[:, None], one[:, None] + 1
        step = DecodeLayer(0, one, slots, one, budgets, x, x, x, sc.pool, sc.tables, 0.25)
        with pytest.raises(ValueError, match="does not take"):
            triton_ops.lrfu_decode(step, sc.state, **policy.kernel_params())


# -- the selection helpers of the fused step, on adversarial inputs --------------------


@triton.jit
def _top_p_probe(p_ptr, valid_ptr, position_ptr, out_ptr, top_p, N: tl.constexpr):
    offs = tl.arange(0, N)
    valid = tl.load(valid_ptr + offs) != 0
    hit = top_p_hits(tl.load(p_ptr + offs), valid, tl.load(position_ptr + offs), top_p)
    tl.store(out_ptr + offs, hit.to(tl.int8))


@triton.jit
def _lowest_probe(score_ptr, tau_ptr, position_ptr, cand_ptr, out_ptr, k, N: tl.constexpr):
    offs = tl.arange(0, N)
    candidates = tl.load(cand_ptr + offs) != 0
    victim = lowest_entries(
        tl.load(score_ptr + offs),
        tl.load(tau_ptr + offs),
        tl.load(position_ptr + offs),
        candidates,
        k,
    )
    tl.store(out_ptr + offs, victim.to(tl.int8))


@needs_kernels
class TestSelectionHelpers:
    """``top_p_hits`` and ``lowest_entries`` against the policy library on values drawn
    from a few binary fractions: sums are exact, so ties of probability, of score and of
    mass against the threshold happen all the time (random attention never makes them)."""

    N = 32

    def _fractions(self, gen: torch.Generator, n: int, levels: int) -> torch.Tensor:
        return torch.randint(0, levels, (n,), generator=gen).float() / levels

    def test_top_p_hits_match_the_reference(self) -> None:
        gen = torch.Generator().manual_seed(0)
        n = self.N
        for case in range(40):
            p = self._fractions(gen, n, 4)
            valid = torch.rand(n, generator=gen) < [0.1, 0.3, 0.7][case % 3]
            if case == 0:  # the mass above 0.5 equals the threshold exactly
                p[:3], valid[:] = torch.tensor([0.5, 0.25, 0.25]), False
                valid[:3] = True
            if case % 10 == 1:
                p.zero_()  # a head without mass has no hits
            position = torch.randperm(4 * n, generator=gen)[:n]
            top_p = [0.5, 0.25, 0.75, 0.9, 0.0625][case % 5]
            expected = top_p_mask(p[None], position[None], valid[None], top_p)[0]
            got = torch.empty(n, dtype=torch.int8, device=DEVICE)
            _top_p_probe[(1,)](
                p.to(DEVICE),
                valid.to(DEVICE).to(torch.int8),
                position.to(DEVICE),
                got,
                top_p,
                N=n,
            )
            assert torch.equal(got.bool().cpu(), expected), (case, top_p, p, valid, position)

    def test_lowest_entries_match_the_reference(self) -> None:
        gen = torch.Generator().manual_seed(1)
        for case in range(30):
            n = self.N
            score = self._fractions(gen, n, 4)
            tau = torch.randint(0, 3, (n,), generator=gen)
            position = torch.randperm(4 * n, generator=gen)[:n]
            candidates = torch.rand(n, generator=gen) < 0.8
            k = int(torch.randint(0, int(candidates.sum()) + 1, (1,), generator=gen))
            if case % 3 == 0:
                k = min(k, 1)  # the steady state: one victim
            expected = select_lowest(
                score[None],
                recency_key(tau, position)[None],
                candidates[None],
                torch.tensor([k]),
            )[0]
            got = torch.empty(n, dtype=torch.int8, device=DEVICE)
            _lowest_probe[(1,)](
                score.to(DEVICE),
                tau.to(DEVICE),
                position.to(DEVICE),
                candidates.to(DEVICE).to(torch.int8),
                got,
                k,
                N=n,
            )
            assert torch.equal(got.bool().cpu(), expected), (case, k, score, tau, candidates)


# -- dispatch and settings -----------------------------------------------------------------


@needs_kernels
class TestDispatch:
    def test_dispatch_selects_the_kernels(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv(ops.ENV_VAR, "triton")
        assert ops.get_impl() is triton_ops and "triton" in ops.available()
        monkeypatch.setenv(ops.ENV_VAR, "auto")
        assert ops.get_impl(device=torch.device("cuda")) is triton_ops
        for name in ops.OPS:
            assert callable(getattr(triton_ops, name)), name

    def test_ops_off_the_decode_path_stay_on_the_reference(self) -> None:
        assert triton_ops.gather_kv is torch_ref.gather_kv
        assert triton_ops.move_entries is torch_ref.move_entries
        assert triton_ops.first_free_slots is torch_ref.first_free_slots

    def test_cpu_tensors_without_the_interpreter_are_an_error(self, monkeypatch) -> None:
        monkeypatch.setattr(triton_ops.kernels, "INTERPRETED", False)
        pool = torch.zeros(1, 2, 4, 8)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            triton_ops.paged_decode_attention(
                torch.zeros(1, 1, 8),
                pool,
                torch.zeros(1, 1, 1, dtype=torch.int32),
                torch.zeros(1, 1, 4, dtype=torch.bool),
                1.0,
            )

    def test_unsupported_dtype_falls_back_to_the_reference(self) -> None:
        gen = torch.Generator().manual_seed(8)
        pool, tables, valid = _random_layout(gen, 2, 2, 3, 16, 64, torch.float64)
        query = torch.randn(2, 4, 64, generator=gen, dtype=torch.float64).to(DEVICE)
        out, probs = triton_ops.paged_decode_attention(query, pool, tables, valid, 0.125)
        ref_out, ref_probs = torch_ref.paged_decode_attention(query, pool, tables, valid, 0.125)
        assert torch.equal(out, ref_out) and torch.equal(probs, ref_probs)

    def test_split_size_must_be_a_power_of_two(self) -> None:
        with pytest.raises(ValueError, match="power of two >= 16, got 24"):
            triton_ops.set_split_size(24)
        with pytest.raises(ValueError, match="got 8"):
            triton_ops.set_split_size(8)
