"""The one budget rule the scheduler, the worker and the replay benchmark share."""

from __future__ import annotations

import pytest

from crystal_vllm.budget import BudgetRule, requested_budget
from crystal_vllm.config import CrystalKVConfig


def _rule(policy="crystal-lite", budget=64, think_end_token=7, answer_reserve=100, **kw):
    config = CrystalKVConfig(
        policy=policy,
        budget=budget,
        think_end_token=think_end_token,
        answer_reserve=answer_reserve,
        policy_params=kw.pop("params", {}),
    )
    block_size, max_model_len = kw.pop("block_size", 16), kw.pop("len", 4096)
    return BudgetRule(config, block_size=block_size, max_model_len=max_model_len)


def test_budget_grows_once_at_think_end() -> None:
    rule = _rule()
    assert rule.budget(10, think_ended=False) == 10
    assert rule.budget(10, think_ended=True) == 110
    # A second think-end token cannot grow it again: the flag is all the rule reads.
    assert rule.budget(rule.budget(10, think_ended=False), think_ended=True) == 110
    assert rule.max_budget == 164


def test_think_end_detection() -> None:
    assert _rule().think_ends([1, 7, 3])
    assert not _rule().think_ends([1, 3])
    assert not _rule(think_end_token=-1).think_ends([-1, 7])
    assert _rule(think_end_token=-1).max_budget == 64


@pytest.mark.parametrize(
    ("policy", "params", "budget", "expected"),
    [
        ("crystal-lite", {}, 64, 4),  # 64 resident entries (the new token's included) -> 4
        ("crystal-lite", {}, 65, 5),  # 65 -> 5 blocks of 16
        ("crystal", {}, 64, 4),  # adaptive budgets move in whole head-blocks: no slack
        ("snapkv", {"buffer": 32}, 64, 6),  # 96 resident -> 6 blocks
        ("full", {}, 64, 256),  # unbounded: the whole sequence (4096 / 16)
        ("crystal-lite", {"prompt": "keep"}, 64, 6),  # 30 kept prompt entries + 64 -> 94
    ],
)
def test_cap_blocks(policy, params, budget, expected) -> None:
    params = {"prompt": "evict", **params}
    assert _rule(policy, budget=128, params=params).cap_blocks(budget, 30) == expected


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("evict", 64), ("keep", 64 + 100), ("compress", 64 + 40)],
)
def test_the_kept_prompt_comes_on_top_of_the_budget(mode: str, expected: int) -> None:
    rule = _rule("crystal-lite", params={"prompt": mode, "prompt_budget": 40})
    assert rule.resident_entries(64, 100) == expected
    assert rule.cap_blocks(64, 100) == -(-expected // 16)
    assert rule.resident_entries(64, 10) == 64 + (0 if mode == "evict" else 10)


def test_cap_never_exceeds_the_whole_sequence() -> None:
    rule = _rule("crystal", budget=4096, len=100)
    assert rule.cap_blocks(4096, 50) == 7  # ceil(100 / 16), no slack on top
    assert rule.max_cap_blocks == 7


def test_requested_budget_validation() -> None:
    server = CrystalKVConfig(policy="crystal", budget=64)
    assert requested_budget(None, server) == 64
    assert requested_budget({"kv_budget": 8, "other": 1}, server) == 8
    for bad in (0, 65, 1.5, True, "8"):
        with pytest.raises(ValueError, match=r"kv_budget .* \[1, 64\]"):
            requested_budget({"kv_budget": bad}, server)
    with pytest.raises(ValueError, match="kv_bduget"):
        requested_budget({"kv_bduget": 8}, server)
    with pytest.raises(ValueError, match="--kv-policy none"):
        requested_budget({"kv_budget": 8}, CrystalKVConfig())


@pytest.mark.parametrize(("name", "value"), [("block_size", 0), ("max_model_len", True)])
def test_bad_geometry_is_refused(name, value) -> None:
    config = CrystalKVConfig(policy="crystal", budget=64)
    kwargs = {"block_size": 16, "max_model_len": 128, name: value}
    with pytest.raises(ValueError, match=name):
        BudgetRule(config, **kwargs)
