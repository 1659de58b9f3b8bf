"""make_policy: names, parameters, defaults and error messages."""

from __future__ import annotations

import pytest

from crystal_vllm.policy import (
    POLICY_NAMES,
    CrystalConfig,
    make_policy,
    policy_param_names,
)


def test_every_name_builds_with_defaults() -> None:
    for name in POLICY_NAMES:
        policy = make_policy(name)
        assert policy.name == name
        assert policy.adaptive_budgets == (name == "crystal")
    assert make_policy("rkv").needs_keys and not make_policy("snapkv").needs_keys


def test_defaults_match_the_spec() -> None:
    c = make_policy("crystal").config
    assert (c.top_p, c.lam, c.gqa_reduce, c.realloc_interval) == (0.9, 0.6, "mean", 64)
    assert (c.floor_ratio, c.min_tokens, c.obs_window, c.prompt) == (0.2, 16, 8, "compress")
    assert c.prompt_budget == 256
    assert make_policy("lru").config.lam == 0.0
    assert make_policy("streaming").config.sinks == 4
    s = make_policy("snapkv").config
    assert (s.window, s.kernel, s.buffer) == (8, 7, 128)
    assert make_policy("snapkv").max_resident(1024) == 1152
    assert make_policy("crystal").max_resident(1024) == 1024


def test_param_names() -> None:
    assert "lam" not in policy_param_names("lru")
    assert "realloc_interval" in policy_param_names("crystal")
    assert "realloc_interval" not in policy_param_names("crystal-lite")
    assert policy_param_names("full") == {"prompt", "prompt_budget"}
    assert policy_param_names("random") == {"prompt", "prompt_budget", "seed"}


def test_string_values_are_converted() -> None:
    params = {"top_p": "0.5", "hits_before_full": "false", "min_tokens": "4"}
    c = make_policy("crystal", params).config
    assert (c.top_p, c.hits_before_full, c.min_tokens) == (0.5, False, 4)
    assert make_policy("crystal", {"lam": 1}).config.lam == 1.0


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("nope", None, r"unknown KV policy 'nope'; allowed: full, crystal, crystal-lite"),
        ("lru", {"lam": 0.5}, r"unknown parameter 'lam' for KV policy 'lru'; allowed: .*top_p"),
        ("crystal", {"think_end_token": 5}, r"unknown parameter 'think_end_token'"),
        ("crystal", {"top_p": 0.0}, r"top_p must be a number in \(0, 1\], got 0.0"),
        ("crystal", {"lam": 1.5}, r"lam must be a number in \[0, 1\], got 1.5"),
        ("crystal", {"gqa_reduce": "sum"}, r"gqa_reduce must be one of mean, max, got 'sum'"),
        ("crystal", {"realloc_interval": 0}, r"realloc_interval must be an integer >= 1, got 0"),
        ("crystal", {"top_p": "abc"}, r"top_p must be a number in \(0, 1\], got 'abc'"),
        ("crystal", {"hits_before_full": "maybe"}, r"hits_before_full must be true or false"),
        ("h2o", {"prompt": "drop"}, r"prompt must be one of keep, compress, evict, got 'drop'"),
        ("random", {"prompt_budget": 0}, r"prompt_budget must be an integer >= 1, got 0"),
        ("snapkv", {"kernel": 4}, r"kernel must be odd"),
        ("rkv", {"similarity_threshold": 2}, r"similarity_threshold must be a number in \[-1, 1\]"),
        ("streaming", {"sinks": -1}, r"sinks must be an integer >= 0, got -1"),
    ],
)
def test_errors_name_the_problem(name, params, match) -> None:
    with pytest.raises(ValueError, match=match):
        make_policy(name, params)


def test_wrong_config_type_is_rejected() -> None:
    from crystal_vllm.policy import H2OPolicy

    with pytest.raises(TypeError, match="H2OConfig"):
        H2OPolicy(CrystalConfig())
