"""Per-head paged KV operations with interchangeable implementations.

Callers use the functions of this module; each forwards to the implementation chosen
by the environment variable ``CRYSTAL_VLLM_OPS``:

* ``auto`` (default): by the device of the KV pool, the first available of
  ``_AUTO_ORDER[device type]``: ``cpu`` then ``torch`` on the CPU, ``triton`` then
  ``torch`` on CUDA;
* ``torch``: the plain-torch reference (:mod:`crystal_vllm.ops.torch_ref`);
* ``cpu``: the C++ kernels (:mod:`crystal_vllm.ops.cpu`, needs the ``crystal_vllm._C``
  extension; without it the name is known but unavailable);
* ``triton``: the Triton kernels of the repository's ``kernels/`` directory, installed as
  ``crystal_vllm.kernels`` (:mod:`crystal_vllm.ops.triton_ops`; CUDA tensors, or CPU
  tensors under ``TRITON_INTERPRET=1``); ``gather_kv``, ``move_entries`` and
  ``first_free_slots`` are the reference's. Its value checks cost a host sync per op;
  ``crystal_vllm.ops.triton_ops.set_value_checks(False)`` turns them off.

An implementation is a module that defines every name in ``OPS`` with the signatures
of :mod:`crystal_vllm.ops.torch_ref`. It may also offer the fused LRFU decode kernel
(``lrfu_decode`` and ``lrfu_decode_applies``, see :func:`fused_lrfu_decode`); the torch
reference does not: its callers run the policy's generic step instead, which is the
kernels' oracle. The variable is read on every call so tests can switch implementations
with ``monkeypatch.setenv``. Nothing here knows about policies.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from types import ModuleType

import torch

from crystal_vllm.ops.decode import DecodeLayer, LRFUTensors

ENV_VAR = "CRYSTAL_VLLM_OPS"
OPS = (
    "write_kv",
    "gather_kv",
    "paged_decode_attention",
    "move_entries",
    "first_free_slots",
)

# name -> module implementing OPS; None marks a known name that is not built yet. A
# module may also raise ImportError (a compiled extension that is not built): that name
# is then unavailable too.
_REGISTRY: dict[str, str | None] = {
    "torch": "crystal_vllm.ops.torch_ref",
    "cpu": "crystal_vllm.ops.cpu",
    "triton": "crystal_vllm.ops.triton_ops",
}
_AUTO_ORDER: dict[str, tuple[str, ...]] = {"cpu": ("cpu", "torch"), "cuda": ("triton", "torch")}
_loaded: dict[str, ModuleType | None] = {}


def _load(name: str) -> ModuleType | None:
    if name not in _loaded:
        path = _REGISTRY[name]
        module = None
        if path is not None:
            try:
                module = importlib.import_module(path)
            except ImportError:
                module = None
        _loaded[name] = module
    return _loaded[name]


def available() -> list[str]:
    """Names of the implementations that can be used in this process."""
    return [name for name in _REGISTRY if _load(name) is not None]


def get_impl(name: str | None = None, device: torch.device | None = None) -> ModuleType:
    """The implementation module for ``name`` (default: the ``CRYSTAL_VLLM_OPS`` value);
    ``auto`` picks by ``device`` (default CPU), the device of the tensors to be processed."""
    if name is None:
        name = os.environ.get(ENV_VAR, "auto")
    name = name.strip().lower()
    if name == "auto":
        device_type = device.type if device is not None else "cpu"
        for candidate in _AUTO_ORDER.get(device_type, ("torch",)):
            module = _load(candidate)
            if module is not None:
                return module
        raise RuntimeError(f"{ENV_VAR}=auto: no implementation is available")
    if name not in _REGISTRY:
        raise ValueError(
            f"{ENV_VAR}={name!r} is not a known implementation; "
            f"choose one of {['auto', *_REGISTRY]}"
        )
    module = _load(name)
    if module is None:
        raise RuntimeError(
            f"{ENV_VAR}={name!r}: that implementation is not available in this build; "
            f"available: {available()}"
        )
    return module


def write_kv(
    kv_pool: torch.Tensor,
    block_tables: torch.Tensor,
    slots: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
) -> None:
    """Scatter new K/V per head into their slots; see :func:`torch_ref.write_kv`."""
    get_impl(device=kv_pool.device).write_kv(kv_pool, block_tables, slots, key, value)


def gather_kv(
    kv_pool: torch.Tensor, block_tables: torch.Tensor, num_slots: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read K and V of every slot; see :func:`torch_ref.gather_kv`."""
    return get_impl(device=kv_pool.device).gather_kv(kv_pool, block_tables, num_slots)


def paged_decode_attention(
    query: torch.Tensor,
    kv_pool: torch.Tensor,
    block_tables: torch.Tensor,
    valid: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over per-head tables, with probabilities; see
    :func:`torch_ref.paged_decode_attention`."""
    return get_impl(device=kv_pool.device).paged_decode_attention(
        query, kv_pool, block_tables, valid, scale
    )


def move_entries(
    kv_pool: torch.Tensor, block_tables: torch.Tensor, src: torch.Tensor, dst: torch.Tensor
) -> None:
    """Apply a compaction plan to the K/V pool; see :func:`torch_ref.move_entries`."""
    get_impl(device=kv_pool.device).move_entries(kv_pool, block_tables, src, dst)


def first_free_slots(valid: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The lowest free slot of every head of ``rows``; see :func:`torch_ref.first_free_slots`."""
    return get_impl(device=valid.device).first_free_slots(valid, rows)


#: A fused LRFU decode kernel:
#: ``(step, state, *, lam, top_p, gqa_max, protect_prompt, recent_window) -> (out, evicted)``.
FusedLRFUDecode = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def fused_lrfu_decode(kv_pool: torch.Tensor) -> FusedLRFUDecode | None:
    """The selected implementation's fused LRFU decode kernel for this pool, or None when
    it has none (the torch reference) or cannot run on this pool (device, dtype, layout).

    The kernel runs a whole decode layer under LRFU scoring in one call: insert the new
    token, write its K/V, attend, GQA-reduce, record top-p hits, decay and evict (never a
    prompt entry when ``protect_prompt``, nor counting them, and never a decode entry born
    in the last ``min(recent_window, budget)`` steps). Its signature:
    ``kernel(step: DecodeLayer, state: LRFUTensors, *, lam, top_p, gqa_max, protect_prompt,
    recent_window)``
    returning ``out [b, Hq, D]`` and ``evicted [b, H]`` int32. It raises on inputs it does
    not implement instead of falling back.
    """
    impl = get_impl(device=kv_pool.device)
    applies = getattr(impl, "lrfu_decode_applies", None)
    if applies is None or not applies(kv_pool):
        return None
    return impl.lrfu_decode


__all__ = [
    "ENV_VAR",
    "OPS",
    "DecodeLayer",
    "FusedLRFUDecode",
    "LRFUTensors",
    "available",
    "fused_lrfu_decode",
    "gather_kv",
    "first_free_slots",
    "get_impl",
    "move_entries",
    "paged_decode_attention",
    "write_kv",
]
