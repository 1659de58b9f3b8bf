"""Selection of the ops implementation through CRYSTAL_VLLM_OPS."""

from __future__ import annotations

import inspect
import types

import pytest
import torch

from crystal_vllm import ops
from crystal_vllm.ops import torch_ref


@pytest.mark.parametrize("value", [None, "auto"])
def test_auto_prefers_compiled_implementations(monkeypatch: pytest.MonkeyPatch, value):
    if value is None:
        monkeypatch.delenv(ops.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(ops.ENV_VAR, value)
    preferred = next(name for name in ("cpu", "torch") if name in ops.available())
    assert ops.get_impl() is ops.get_impl(preferred)
    assert ops.get_impl(device=torch.device("cpu")) is ops.get_impl(preferred)


def test_auto_picks_by_device(monkeypatch: pytest.MonkeyPatch):
    """CUDA tensors go to Triton (never to the C++ CPU kernels), CPU tensors to C++."""
    monkeypatch.setenv(ops.ENV_VAR, "auto")
    cuda = torch.device("cuda")
    expected = ops.get_impl("triton") if "triton" in ops.available() else torch_ref
    assert ops.get_impl(device=cuda) is expected
    monkeypatch.setitem(ops._loaded, "triton", None)
    assert ops.get_impl(device=cuda) is torch_ref


@pytest.mark.parametrize("value", ["torch", " Torch "])
def test_torch_selects_the_reference(monkeypatch: pytest.MonkeyPatch, value: str):
    monkeypatch.setenv(ops.ENV_VAR, value)
    assert ops.get_impl() is torch_ref
    assert "torch" in ops.available()


def test_auto_falls_back_to_torch_without_compiled_kernels(monkeypatch: pytest.MonkeyPatch):
    for name in ("triton", "cpu"):
        monkeypatch.setitem(ops._loaded, name, None)
    monkeypatch.setenv(ops.ENV_VAR, "auto")
    assert ops.get_impl() is torch_ref
    assert ops.fused_lrfu_decode(torch.zeros(1, 2, 1, 1)) is None  # the reference has none


@pytest.mark.parametrize("name", ["cpu", "triton"])
def test_missing_implementation_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, name: str):
    monkeypatch.setitem(ops._loaded, name, None)  # as if its build were absent
    monkeypatch.setenv(ops.ENV_VAR, name)
    with pytest.raises(RuntimeError, match=f"{name}.*not available.*torch"):
        ops.gather_kv(torch.zeros(1, 2, 1, 1), torch.zeros(1, 1, 1, dtype=torch.int32))


def test_unknown_name_lists_choices(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(ops.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=r"'cuda'.*auto.*torch.*cpu.*triton"):
        ops.get_impl()


def test_public_functions_forward_to_selected_impl(monkeypatch: pytest.MonkeyPatch):
    calls: list[tuple[str, tuple]] = []
    fake = types.ModuleType("fake_ops")
    for op in ops.OPS:
        setattr(fake, op, lambda *args, _op=op: calls.append((_op, args)) or _op)
    monkeypatch.setitem(ops._REGISTRY, "cpu", "fake_ops")
    monkeypatch.setitem(ops._loaded, "cpu", fake)
    monkeypatch.setenv(ops.ENV_VAR, "cpu")

    pool = torch.zeros(1)  # dispatch reads the pool's device, the fake reads nothing
    assert ops.write_kv(pool, 2, 3, 4, 5) is None
    assert ops.gather_kv(pool, 2) == "gather_kv"
    assert ops.paged_decode_attention(1, pool, 3, 4, 0.5) == "paged_decode_attention"
    ops.move_entries(pool, 2, 3, 4)
    assert calls == [
        ("write_kv", (pool, 2, 3, 4, 5)),
        ("gather_kv", (pool, 2, None)),
        ("paged_decode_attention", (1, pool, 3, 4, 0.5)),
        ("move_entries", (pool, 2, 3, 4)),
    ]
    # The fake offers no fused LRFU kernel: callers run the policy's generic step.
    assert ops.fused_lrfu_decode(pool) is None
    fake.lrfu_decode = object()
    fake.lrfu_decode_applies = lambda kv_pool: kv_pool.dtype == torch.float32
    assert ops.fused_lrfu_decode(pool) is fake.lrfu_decode
    assert ops.fused_lrfu_decode(pool.double()) is None
    # auto prefers a compiled implementation once one is available.
    monkeypatch.setenv(ops.ENV_VAR, "auto")
    assert ops.get_impl() is fake


def test_public_signatures_match_reference():
    for op in ops.OPS:
        public = inspect.signature(getattr(ops, op))
        reference = inspect.signature(getattr(torch_ref, op))
        assert list(public.parameters) == list(reference.parameters), op
