"""Time one layer of per-head paged decode attention: torch reference vs C++ kernels vs vLLM.

For each shape (batch ``b``, KV heads ``H``, query heads per KV head ``G``, head size
``D``, ``S`` cached entries per head, bf16 by default) it times one call of

* ``torch``: ``crystal_vllm.ops.torch_ref.paged_decode_attention`` (the oracle);
* ``cpu``: ``crystal_vllm.ops.cpu.paged_decode_attention`` (``csrc/``), in the ISA
  ``--isa`` (default: the best this CPU has);
* ``fused``: ``crystal_vllm.ops.cpu.lrfu_decode``, the whole Crystal-KV decode step
  of one layer (write the new token, attention, top-p hits, CRF update, one eviction per
  head) under ``crystal-lite`` with the budget at ``S``, plus picking each head's free
  slot (the victim of the previous call) as the runtime does per step;
* ``vllm``: vLLM's own CPU decode kernel ``torch.ops._C.cpu_attention_with_kv_cache``
  (the ISA its CPU backend would pick: AMX for bf16 on CPUs that have it, else AVX-512
  ``vec``/``vec16``; shown in the header) on the same shape in vLLM's layout, including its
  per-step scheduler metadata. It returns no probabilities, so it does less work than the
  other two; it is the cost our kernel is measured against.

Both caches receive the same K/V (every head holds ``S`` entries; Crystal heads may hold
holes, which cost the kernel a skipped slot each), so the table also reports the largest
difference between our output and vLLM's as a check that the vLLM inputs are right.
Each time is the median of ``--repeats`` calls after one warm-up (fewer for calls slower
than ~0.2 s) on ``--threads`` threads (default 1, like vLLM's CPU worker here), measured
as the thread's CPU time with one thread (robust to other jobs on a shared machine) and
as wall-clock time with more. The
``step`` column multiplies the ``fused`` time by the model's layer count. Results are noisy
on a shared machine: compare columns of one run.

Example: ``python benchmarks/kernel_cpu.py`` or ``python benchmarks/kernel_cpu.py --quick``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from crystal_vllm.ops import torch_ref


@dataclass(frozen=True)
class Shape:
    label: str
    batch: int
    kv_heads: int
    group: int
    head_dim: int
    slots: int
    layers: int


def _shapes(quick: bool) -> list[Shape]:
    shapes = [Shape("tiny-like", 32, 4, 2, 64, 1152, 4)]
    batches, slots = ((1, 32), (256, 4096)) if quick else ((1, 8, 32), (256, 1024, 4096))
    for b in batches:
        for s in slots:
            shapes.append(Shape("SmolLM2", b, 3, 3, 64, s, 30))
    return shapes


#: The clock of every timing: this thread's CPU time with one thread (other jobs on a
#: shared machine barely disturb it, unlike the wall clock), the wall clock otherwise.
_clock: Callable[[], float] = time.thread_time


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    start = _clock()
    fn()  # warm-up; also sizes the number of repeats for slow calls
    first = _clock() - start
    n = max(3, min(repeats, int(2.0 / max(first, 1e-9))))
    times = []
    for _ in range(n):
        start = _clock()
        fn()
        times.append(_clock() - start)
    return 1e3 * statistics.median(times)


class _Case:
    """One shape: our pool and tables, vLLM's cache and metadata, holding the same K/V."""

    def __init__(self, shape: Shape, block_size: int, dtype: torch.dtype, gen: torch.Generator):
        b, h, d, s, bs = shape.batch, shape.kv_heads, shape.head_dim, shape.slots, block_size
        mb = -(-s // bs)
        self.query = torch.randn(b, h * shape.group, d, generator=gen).to(dtype)
        self.scale = d**-0.5
        key = torch.randn(b, s, h, d, generator=gen).to(dtype)
        value = torch.randn(b, s, h, d, generator=gen).to(dtype)

        # Ours: every (request, head) gets its own scattered head-blocks.
        self.pool = torch.empty(b * h * mb, 2, bs, d, dtype=dtype)
        self.tables = torch.randperm(b * h * mb, generator=gen).view(b, h, mb).to(torch.int32)
        self.valid = torch.ones(b, h, s, dtype=torch.bool)
        slots = torch.arange(s).expand(b, h, s)
        torch_ref.write_kv(self.pool, self.tables, slots, key, value)

        self.vllm = _VllmCase(shape, bs, dtype, key, value, gen)
        self._init_fused(shape, bs, dtype, key, value, gen)

    def _init_fused(self, shape: Shape, bs: int, dtype, key, value, gen) -> None:
        """A crystal-lite state with S entries per head and one spare head-block, so each
        call inserts a token, attends over S + 1 entries and evicts one per head."""
        from crystal_vllm.policy import make_policy

        b, h, d, s = shape.batch, shape.kv_heads, shape.head_dim, shape.slots
        mb = -(-s // bs) + 1
        self.policy = make_policy("crystal-lite")
        self.state = self.policy.init_state(b, 1, h, mb * bs)
        self.state.valid[..., :s] = True
        self.state.position[..., :s] = torch.arange(s)
        self.state.crf[..., :s] = torch.rand(b, 1, h, s, generator=gen)
        self.fused_pool = torch.empty(b * h * mb, 2, bs, d, dtype=dtype)
        ids = torch.randperm(b * h * mb, generator=gen).view(b, 1, h, mb).to(torch.int32)
        self.fused_tables = ids
        slots = torch.arange(s).expand(b, h, s)
        torch_ref.write_kv(self.fused_pool, ids[:, 0], slots, key, value)
        self.rows = torch.arange(b)
        self.budgets = torch.full((b, h), s, dtype=torch.long)
        self.new_key = torch.randn(b, h, d, generator=gen).to(dtype)
        self.new_value = torch.randn(b, h, d, generator=gen).to(dtype)

    def fused_call(self) -> tuple[torch.Tensor, torch.Tensor]:
        from crystal_vllm.ops import DecodeLayer, cpu

        self.policy.begin_step(self.state, self.rows)
        slots = (~self.state.valid[:, 0]).view(torch.uint8).argmax(-1)
        step = DecodeLayer(
            0, self.rows, slots, self.state.step.clone(), self.budgets, self.query,
            self.new_key, self.new_value, self.fused_pool, self.fused_tables, self.scale,
        )  # fmt: skip
        return cpu.lrfu_decode(step, self.state, **self.policy.kernel_params())

    def torch_call(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch_ref.paged_decode_attention(
            self.query, self.pool, self.tables, self.valid, self.scale
        )

    def cpu_call(self) -> tuple[torch.Tensor, torch.Tensor]:
        from crystal_vllm.ops import cpu

        return cpu.paged_decode_attention(
            self.query, self.pool, self.tables, self.valid, self.scale
        )


class _VllmCase:
    """vLLM's CPU decode attention on an equal shape, in its own paged layout."""

    def __init__(self, shape: Shape, bs: int, dtype, key, value, gen: torch.Generator):
        self.error: str | None = None
        try:
            from vllm import _custom_ops as vllm_ops
            from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
        except Exception as exc:  # noqa: BLE001 - any import problem means "not available"
            self.error = f"vLLM CPU ops unavailable: {exc}"
            return
        b, h, d, s = shape.batch, shape.kv_heads, shape.head_dim, shape.slots
        mb = -(-s // bs)
        self.ops = vllm_ops
        self.isa = _get_attn_isa(dtype, bs, d)
        if self.isa == "amx":
            # AMX tiles need a per-process OS permission; without it the kernel dies of
            # SIGILL (vLLM's worker gets it through torch's oneDNN set-up).
            torch.cpu._init_amx()
        # vLLM's per-layer cache [num_blocks, H, bs, 2D], split as its backend does.
        cache = torch.zeros(b * mb, h, bs, 2 * d, dtype=dtype)
        self.key_cache, self.value_cache = cache.view(b * mb, h, 2 * bs, d).chunk(2, dim=2)
        self.block_table = torch.randperm(b * mb, generator=gen).view(b, mb).to(torch.int32)
        pos = torch.arange(s)
        slot_mapping = (self.block_table[:, pos // bs].long() * bs + pos % bs).flatten()
        vllm_ops.cpu_attn_reshape_and_cache(
            key.flatten(0, 1), value.flatten(0, 1), self.key_cache, self.value_cache,
            slot_mapping, self.isa,
        )  # fmt: skip
        self.seq_lens = torch.full((b,), s, dtype=torch.int32)
        self.query_start_loc = torch.arange(b + 1, dtype=torch.int32)
        self.dtype = dtype
        self.shape = shape

    def call(self, query: torch.Tensor, scale: float) -> torch.Tensor:
        ops, shape = self.ops, self.shape
        # Part of every step in vLLM's backend (CPUAttentionMetadataBuilder.build).
        metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=shape.batch,
            num_heads=shape.kv_heads * shape.group,
            num_kv_heads=shape.kv_heads,
            head_dim=shape.head_dim,
            seq_lens=self.seq_lens,
            dtype=self.dtype,
            query_start_loc=self.query_start_loc,
            causal=True,
            sliding_window_size=-1,
            isa=self.isa,
            enable_kv_split=False,
        )
        output = torch.empty_like(query)
        ops.cpu_attention_with_kv_cache(
            query=query,
            key_cache=self.key_cache,
            value_cache=self.value_cache,
            output=output,
            query_start_loc=self.query_start_loc,
            seq_lens=self.seq_lens,
            scale=scale,
            causal=True,
            alibi_slopes=None,
            sliding_window=-1,
            block_table=self.block_table,
            softcap=0.0,
            scheduler_metadata=metadata,
            s_aux=None,
        )
        return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per cell")
    parser.add_argument("--block-size", type=int, default=128, help="slots per block (128)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--isa", default="auto", help="cpu kernel ISA: auto|avx512|avx2|scalar")
    parser.add_argument("--quick", action="store_true", help="fewer shapes (smoke run)")
    parser.add_argument("--no-torch", action="store_true", help="skip the slow torch reference")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    global _clock
    _clock = time.thread_time if args.threads == 1 else time.perf_counter
    dtype = getattr(torch, args.dtype)
    try:
        from crystal_vllm.ops import cpu
    except ImportError as exc:
        raise SystemExit(f"the C++ kernels are not built: {exc}") from exc
    cpu.set_cpu_isa(args.isa)

    print(
        f"# paged decode attention, one layer: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, torch {torch.__version__}, "
        f"{args.threads} thread(s), {args.dtype}, block size {args.block_size}, "
        f"cpu ISA {cpu.cpu_isa()}; median ms per call "
        f"({'thread CPU time' if args.threads == 1 else 'wall clock'})"
    )
    print()
    print(
        "| shape | b | H x G | D | S | torch ms | cpu ms | fused ms | vllm ms | torch/cpu "
        "| cpu/vllm | fused/vllm | fused step ms (layers) | vllm ISA | max abs diff vs vllm |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for shape in _shapes(args.quick):
        case = _Case(shape, args.block_size, dtype, gen)
        t_cpu = _median_ms(case.cpu_call, args.repeats)
        t_fused = _median_ms(case.fused_call, args.repeats)
        t_ref = float("nan") if args.no_torch else _median_ms(case.torch_call, args.repeats)
        if case.vllm.error is None:
            t_vllm = _median_ms(lambda c=case: c.vllm.call(c.query, c.scale), args.repeats)
            out_vllm = case.vllm.call(case.query, case.scale)
            diff = f"{(case.cpu_call()[0].float() - out_vllm.float()).abs().max():.2g}"
        else:
            t_vllm, diff = float("nan"), case.vllm.error
        vllm_isa = getattr(case.vllm, "isa", "-")
        print(
            f"| {shape.label} | {shape.batch} | {shape.kv_heads} x {shape.group} "
            f"| {shape.head_dim} | {shape.slots} | {t_ref:.3f} | {t_cpu:.3f} | {t_fused:.3f} "
            f"| {t_vllm:.3f} | {t_ref / t_cpu:.1f} | {t_cpu / t_vllm:.2f} | {t_fused / t_vllm:.2f} "
            f"| {t_fused * shape.layers:.2f} ({shape.layers}) | {vllm_isa} | {diff} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
