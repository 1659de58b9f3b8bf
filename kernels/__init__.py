"""Triton kernels of the per-head paged KV operations (installed as ``crystal_vllm.kernels``).

The launchers here trust their inputs' shapes and dtypes; argument checks, error
messages and fallbacks live in :mod:`crystal_vllm.ops.triton_ops`, the implementation the
ops dispatcher calls. On CPU tensors the kernels run only in Triton's interpreter
(``TRITON_INTERPRET=1`` set before ``triton`` is first imported), which is how CI tests
them; see ``kernels/README.md``.
"""

from __future__ import annotations

from .attention import decode_attention
from .common import ERR_BAD_SLOT, ERR_OUT_OF_RANGE, ERR_UNASSIGNED, INTERPRETED, new_errors
from .lrfu import lrfu_decode_step
from .write_kv import write_kv

__all__ = [
    "ERR_BAD_SLOT",
    "ERR_OUT_OF_RANGE",
    "ERR_UNASSIGNED",
    "INTERPRETED",
    "decode_attention",
    "lrfu_decode_step",
    "new_errors",
    "write_kv",
]
