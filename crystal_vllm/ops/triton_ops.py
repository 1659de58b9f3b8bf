"""The ``triton`` implementation of the paged KV ops: the kernels of the repository's
``kernels/`` directory (installed as :mod:`crystal_vllm.kernels`).

Semantics, argument checks and error types are those of :mod:`crystal_vllm.ops.torch_ref`
(the oracle in ``tests/ops/test_triton_kernels.py``). The kernels take CUDA tensors, or
CPU tensors when Triton runs in its interpreter (``TRITON_INTERPRET=1`` set before
``triton`` is first imported: CI). Calls the kernels do not cover go to the reference:
a pool dtype other than float32/bfloat16/float16, a head size above 256, a pool whose
last dimension is strided, tensors on another device type. The fused LRFU step has no
fallback: :func:`lrfu_decode_applies` says which pools it takes. ``gather_kv`` and
``move_entries`` are the reference's: they run outside
the per-step decode path; so is ``first_free_slots``, already two device kernels in torch.
CPU tensors without the interpreter are an error rather than a silent fallback: asking
for ``triton`` there is a configuration mistake.

Value checks (slots in range, rows distinct, no live slot in an unassigned head-block)
read device memory, one host sync per check; :func:`set_value_checks` turns them off for
speed. The kernels never dereference a bad slot or table entry either way: with checks
off a bad entry is skipped (and a fused step whose input was flagged leaves the policy
state as the insert left it).
"""

from __future__ import annotations

import torch

from crystal_vllm.ops import torch_ref
from crystal_vllm.ops.decode import DecodeLayer, LRFUTensors

try:
    from crystal_vllm import kernels
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"the Triton kernels are unavailable (is triton installed?): {exc}") from exc

__all__ = [
    "first_free_slots",
    "gather_kv",
    "lrfu_decode",
    "lrfu_decode_applies",
    "move_entries",
    "paged_decode_attention",
    "set_split_size",
    "set_value_checks",
    "write_kv",
]

_KERNEL_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})
_MAX_HEAD_DIM = 256
_STATE_DTYPES = {
    "valid": torch.bool,
    "position": torch.int64,
    "born": torch.int64,
    "crf": torch.float32,
    "tau": torch.int64,
    "prompt": torch.bool,
}

gather_kv = torch_ref.gather_kv
move_entries = torch_ref.move_entries
# A gather and a max over the rows' slot masks: already two device kernels, no host sync.
first_free_slots = torch_ref.first_free_slots

_split_size: int | None = None
_value_checks = True


def set_split_size(split_size: int | None) -> int | None:
    """Force the attention split length (slots per program; ``None``: chosen per call from
    the device's SM count). Returns the previous value. For tests and benchmarks."""
    global _split_size
    if split_size is not None and (split_size < 16 or split_size & (split_size - 1)):
        raise ValueError(f"split_size must be a power of two >= 16, got {split_size}")
    previous, _split_size = _split_size, split_size
    return previous


def set_value_checks(enabled: bool) -> bool:
    """Turn the value checks that need a host sync on or off; returns the previous setting."""
    global _value_checks
    previous, _value_checks = _value_checks, bool(enabled)
    return previous


def _kernel_applies(kv_pool: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether the kernels handle these tensors (else the caller uses the reference)."""
    device = kv_pool.device
    if device.type == "cpu" and not kernels.INTERPRETED:
        raise RuntimeError(
            "CRYSTAL_VLLM_OPS=triton got CPU tensors: the Triton kernels run on CUDA, or on "
            "the CPU only in Triton's interpreter (set TRITON_INTERPRET=1 before triton is "
            "imported); use CRYSTAL_VLLM_OPS=auto, cpu or torch on the CPU"
        )
    return (
        device.type in ("cuda", "cpu")
        and kv_pool.dim() == 4
        and kv_pool.dtype in _KERNEL_DTYPES
        and kv_pool.stride(-1) == 1
        and kv_pool.shape[3] <= _MAX_HEAD_DIM
        and all(t.device == device for t in others)
        and all(t.dtype in _KERNEL_DTYPES for t in others if t.is_floating_point())
    )


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _raise_for_flags(errors: torch.Tensor, op: str, num_head_blocks: int) -> None:
    """One host sync: raise the reference's error for the first flag a kernel set."""
    flags = errors.tolist()
    if flags[kernels.ERR_BAD_SLOT]:
        raise ValueError(f"{op}: a slot is out of range of its block table")
    if flags[kernels.ERR_UNASSIGNED]:
        raise ValueError(f"{op}: a valid slot lies in an unassigned head-block")
    if flags[kernels.ERR_OUT_OF_RANGE]:
        raise IndexError(
            f"{op}: a block table names a head-block outside the pool's [0, {num_head_blocks})"
        )


def _check_slots(
    op: str,
    tables: torch.Tensor,
    slots: torch.Tensor,
    block_size: int,
    num_head_blocks: int,
    capacity: int,
) -> None:
    """Reject, before anything is written, a slot ``>= capacity`` or one that maps to an
    unassigned (``-1``) or nonexistent head-block; ``tables [..., MB]`` and ``slots
    [..., n]`` share their leading dims, negative slots are padding. One host sync."""
    used = slots >= 0
    index = (slots.clamp(0, capacity - 1) // block_size).long()
    head_block = tables.gather(-1, index) if index.numel() else index
    flags = torch.stack(
        [
            (slots >= capacity).any(),
            (used & (head_block < 0)).any(),
            (used & (head_block >= num_head_blocks)).any(),
        ]
    ).tolist()
    if flags[0]:
        raise ValueError(
            f"{op}: slot {int(slots.max())} is out of range; the block table holds {capacity} slots"
        )
    if flags[1]:
        raise ValueError(f"{op}: a slot falls into an unassigned (-1) block-table entry")
    if flags[2]:
        raise IndexError(
            f"{op}: a slot maps to a head-block outside the pool's [0, {num_head_blocks})"
        )


def write_kv(
    kv_pool: torch.Tensor,
    block_tables: torch.Tensor,
    slots: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
) -> None:
    """Scatter new K/V per head into their slots; see :func:`torch_ref.write_kv`."""
    if not _kernel_applies(kv_pool, block_tables, slots, key, value):
        torch_ref.write_kv(kv_pool, block_tables, slots, key, value)
        return
    b, h, mb = block_tables.shape
    if slots.shape[:2] != (b, h) or key.shape != value.shape:
        raise ValueError(
            f"write_kv: shapes disagree: block_tables {tuple(block_tables.shape)}, "
            f"slots {tuple(slots.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
        )
    expected = (b, slots.shape[2], h, kv_pool.shape[3])
    if key.shape != expected:
        raise ValueError(
            f"write_kv: key must have shape [b, T, H, D] = {expected}, got {tuple(key.shape)}"
        )
    block_size, num_head_blocks = kv_pool.shape[2], kv_pool.shape[0]
    if _value_checks:
        _check_slots("write_kv", block_tables, slots, block_size, num_head_blocks, mb * block_size)
    errors = kernels.new_errors(kv_pool.device)
    kernels.write_kv(
        kv_pool,
        block_tables,
        slots,
        _last_dim_contiguous(key),
        _last_dim_contiguous(value),
        errors,
    )


def paged_decode_attention(
    query: torch.Tensor,
    kv_pool: torch.Tensor,
    block_tables: torch.Tensor,
    valid: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over per-head tables, with probabilities; see
    :func:`torch_ref.paged_decode_attention`.

    Scores, softmax and the weighted sum of V are float32 as in the reference; the
    summation order differs, and on a GPU ``exp`` is the hardware approximation.
    """
    if not _kernel_applies(kv_pool, query, block_tables, valid) or valid.dtype != torch.bool:
        return torch_ref.paged_decode_attention(query, kv_pool, block_tables, valid, scale)
    b, hq, d = query.shape
    _, h, mb = block_tables.shape
    s = valid.shape[-1]
    block_size = kv_pool.shape[2]
    if block_tables.shape[0] != b or valid.shape != (b, h, s) or kv_pool.shape[3] != d:
        raise ValueError(
            f"paged_decode_attention: shapes disagree: query {tuple(query.shape)}, "
            f"kv_pool {tuple(kv_pool.shape)}, block_tables {tuple(block_tables.shape)}, "
            f"valid {tuple(valid.shape)}"
        )
    if h == 0 or hq % h:
        raise ValueError(f"paged_decode_attention: {hq} query heads is not a multiple of {h}")
    if s > mb * block_size:
        raise ValueError(
            f"paged_decode_attention: valid has {s} slots, more than the table's "
            f"{mb} x {block_size} = {mb * block_size}"
        )
    errors = kernels.new_errors(kv_pool.device)
    out, probs = kernels.decode_attention(
        _last_dim_contiguous(query),
        kv_pool,
        block_tables,
        valid,
        scale,
        errors,
        split_size=_split_size,
    )
    if _value_checks:
        _raise_for_flags(errors, "paged_decode_attention", kv_pool.shape[0])
    return out, probs


def lrfu_decode_applies(kv_pool: torch.Tensor) -> bool:
    """Whether :func:`lrfu_decode` runs on this pool (see the module docstring)."""
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
    """A whole LRFU decode layer in three kernel launches; see
    :func:`crystal_vllm.ops.fused_lrfu_decode` (same results as the policy's generic step,
    up to the summation order of the attention and, therefore, victims that are near-ties
    of the decayed CRF)."""
    rows, slots, positions, budgets = step.rows, step.slots, step.positions, step.budgets
    query, key, value, kv_pool = step.query, step.key, step.value, step.kv_pool
    block_tables, layer = step.block_tables, step.layer
    fields = [getattr(state, name) for name in _STATE_DTYPES]
    if not _kernel_applies(kv_pool, rows, slots, positions, budgets, query, key, value):
        raise ValueError(
            f"lrfu_decode: the Triton kernel does not take a {kv_pool.dtype} pool of shape "
            f"{tuple(kv_pool.shape)} on {kv_pool.device} with these inputs"
        )
    bad_state = [n for n, dt in _STATE_DTYPES.items() if getattr(state, n).dtype != dt]
    if bad_state or state.step.dtype != torch.int64:
        raise ValueError(f"lrfu_decode: state fields with unexpected dtypes: {bad_state}")
    if any(f.stride() != fields[0].stride() for f in fields):
        raise ValueError("lrfu_decode: the state fields must share one stride pattern")
    num_rows, num_layers, h, num_slots = state.valid.shape
    b = rows.shape[0]
    hq, d = query.shape[1], query.shape[2]
    block_size = kv_pool.shape[2]
    if not 0 <= layer < num_layers:
        raise IndexError(f"lrfu_decode: layer {layer} out of range [0, {num_layers})")
    shapes_agree = (
        rows.shape == (b,)
        and slots.shape == (b, h)
        and positions.shape == (b,)
        and budgets.shape == (b, h)
        and query.shape[0] == b
        and key.shape == (b, h, d)
        and value.shape == key.shape
        and kv_pool.shape[3] == d
        and block_tables.shape[:3] == (num_rows, num_layers, h)
    )
    if not shapes_agree:
        raise ValueError(
            f"lrfu_decode: shapes disagree: state {tuple(state.valid.shape)}, rows "
            f"{tuple(rows.shape)}, slots {tuple(slots.shape)}, positions "
            f"{tuple(positions.shape)}, budgets {tuple(budgets.shape)}, query "
            f"{tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}, "
            f"kv_pool {tuple(kv_pool.shape)}, block_tables {tuple(block_tables.shape)}"
        )
    if hq % h:
        raise ValueError(f"lrfu_decode: {hq} query heads is not a multiple of {h}")
    if num_slots > block_tables.shape[3] * block_size:
        raise ValueError(
            f"lrfu_decode: the state has {num_slots} slots per head, more than the "
            f"table's {block_tables.shape[3]} x {block_size}"
        )
    tables = block_tables[:, layer]
    if _value_checks:
        _check_rows(rows, num_rows)
        _check_slots(
            "lrfu_decode",
            tables[rows],
            slots[:, :, None],
            block_size,
            kv_pool.shape[0],
            num_slots,
        )
    views = {name: getattr(state, name)[:, layer] for name in _STATE_DTYPES}
    views["valid"] = views["valid"].view(torch.uint8)
    views["prompt"] = views["prompt"].view(torch.uint8)
    views["step"] = state.step
    views["positions"] = positions
    errors = kernels.new_errors(kv_pool.device)
    out, evicted = kernels.lrfu_decode_step(
        views,
        rows,
        slots,
        budgets,
        _last_dim_contiguous(query),
        _last_dim_contiguous(key),
        _last_dim_contiguous(value),
        kv_pool,
        tables,
        step.scale,
        lam=lam,
        top_p=top_p,
        gqa_max=gqa_max,
        protect_prompt=protect_prompt,
        recent_window=recent_window,
        errors=errors,
        split_size=_split_size,
    )
    if _value_checks:
        _raise_for_flags(errors, "lrfu_decode", kv_pool.shape[0])
    return out, evicted


def _check_rows(rows: torch.Tensor, num_rows: int) -> None:
    """Rows must be distinct rows of the state: two programs updating one row would race."""
    ordered = rows.sort().values
    flags = torch.stack(
        [(rows < 0).any() | (rows >= num_rows).any(), (ordered[1:] == ordered[:-1]).any()]
    ).tolist()
    if flags[0]:
        raise IndexError(f"lrfu_decode: rows must lie in [0, {num_rows})")
    if flags[1]:
        repeated = ordered[1:][ordered[1:] == ordered[:-1]]
        raise ValueError(f"lrfu_decode: row {int(repeated[0])} appears twice in rows")
