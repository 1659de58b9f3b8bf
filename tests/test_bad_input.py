"""Every configuration key and every per-request field refuses bad values with a message
that names the key, the value and the allowed range (docs/serving.md, "What is refused").

The tables below must cover every key the code accepts: a new key without bad values here
fails ``test_every_key_has_bad_values``.
"""

from __future__ import annotations

import re

import pytest

from crystal_vllm.budget import REQUEST_KEYS, requested_budget
from crystal_vllm.config import DEFAULT_BUDGET, SERVING_KEYS, CrystalKVConfig
from crystal_vllm.policy import POLICY_NAMES, policy_param_names

#: Bad values of each ``--kv-policy-config`` key, and the allowed range its message names.
BAD_POLICY_VALUES: dict[str, tuple[list, str]] = {
    "prompt": (["squeeze", 1, None], "keep, compress, evict"),
    "prompt_budget": ([0, -3, 2.5, True, "many", None], ">= 1"),
    "top_p": ([0, 0.0, 1.01, -1, "high", True, None], "(0, 1]"),
    "lam": ([-0.1, 1.5, "x", False, None], "[0, 1]"),
    "gqa_reduce": (["median", 3, None], "mean, max"),
    "obs_window": ([-1, 1.5, "wide", True, None], ">= 0"),
    "hits_before_full": (["maybe", 2, None], "true or false"),
    "time_unit": ([0, -2, 0.5, True, None], ">= 1"),
    "recent_window": ([0, -2, 1.5, True, None], ">= 1"),
    "evict_interval": ([0, -1, 2.5, False, None], ">= 1"),
    "realloc_interval": ([0, -64, 6.4, True, None], ">= 1"),
    "realloc_rule": (["entropy", 1, None], "boundary, utilisation"),
    "realloc_move": ([0, -0.1, 1.5, "far", True, None], "(0, 1]"),
    "floor_ratio": ([-0.2, 1.2, "low", None], "[0, 1]"),
    "min_tokens": ([-1, 1.5, True, None], ">= 0"),
    "sinks": ([-4, 0.5, True, None], ">= 0"),
    "window": ([0, -8, 2.5, True, None], ">= 1"),
    "kernel": ([0, 6, -7, 1.5, True, None], ">= 1|odd"),
    "buffer": ([0, -128, 1.5, True, None], ">= 1"),
    "importance_weight": ([-0.1, 1.1, "x", None], "[0, 1]"),
    "similarity_threshold": ([-1.5, 1.5, "x", None], "[-1, 1]"),
    "seed": ([-1, 0.5, True, None], ">= 0"),
}

#: Bad values of each serving key, and the allowed range its message names.
BAD_SERVING_VALUES: dict[str, tuple[list, str]] = {
    "think_end_token": ([-2, 1.5, "</think>", True], "a token id >= 0, -1 for none"),
    "answer_reserve": ([-1, 1.5, "lots", True, None], "an integer >= 0"),
    "debug_checks": (["maybe", 1, None], "true or false"),
}


def _policies_with(key: str) -> list[str]:
    return [name for name in POLICY_NAMES if key in policy_param_names(name)]


def test_every_key_has_bad_values() -> None:
    accepted = set().union(*(policy_param_names(name) for name in POLICY_NAMES))
    assert accepted == set(BAD_POLICY_VALUES)
    assert set(SERVING_KEYS) == set(BAD_SERVING_VALUES)
    assert REQUEST_KEYS == ("kv_budget",)  # the per-request table below covers it


def _cases(table: dict[str, tuple[list, str]], with_policy: bool):
    for key, (values, allowed) in table.items():
        policies = _policies_with(key) if with_policy else ["crystal"]
        for policy in policies:
            for value in values:
                yield pytest.param(policy, key, value, allowed, id=f"{policy}-{key}-{value!r}")


@pytest.mark.parametrize(
    ("policy", "key", "value", "allowed"),
    list(_cases(BAD_POLICY_VALUES, True)) + list(_cases(BAD_SERVING_VALUES, False)),
)
def test_bad_policy_config_value_names_key_value_and_range(policy, key, value, allowed) -> None:
    with pytest.raises(ValueError) as caught:
        CrystalKVConfig.from_additional_config(
            {"kv_policy": policy, "kv_policy_config": {key: value}}
        )
    message = str(caught.value)
    assert key in message, message
    assert repr(value) in message or str(value) in message, message
    assert any(part in message for part in allowed.split("|")), message


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_keys_of_another_policy_are_refused_with_the_allowed_list(policy) -> None:
    foreign = sorted(set(BAD_POLICY_VALUES) - policy_param_names(policy))
    for key in foreign:
        with pytest.raises(ValueError, match=rf"unknown parameter '{key}' .* allowed: "):
            CrystalKVConfig(policy=policy, policy_params={key: 1})


@pytest.mark.parametrize(
    "value", [0, -1, 65, 10**9, 1.5, 8.0, True, False, "8", None, [8], {"v": 8}]
)
def test_bad_kv_budget_names_the_value_and_the_range(value) -> None:
    server = CrystalKVConfig(policy="crystal", budget=64)
    expected = f"kv_budget {value!r} is invalid: it must be an integer in [1, 64]"
    with pytest.raises(ValueError, match=re.escape(expected)):
        requested_budget({"kv_budget": value}, server)


@pytest.mark.parametrize("key", ["kv_budgt", "kv_policy", "kv_prompt", "kv_"])
def test_unknown_kv_request_keys_are_refused(key) -> None:
    server = CrystalKVConfig(policy="crystal", budget=64)
    with pytest.raises(ValueError, match=rf"unknown per-request KV option\(s\) {key}; allowed: "):
        requested_budget({key: 1}, server)


def test_other_plugins_request_keys_pass_through() -> None:
    server = CrystalKVConfig(policy="crystal", budget=64)
    assert requested_budget({"temperature_boost": 2, "kv_budget": 3}, server) == 3
    assert requested_budget({"other": "x"}, CrystalKVConfig()) == DEFAULT_BUDGET


def test_kv_budget_with_policy_none_is_refused() -> None:
    with pytest.raises(ValueError, match="kv_budget was given, but this server runs with"):
        requested_budget({"kv_budget": 8}, CrystalKVConfig())
