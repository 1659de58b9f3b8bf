"""The ``cpu`` implementation of the paged KV ops: C++ kernels from ``csrc/``.

The kernels live in the ``crystal_vllm._C`` extension, built by ``pip install -e .
--no-build-isolation`` (see ``setup.py``), and are registered as
``torch.ops.crystal_vllm.*``. Importing this module raises ImportError when the
extension is missing, which the dispatcher in :mod:`crystal_vllm.ops` reports as "not
available", so ``CRYSTAL_VLLM_OPS=auto`` falls back to the torch reference.

Semantics, argument checks and error types are those of :mod:`crystal_vllm.ops.torch_ref`
(the oracle in ``tests/ops/test_cpu_kernels.py``). Calls the kernels do not cover (tensors
on another device, a pool dtype other than float32/bfloat16/float16, a pool whose last
dimension is strided) go to the reference, as do ``gather_kv`` and ``move_entries``:
they run outside the per-step decode path, so a kernel would not pay for itself.
The fused LRFU step has no such fallback: :func:`lrfu_decode_applies` says which pools it
takes, and :func:`crystal_vllm.ops.fused_lrfu_decode` asks it before handing it out.
"""

from __future__ import annotations

import torch

from crystal_vllm.ops import torch_ref
from crystal_vllm.ops.decode import DecodeLayer, LRFUTensors

try:
    from crystal_vllm import _C
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "crystal_vllm._C (the C++ CPU kernels) is not built; reinstall with "
        "`pip install -e . --no-build-isolation` and a C++ compiler"
    ) from exc

__all__ = [
    "cpu_isa",
    "first_free_slots",
    "gather_kv",
    "lrfu_decode",
    "lrfu_decode_applies",
    "move_entries",
    "paged_decode_attention",
    "set_cpu_isa",
    "write_kv",
]

_KERNEL_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})
# The LRFUState fields the fused kernel reads and writes (per-entry, [R, L, H, S]).
_LRFU_FIELDS = ("valid", "position", "born", "crf", "tau", "prompt")

gather_kv = torch_ref.gather_kv
move_entries = torch_ref.move_entries


def cpu_isa() -> str:
    """The instruction set the kernels use: ``avx512``, ``avx2`` or ``scalar``."""
    return _C.cpu_isa()


def set_cpu_isa(name: str) -> str:
    """Use ``name`` (``auto``, ``avx512``, ``avx2``, ``scalar``); returns the previous ISA.

    For tests and benchmarks: the default is already the best the CPU supports.
    """
    return _C.set_cpu_isa(name)


def _kernel_applies(kv_pool: torch.Tensor) -> bool:
    return (
        kv_pool.device.type == "cpu"
        and kv_pool.dtype in _KERNEL_DTYPES
        and kv_pool.dim() == 4
        and kv_pool.stride(-1) == 1
    )


def write_kv(
    kv_pool: torch.Tensor,
    block_tables: torch.Tensor,
    slots: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
) -> None:
    """Scatter new K/V per head into their slots; see :func:`torch_ref.write_kv`."""
    if not _kernel_applies(kv_pool):
        torch_ref.write_kv(kv_pool, block_tables, slots, key, value)
        return
    torch.ops.crystal_vllm.write_kv(kv_pool, block_tables, slots, key, value)


def paged_decode_attention(
    query: torch.Tensor,
    kv_pool: torch.Tensor,
    block_tables: torch.Tensor,
    valid: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over per-head tables, with probabilities; see
    :func:`torch_ref.paged_decode_attention`.

    Scores, softmax and the weighted sum of V are float32 as in the reference; only the
    summation order differs, and ``exp`` is a polynomial (about 1 ulp) that returns
    exactly 0 below ``ln(FLT_MIN)`` where the reference may return a denormal.
    """
    if not _kernel_applies(kv_pool):
        return torch_ref.paged_decode_attention(query, kv_pool, block_tables, valid, scale)
    return torch.ops.crystal_vllm.paged_decode_attention(
        query, kv_pool, block_tables, valid, float(scale)
    )


def first_free_slots(valid: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The lowest free slot of every head of ``rows``; see :func:`torch_ref.first_free_slots`.

    A ``memchr`` per head that stops at the first free slot, instead of gathering and
    reducing every slot of every head of the batch."""
    if valid.device.type != "cpu" or not valid.is_contiguous() or valid.dtype != torch.bool:
        return torch_ref.first_free_slots(valid, rows)
    return torch.ops.crystal_vllm.first_free_slots(valid, rows.long().contiguous())


def lrfu_decode_applies(kv_pool: torch.Tensor) -> bool:
    """Whether :func:`lrfu_decode` runs on this pool (CPU, a kernel dtype, dense rows)."""
    return _kernel_applies(kv_pool)


def lrfu_decode(
    step: DecodeLayer,
    state: LRFUTensors,
    *,
    lam: float,
    top_p: float,
    gqa_max: bool,
    protect_prompt: bool,
    recent_window: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole LRFU decode layer in one C++ call; see :func:`crystal_vllm.ops.fused_lrfu_decode`.

    Decisions equal the policy's generic step except where two candidates are within
    rounding of each other: the attention probabilities differ by ~1 ulp (see
    :func:`paged_decode_attention`), the top-p prefix mass is summed in float64, and
    ``lam ** age`` comes from the C library's ``powf``.
    """
    if not _kernel_applies(step.kv_pool):
        raise ValueError(
            "lrfu_decode: the C++ kernel takes a CPU pool of float32, bfloat16 or float16 "
            f"with a dense last dimension, got {step.kv_pool.dtype} on {step.kv_pool.device} "
            f"with strides {step.kv_pool.stride()}"
        )
    fields = [getattr(state, name) for name in _LRFU_FIELDS]
    if not all(t.is_contiguous() for t in fields):
        raise ValueError("lrfu_decode: the state tensors must be contiguous")
    return torch.ops.crystal_vllm.lrfu_decode(
        step.query,
        step.key,
        step.value,
        step.kv_pool,
        step.block_tables,
        step.rows.long().contiguous(),
        step.layer,
        step.slots.long().contiguous(),
        step.positions.long().contiguous(),
        step.budgets.long().contiguous(),
        *fields,
        state.step,
        float(step.scale),
        float(lam),
        float(top_p),
        bool(gqa_max),
        bool(protect_prompt),
        int(recent_window),
    )
