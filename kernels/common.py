"""Device helpers shared by the kernels, and the launch-side facts they depend on.

Two helpers exist because of Triton's interpreter (``TRITON_INTERPRET=1``, the only way
these kernels run in CI, on CPU), which in Triton 3.9 differs from the GPU compiler in
two places: ``tl.dot`` on bfloat16 operands multiplies their raw bit patterns, and a
float32 -> bfloat16 conversion truncates instead of rounding to nearest even. Under the
interpreter (``INTERPRET`` constexpr) the helpers compute the same values another way;
on a GPU they are the plain Triton operations.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

#: Error flags the kernels raise, one int32 each in an ``errors`` tensor (constexpr so that
#: kernels can name them). A flagged entry is skipped: nothing is read or written through it.
ERR_UNASSIGNED = tl.constexpr(0)  # a slot in use maps to a -1 table entry
ERR_OUT_OF_RANGE = tl.constexpr(1)  # a slot in use maps to a head-block id >= the pool's
ERR_BAD_SLOT = tl.constexpr(2)  # a slot to write is outside the table's capacity
NUM_ERRORS = 3

#: Smallest positive normal float32: the reference's clamp for a softmax denominator.
FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)


@triton.jit
def _interpreted_probe():
    pass


#: Whether these kernels were built for Triton's interpreter. Triton decides this once, when
#: ``triton.language`` is imported (its own reductions are jitted functions too), from
#: ``TRITON_INTERPRET``; the kernels then accept CPU tensors.
INTERPRETED: bool = isinstance(_interpreted_probe, InterpretedFunction)
if isinstance(tl.max, InterpretedFunction) != INTERPRETED:
    raise ImportError(
        "TRITON_INTERPRET changed between importing triton and crystal_vllm.kernels; set it "
        "before triton is first imported"
    )


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (1 under the interpreter: CPU tensors)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def new_errors(device: torch.device) -> torch.Tensor:
    """A zeroed flag tensor for the kernels' ``errors`` argument."""
    return torch.zeros(NUM_ERRORS, dtype=torch.int32, device=device)


def next_power_of_2(n: int, at_least: int = 1) -> int:
    return max(triton.next_power_of_2(max(n, 1)), at_least)


@triton.jit
def dot_f32(a, b, INTERPRET: tl.constexpr):
    """``a @ b`` of two 16-bit operands with a float32 accumulator.

    Products of two bfloat16 (or two float16) values are exact in float32, so this equals
    the float32 matrix product of the same values up to summation order.
    """
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, out_dtype=tl.float32)


@triton.jit
def cast_rne(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """float32 ``x`` rounded to nearest even in ``DTYPE`` (what ``torch.Tensor.to`` does)."""
    if INTERPRET and tl.bfloat16 == DTYPE:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def weighted_sum_v(p, v, PV_MODE: tl.constexpr, INTERPRET: tl.constexpr):
    """``p @ v`` for float32 weights ``p [M, N]`` and values ``v [N, D]`` in the pool dtype,
    accurate to about 2**-16 relative per term on tensor cores.

    ``PV_MODE`` 0 (float32 values): one IEEE float32 product. 1 (bfloat16): ``p`` split into
    a bfloat16 head and tail, two products. 2 (float16): the values are split too (an
    11-bit float16 is exactly the sum of two bfloat16), three products. A single bfloat16
    ``p`` would lose 8 bits, more than the float32 reference allows.
    """
    if PV_MODE == 0:
        return tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        p_hi = p.to(tl.bfloat16)
        p_lo = (p - p_hi.to(tl.float32)).to(tl.bfloat16)
        if PV_MODE == 1:
            return dot_f32(p_hi, v, INTERPRET) + dot_f32(p_lo, v, INTERPRET)
        else:
            vf = v.to(tl.float32)
            v_hi = vf.to(tl.bfloat16)
            v_lo = (vf - v_hi.to(tl.float32)).to(tl.bfloat16)
            return (
                dot_f32(p_hi, v_hi, INTERPRET)
                + dot_f32(p_hi, v_lo, INTERPRET)
                + dot_f32(p_lo, v_hi, INTERPRET)
            )


def pv_mode(dtype: torch.dtype) -> int:
    """``PV_MODE`` of :func:`weighted_sum_v` for a pool of ``dtype``."""
    return {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[dtype]
