"""CrystalKVConfig: parsing from additional_config and every invalid-value error."""

from __future__ import annotations

import pytest

from crystal_vllm.config import (
    DEFAULT_BUDGET,
    NO_POLICY,
    CrystalKVConfig,
    parse_policy_config,
    policy_names,
)


def test_defaults_are_vanilla() -> None:
    config = CrystalKVConfig.from_additional_config({})
    assert config.policy == NO_POLICY
    assert config.budget == DEFAULT_BUDGET
    assert not config.enabled


def test_round_trip_through_additional_config() -> None:
    config = CrystalKVConfig.from_additional_config(
        {
            "kv_policy": "crystal",
            "kv_budget": "256",
            "kv_policy_config": '{"top_p": 0.8, "lam": 0.5, "think_end_token": 7}',
        }
    )
    assert config.enabled
    assert config.budget == 256
    assert dict(config.policy_params) == {"top_p": 0.8, "lam": 0.5}
    assert config.think_end_token == 7
    again = CrystalKVConfig.from_additional_config(config.to_additional_config())
    assert again == config


def test_policy_names_include_every_baseline() -> None:
    names = policy_names()
    for name in ("none", "full", "crystal", "crystal-lite", "lru", "streaming", "h2o"):
        assert name in names
    assert "snapkv" in names and "rkv" in names


@pytest.mark.parametrize(
    ("additional_config", "message"),
    [
        ({"kv_policy": "crystl"}, r"'crystl' is not a known policy; allowed values: none, "),
        ({"kv_policy": "crystal", "kv_budget": 0}, r"--kv-budget 0 is invalid: .*>= 1"),
        ({"kv_policy": "crystal", "kv_budget": -5}, r"--kv-budget -5 is invalid"),
        ({"kv_policy": "crystal", "kv_budget": "many"}, r"--kv-budget 'many' is invalid"),
        ({"kv_policy": "crystal", "kv_budget": 1.5}, r"--kv-budget 1.5 is invalid"),
        (
            {"kv_policy": "crystal", "kv_policy_config": {"top_p": 0.0}},
            r"(?=.*top_p)(?=.*0\.0)(?=.*\(0, 1\])",
        ),
        (
            {"kv_policy": "crystal", "kv_policy_config": {"top_p": 1.5}},
            r"(?=.*top_p)(?=.*1\.5)(?=.*\(0, 1\])",
        ),
        (
            {"kv_policy": "crystal", "kv_policy_config": {"lam": -0.1}},
            r"(?=.*lam)(?=.*-0\.1)(?=.*\[0, 1\])",
        ),
        (
            {"kv_policy": "crystal", "kv_policy_config": {"lam": 1.1}},
            r"(?=.*lam)(?=.*1\.1)(?=.*\[0, 1\])",
        ),
        ({"kv_policy": "crystal", "kv_policy_config": {"topp": 0.9}}, r"topp"),
        ({"kv_policy": "crystal", "kv_policy_config": "{not json"}, r"not valid JSON"),
        ({"kv_policy": "crystal", "kv_policy_config": "[1, 2]"}, r"must be a JSON object"),
        (
            {"kv_policy": "crystal", "kv_policy_config": {"think_end_token": -2}},
            r"think_end_token -2 is invalid",
        ),
        (
            {"kv_policy": "crystal", "kv_policy_config": {"answer_reserve": -1}},
            r"answer_reserve -1 is invalid: it must be an integer >= 0",
        ),
        (
            {"kv_policy": "crystal", "kv_policy_config": {"debug_checks": "maybe"}},
            r"debug_checks 'maybe' is invalid",
        ),
        ({"kv_policy": "none", "kv_policy_config": {"top_p": 0.5}}, r"--kv-policy is 'none'"),
        ({"kv_polcy": "crystal"}, r"unknown key\(s\) kv_polcy"),
    ],
)
def test_invalid_values_name_the_value_and_the_range(additional_config, message) -> None:
    with pytest.raises(ValueError, match=message):
        CrystalKVConfig.from_additional_config(additional_config)


def test_parse_policy_config_accepts_mapping_and_empty() -> None:
    assert parse_policy_config(None) == {}
    assert parse_policy_config("") == {}
    assert parse_policy_config({"lam": 0.5}) == {"lam": 0.5}
    assert parse_policy_config('{"lam": 0.5}') == {"lam": 0.5}


def test_think_stage_budgets() -> None:
    off = CrystalKVConfig(policy="crystal", budget=64, think_end_token=-1)
    assert not off.has_think_stage
    on = CrystalKVConfig(policy="crystal", budget=64, think_end_token=5, answer_reserve=100)
    assert on.has_think_stage
    assert CrystalKVConfig.from_additional_config(on.to_additional_config()) == on


def test_serving_keys_convert_strings_like_policy_parameters() -> None:
    """CLI and HTTP inputs arrive as strings: the serving keys take them as the policy
    parameters do ("yes"/"true" for booleans, digits for integers)."""
    config = CrystalKVConfig.from_additional_config(
        {
            "kv_policy": "crystal",
            "kv_policy_config": {
                "debug_checks": "yes",
                "answer_reserve": "12",
                "think_end_token": "-1",
                "hits_before_full": "yes",
            },
        }
    )
    assert config.debug_checks is True
    assert config.answer_reserve == 12 and config.think_end_token == -1
    assert config.make_policy().config.hits_before_full is True
