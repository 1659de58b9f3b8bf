"""The Triton kernels on a GPU: correctness against the torch reference, then two timings.

Runs with torch, triton and CUDA only: no vLLM (it checks that none gets imported), no
installed crystal-vllm (from a checkout it maps ``crystal_vllm.kernels`` to ``kernels/``
itself, as ``pip install`` would).

1. **checks**: every Triton op (``crystal_vllm.ops.triton_ops``) against
   ``crystal_vllm.ops.torch_ref`` on the GPU at small random shapes: ``write_kv`` bit for
   bit; ``paged_decode_attention`` (GQA 1/4/7, head sizes 64/128/256, bf16/fp16/fp32,
   split-K forced on and off) by relative error, bounds as in
   ``tests/ops/test_triton_kernels.py``; ``lrfu_decode`` over several steps of a
   random schedule, counting heads whose state differs from the reference and how many
   of those are victims swapped between near-ties of the decayed CRF (1e-6 relative, the
   only difference allowed). A differing hit also counts: on a GPU the reference's top-p
   cumulative sum is float32 (the kernel's float64), so a flip at the boundary is
   possible, and worth a look.
2. **bandwidth**: ``paged_decode_attention`` at batch 64, 8 KV heads (32 query heads),
   4096 entries per head, head size 128, bf16, block size 16, head-blocks scattered over
   the pool. Bytes moved (K and V of every entry, the mask, and the float32 scores written,
   read back and rewritten as probabilities) per second, as a fraction of the device's
   copy bandwidth (``Tensor.copy_`` of 1 GiB, read + write). Target >= 80%.
3. **fused overhead**: ``lrfu_decode`` (``crystal-lite``, budget 4095: one new entry
   and one eviction per head per call, like steady-state decoding) against
   ``paged_decode_attention`` alone on the same shape. Target: at most 10% more time.

Times are medians over CUDA-event-timed calls after warm-up, with the ops' value checks
off (as the server runs them). Prints a markdown table and one ``RESULT {json}`` line;
exits 1 if a check fails. About 1-2 minutes, most of it Triton compiling the kernels.

``--smoke`` runs the same code at toy sizes in Triton's interpreter on the CPU (CI): the
checks are real, the timings meaningless.

Example: ``python benchmarks/kernel_gpu.py`` (or ``--smoke``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Sizes:
    """The timed shape, and how much checking and timing to do."""

    batch: int
    kv_heads: int
    group: int
    head_dim: int
    entries: int
    block_size: int
    iterations: int
    lrfu_steps: int


FULL = Sizes(batch=64, kv_heads=8, group=4, head_dim=128, entries=4096, block_size=16,
             iterations=20, lrfu_steps=6)  # fmt: skip
SMOKE = Sizes(batch=2, kv_heads=2, group=2, head_dim=64, entries=64, block_size=16,
              iterations=1, lrfu_steps=2)  # fmt: skip


def _import_crystal_vllm() -> None:
    """Make ``crystal_vllm`` (with ``crystal_vllm.kernels``) importable from a checkout."""
    if importlib.util.find_spec("crystal_vllm") is None:
        sys.path.insert(0, str(ROOT))
    if importlib.util.find_spec("crystal_vllm.kernels") is None:
        kernels = ROOT / "kernels"
        spec = importlib.util.spec_from_file_location(
            "crystal_vllm.kernels",
            kernels / "__init__.py",
            submodule_search_locations=[str(kernels)],
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["crystal_vllm.kernels"] = module
        spec.loader.exec_module(module)


# -- random inputs --------------------------------------------------------------------


def _layout(torch, gen, b, h, mb, bs, d, dtype, device, fill: float | None = None):
    """Pool, per-head tables (``-1`` entries included) and a validity mask: each head a
    random fill (``fill`` fixes it) of its assigned slots, NaN in every dead slot."""
    num_head_blocks = b * h * mb + 3
    tables = torch.randperm(num_head_blocks, generator=gen)[: b * h * mb].view(b, h, mb)
    assigned = torch.rand(b, h, mb, generator=gen) < (0.8 if fill is None else 1.0)
    tables = torch.where(assigned, tables, -1).to(torch.int32)
    occupancy = torch.rand(b, h, 1, generator=gen) if fill is None else torch.full((b, h, 1), fill)
    valid = assigned.repeat_interleave(bs, dim=-1) & (
        torch.rand(b, h, mb * bs, generator=gen) < occupancy
    )
    pool = torch.full((num_head_blocks, 2, bs, d), float("nan"), dtype=dtype)
    r, k, slot = valid.nonzero(as_tuple=True)
    pool[tables[r, k, slot // bs].long(), :, slot % bs] = torch.randn(
        len(slot), 2, d, generator=gen
    ).to(dtype)
    return pool.to(device), tables.to(device), valid.to(device)


def _out_error(torch, out, ref) -> float:
    """The largest ratio of an output's error to its bound (<= 1 passes): ``1e-5`` of the
    row's largest |value| in float32. In 16-bit dtypes, one unit in the last place of the
    output dtype plus ``2**-16`` of the row's largest |value|: the kernel's P @ V on 16-bit
    values is split into bfloat16 products, accurate to about ``2**-16`` relative per term
    (``kernels/common.py`` ``weighted_sum_v``), a little coarser than ``1e-5``."""
    diff = (out.float() - ref.float()).abs()
    row = ref.float().abs().amax(dim=-1, keepdim=True)
    bound = 1e-5 * row
    if ref.dtype != torch.float32:
        bound = 2.0**-16 * row + torch.finfo(ref.dtype).eps * ref.float().abs()
    return float((diff / bound.clamp_min(1e-30)).max())


# -- checks -----------------------------------------------------------------------------


def check_write_kv(torch, triton_ops, torch_ref, device) -> list[dict[str, Any]]:
    results = []
    cases = [
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.float16),
    ]
    for key_dtype, pool_dtype in cases:
        gen = torch.Generator().manual_seed(7)
        b, h, mb, bs, d, t = 3, 2, 4, 16, 128, 5
        tables = torch.randperm(b * h * mb + 2, generator=gen)[: b * h * mb].view(b, h, mb).int()
        slots = torch.stack([torch.randperm(3 * bs, generator=gen)[:t] for _ in range(b * h)])
        slots = slots.view(b, h, t)
        slots[2, 1, 1] = -1
        key = torch.randn(b, t, h, d, generator=gen).to(key_dtype)
        value = torch.randn(b, t, h, d, generator=gen).to(key_dtype)
        pool = torch.randn(b * h * mb + 2, 2, bs, d, generator=gen).to(pool_dtype)
        pool, tables, slots, key, value = (x.to(device) for x in (pool, tables, slots, key, value))
        expected = pool.clone()
        torch_ref.write_kv(expected, tables, slots, key, value)
        triton_ops.write_kv(pool, tables, slots, key, value)
        name = f"write_kv {str(key_dtype)[6:]}->{str(pool_dtype)[6:]}"
        results.append({"check": name, "ok": bool(torch.equal(pool, expected)), "error": 0.0})
    return results


def check_attention(torch, triton_ops, torch_ref, device, smoke: bool) -> list[dict[str, Any]]:
    cases = [
        (1, 64, torch.float32, None),
        (4, 128, torch.bfloat16, 64),
        (7, 128, torch.bfloat16, None),
        (4, 64, torch.float16, 16),
        (2, 256, torch.bfloat16, None),
    ]
    if smoke:
        cases = cases[:2]
    results = []
    for group, head_dim, dtype, split in cases:
        previous = triton_ops.set_split_size(split)
        try:
            gen = torch.Generator().manual_seed(group * 100 + head_dim)
            b, h, mb, bs = 3, 2, 12 if not smoke else 5, 16
            pool, tables, valid = _layout(torch, gen, b, h, mb, bs, head_dim, dtype, device)
            query = torch.randn(b, h * group, head_dim, generator=gen).to(dtype).to(device)
            scale = head_dim**-0.5
            out, probs = triton_ops.paged_decode_attention(query, pool, tables, valid, scale)
            ref_out, ref_probs = torch_ref.paged_decode_attention(query, pool, tables, valid, scale)
        finally:
            triton_ops.set_split_size(previous)
        # Bound of the probabilities: 1e-5 relative plus 1e-9 absolute.
        probs_error = float(((probs - ref_probs).abs() / (1e-5 * ref_probs + 1e-9)).max())
        error = max(probs_error, _out_error(torch, out, ref_out))
        finite = bool(torch.isfinite(out).all() and torch.isfinite(probs).all())
        results.append(
            {
                "check": f"attention G={group} D={head_dim} {str(dtype)[6:]} split={split}",
                "ok": finite and error <= 1,
                "error": error,
            }
        )
    return results


def check_lrfu(
    torch, triton_ops, torch_ref, make_policy, device, steps: int
) -> list[dict[str, Any]]:
    cases = [
        ("crystal-lite", {}, 4, 128, torch.bfloat16, None),
        ("lru", {"top_p": 0.5}, 7, 64, torch.float32, None),
        ("crystal", {"gqa_reduce": "max"}, 2, 128, torch.float16, 16),
    ]
    results = []
    for name, params, group, head_dim, dtype, split in cases:
        previous = triton_ops.set_split_size(split)
        try:
            policy, label = make_policy(name, params), f"lrfu {name} {params} G={group}"
            args = (policy, group, head_dim, dtype, device, steps, label)
            results.append(_lrfu_scenario(torch, triton_ops, torch_ref, *args))
        finally:
            triton_ops.set_split_size(previous)
    return results


def _lrfu_scenario(torch, triton_ops, torch_ref, policy, group, d, dtype, device, steps, label):
    """Random steps on two copies of one state; a head that differs is counted (a near-tie
    if the reference's decayed CRF of the swapped entries agree to 1e-6) and resynced."""
    from crystal_vllm.ops import DecodeLayer
    from crystal_vllm.policy import KVPolicy

    gen = torch.Generator().manual_seed(group * 10 + d)
    rows_total, h, mb, bs = 6, 2, 8, 4
    slots_per_head = mb * bs
    tables = torch.randperm(rows_total * h * mb, generator=gen).view(rows_total, 1, h, mb)
    tables = tables.int().to(device)
    pool = torch.randn(rows_total * h * mb, 2, bs, d, generator=gen).to(dtype).to(device)
    state = policy.init_state(rows_total, 1, h, slots_per_head, device)
    fill = torch.rand(rows_total, 1, h, slots_per_head, generator=gen) < 0.6
    fill[..., -1] = False  # a free slot for the first step
    positions = torch.arange(slots_per_head).expand_as(fill)
    all_rows = torch.arange(rows_total, device=device)
    # Decode entries, not prompt ones: a policy may keep the prompt out of eviction.
    policy.insert(state, all_rows, fill.to(device), positions.to(device))
    got = type(state)(**{k: v.clone() for k, v in vars(state).items()})
    got_pool = pool.clone()
    next_position = slots_per_head
    mismatches = near_ties = evictions = 0
    out_error = 0.0
    for _ in range(steps):
        rows = torch.randperm(rows_total, generator=gen)[
            : int(torch.randint(1, rows_total + 1, (1,), generator=gen))
        ]
        rows = rows.to(device)
        b = rows.numel()
        policy.begin_step(state, rows)
        policy.begin_step(got, rows)
        slots = torch_ref.first_free_slots(state.valid, rows)[:, 0]
        budgets = torch.randint(1, slots_per_head, (b, h), generator=gen).to(device)
        q = torch.randn(b, h * group, d, generator=gen).to(dtype).to(device)
        k = torch.randn(b, h, d, generator=gen).to(dtype).to(device)
        v = torch.randn(b, h, d, generator=gen).to(dtype).to(device)
        position = torch.full((b,), next_position, device=device)
        next_position += 1
        args = (0, rows, slots, position, budgets, q, k, v)
        # The oracle: the policy's generic step over the torch reference ops (main sets
        # CRYSTAL_VLLM_OPS=torch), against the Triton kernel on a copy.
        ref_step, step = (DecodeLayer(*args, p, tables, d**-0.5) for p in (pool, got_pool))
        ref_out, ref_ev = KVPolicy.decode_layer(policy, state, ref_step)
        out, ev = triton_ops.lrfu_decode(step, got, **policy.kernel_params())
        out_error = max(out_error, _out_error(torch, out, ref_out))
        evictions += int(ref_ev.sum())
        for row in rows.tolist():
            for head in range(h):
                same = all(
                    torch.equal(getattr(state, f)[row, 0, head], getattr(got, f)[row, 0, head])
                    for f in ("valid", "position", "born", "tau", "prompt")
                )
                same = same and torch.allclose(
                    state.crf[row, 0, head], got.crf[row, 0, head], rtol=1e-6, atol=0
                )
                if same:
                    continue
                mismatches += 1
                near_ties += _is_near_tie(torch, policy, state, got, row, head)
                for f in state.entry_fields():
                    getattr(got, f)[row, 0, head] = getattr(state, f)[row, 0, head]
    return {
        "check": label,
        "ok": mismatches == near_ties and out_error <= 1 and evictions > 0,
        "error": out_error,
        "mismatched_heads": mismatches,
        "near_ties": near_ties,
        "evictions": evictions,
    }


def _is_near_tie(torch, policy, ref, got, row, head) -> bool:
    """Whether the two sides chose different victims among entries whose decayed CRF
    (as the reference computes it) agree to 1e-6 relative."""
    ref_valid, got_valid = ref.valid[row, 0, head], got.valid[row, 0, head]
    only_ref = (ref_valid & ~got_valid).nonzero().flatten().tolist()
    only_got = (got_valid & ~ref_valid).nonzero().flatten().tolist()
    if not only_ref or len(only_ref) != len(only_got):
        return False

    def decayed(state, slot):
        age = (state.step[row] - state.tau[row, 0, head, slot]).float()
        return float(state.crf[row, 0, head, slot] * torch.pow(policy.config.step_decay, age))

    return all(
        abs(decayed(ref, a) - decayed(got, c))
        <= 1e-6 * max(decayed(ref, a), decayed(got, c), 1e-30)
        for a, c in zip(only_ref, only_got, strict=True)
    )


# -- timings ----------------------------------------------------------------------------


def _timer(torch, device) -> Callable[[Callable[[], Any], Callable[[Any], Any], int], float]:
    """``time(setup, call, iterations)``: median seconds of ``call(setup())``, timed with CUDA
    events around ``call`` only (wall-clock on the CPU), after two untimed calls."""

    def time_calls(setup, call, iterations):
        for _ in range(2):
            call(setup())
        samples = []
        for _ in range(iterations):
            args = setup()
            if device.type == "cuda":
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                call(args)
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1e3)
            else:
                began = time.perf_counter()
                call(args)
                samples.append(time.perf_counter() - began)
        return statistics.median(samples)

    return time_calls


def copy_bandwidth(torch, device, time_calls, smoke: bool) -> float:
    """Bytes per second of a device-to-device copy (read plus write)."""
    nbytes = (1 << 20) if smoke else (1 << 30)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = time_calls(lambda: None, lambda _: dst.copy_(src), 3 if smoke else 20)
    return 2 * nbytes / seconds


def time_attention_and_fused(
    torch, triton_ops, make_policy, device, sizes: Sizes, time_calls
) -> dict[str, float]:
    """Time attention alone and the fused LRFU step on the same full heads."""
    from crystal_vllm.ops import DecodeLayer

    b, h, g, d = sizes.batch, sizes.kv_heads, sizes.group, sizes.head_dim
    s, bs = sizes.entries, sizes.block_size
    gen = torch.Generator(device=device).manual_seed(0)
    mb = s // bs
    num_head_blocks = b * h * mb
    pool = torch.randn(
        num_head_blocks, 2, bs, d, generator=gen, device=device, dtype=torch.bfloat16
    )
    tables = torch.randperm(num_head_blocks, device=device).view(b, 1, h, mb).int()
    query = torch.randn(b, h * g, d, generator=gen, device=device, dtype=torch.bfloat16)
    valid = torch.ones(b, h, s, dtype=torch.bool, device=device)
    scale = d**-0.5
    attention = time_calls(
        lambda: None,
        lambda _: triton_ops.paged_decode_attention(query, pool, tables[:, 0], valid, scale),
        sizes.iterations,
    )
    kv_bytes = 2 * b * h * s * d * pool.element_size()
    prob_bytes = 3 * b * h * g * s * 4 + b * h * s  # scores out, in, probabilities out; mask
    # One new entry and one victim per head and call: every head holds s - 1 entries.
    policy = make_policy("crystal-lite", {})
    rows = torch.arange(b, device=device)
    state = policy.init_state(b, 1, h, s, device)
    full = torch.ones(b, 1, h, s, dtype=torch.bool, device=device)
    full[..., -1] = False
    positions = torch.arange(s, device=device).expand(b, 1, h, s)
    policy.insert(state, rows, full, positions)
    budgets = torch.full((b, h), s - 1, device=device)
    key = torch.randn(b, h, d, generator=gen, device=device, dtype=torch.bfloat16)
    step = [s]

    def next_step():
        policy.begin_step(state, rows)
        slots = triton_ops.first_free_slots(state.valid, rows)[:, 0]
        step[0] += 1
        return slots, torch.full((b,), step[0], device=device)

    def fused_call(a):
        step = DecodeLayer(0, rows, a[0], a[1], budgets, query, key, key, pool, tables, scale)
        return triton_ops.lrfu_decode(step, state, **policy.kernel_params())

    fused = time_calls(next_step, fused_call, sizes.iterations)
    return {
        "attention_s": attention,
        "fused_s": fused,
        "bytes": kv_bytes + prob_bytes,
        "kv_bytes": kv_bytes,
    }


# -- report -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="toy sizes in Triton's interpreter on the CPU (CI); timings meaningless",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    _import_crystal_vllm()

    import torch

    os.environ["CRYSTAL_VLLM_OPS"] = "torch"  # the generic step over the torch ops: the oracle
    from crystal_vllm.ops import torch_ref, triton_ops
    from crystal_vllm.policy import make_policy

    vllm_imported = "vllm" in sys.modules
    if args.smoke:
        device, sizes = torch.device("cpu"), SMOKE
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --smoke")
    else:
        device, sizes = torch.device("cuda"), FULL
    triton_ops.set_value_checks(True)
    checks = check_write_kv(torch, triton_ops, torch_ref, device)
    checks += check_attention(torch, triton_ops, torch_ref, device, args.smoke)
    checks += check_lrfu(torch, triton_ops, torch_ref, make_policy, device, sizes.lrfu_steps)

    triton_ops.set_value_checks(False)
    time_calls = _timer(torch, device)
    copy = copy_bandwidth(torch, device, time_calls, args.smoke)
    timed = time_attention_and_fused(torch, triton_ops, make_policy, device, sizes, time_calls)
    bandwidth = timed["bytes"] / timed["attention_s"]
    extra = timed["fused_s"] / timed["attention_s"] - 1
    result = {
        "device": "cpu (interpreter)" if args.smoke else torch.cuda.get_device_name(device),
        "smoke": args.smoke,
        "vllm_imported": vllm_imported,
        "checks_ok": all(c["ok"] for c in checks),
        "checks": checks,
        "shape": vars(sizes) | {"dtype": "bfloat16"},
        "copy_bandwidth_gbs": copy / 1e9,
        "attention_ms": timed["attention_s"] * 1e3,
        "attention_bytes": timed["bytes"],
        "attention_bandwidth_gbs": bandwidth / 1e9,
        "attention_kv_bandwidth_gbs": timed["kv_bytes"] / timed["attention_s"] / 1e9,
        "attention_fraction_of_copy": bandwidth / copy,
        "fused_ms": timed["fused_s"] * 1e3,
        "fused_extra_fraction": extra,
        "targets": {"attention_fraction_of_copy": 0.8, "fused_extra_fraction": 0.10},
    }
    print("| check | ok | error / bound |")
    print("|---|---|---|")
    for c in checks:
        extra_info = (
            f" ({c['mismatched_heads']} heads differ, {c['near_ties']} near-ties)"
            if "near_ties" in c
            else ""
        )
        print(f"| {c['check']} | {'yes' if c['ok'] else 'NO'} | {c['error']:.3g}{extra_info} |")
    print()
    print("| measure | value | target |")
    print("|---|---|---|")
    print(f"| device copy bandwidth | {copy / 1e9:.0f} GB/s | |")
    print(
        f"| attention, {sizes.batch} x {sizes.kv_heads} heads x {sizes.entries} entries | "
        f"{timed['attention_s'] * 1e3:.3f} ms, {bandwidth / 1e9:.0f} GB/s = "
        f"{bandwidth / copy:.0%} of copy | >= 80% |"
    )
    print(
        f"| fused LRFU step, same heads | {timed['fused_s'] * 1e3:.3f} ms = {extra:+.1%} "
        "vs attention | <= +10% |"
    )
    if args.smoke:
        print("\n(--smoke: Triton's interpreter on the CPU; the timings mean nothing)")
    print("RESULT " + json.dumps(result))
    return 0 if result["checks_ok"] and not vllm_imported else 1


if __name__ == "__main__":
    sys.exit(main())
