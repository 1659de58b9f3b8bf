"""The per-head eviction path inside a real vLLM engine (tiny random model, fp32, eager)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vanilla_tokens(tiny_model_fp32, offline_generate) -> list[list[int]]:
    return offline_generate(tiny_model_fp32, {"kv_policy": "none"})["tokens"]


@pytest.mark.parametrize("policy", ["crystal", "full"])
def test_budget_above_every_sequence_is_token_identical_to_none(
    tiny_model_fp32, vanilla_tokens, policy, offline_generate
) -> None:
    result = offline_generate(tiny_model_fp32, {"kv_policy": policy, "kv_budget": 4096})
    assert result["stats"]["steps"] > 0  # the compressed path really ran
    assert result["stats"]["evictions"] == 0
    assert result["tokens"] == vanilla_tokens


@pytest.mark.parametrize(
    ("policy", "prompt"),
    [
        ("crystal", "keep"),
        ("crystal", "compress"),
        ("crystal", "evict"),
        ("crystal-lite", "keep"),
        ("streaming", "keep"),
        ("snapkv", "keep"),
        ("rkv", "evict"),
        ("random", "keep"),
    ],
)
def test_small_budget_evicts_and_keeps_the_invariants(
    tiny_model_fp32, policy, prompt, offline_generate
) -> None:
    # debug_checks also bound the kept prompt entries by the prompt mode.
    policy_config = {"debug_checks": True, "prompt": prompt, "prompt_budget": 8}
    config = {"kv_policy": policy, "kv_budget": 16, "kv_policy_config": policy_config}
    if policy in ("snapkv", "rkv"):
        config["kv_policy_config"]["buffer"] = 8
    result = offline_generate(tiny_model_fp32, config, "--block-size", "32", "--max-tokens", "64")
    stats = result["stats"]
    # debug_checks raised inside the engine if any head exceeded its bound or the
    # head-block tables went inconsistent; here the run completed.
    assert stats["evictions"] + stats["prefill_evictions"] > 0
    assert all(len(tokens) == 64 for tokens in result["tokens"])


def test_think_stage_end_grows_the_cap_and_stops_eviction(
    tiny_model_fp32, vanilla_tokens, offline_generate
) -> None:
    # The random model repeats tokens: take one that request 1 generates early as the
    # "think-end" token, so that request's answer stage starts within a few steps.
    think_token = vanilla_tokens[1][2]
    base = {"kv_policy": "crystal-lite", "kv_budget": 16}
    args = ("--block-size", "32", "--max-tokens", "64")
    without = offline_generate(
        tiny_model_fp32, {**base, "kv_policy_config": {"think_end_token": -1}}, *args
    )
    with_think = offline_generate(
        tiny_model_fp32,
        {**base, "kv_policy_config": {"think_end_token": think_token, "answer_reserve": 128}},
        *args,
    )
    # The run completed (the scheduler granted the grown caps the worker used) and the
    # requests past their think stage stopped evicting.
    assert with_think["stats"]["evictions"] < without["stats"]["evictions"]
    assert all(len(tokens) == 64 for tokens in with_think["tokens"])


@pytest.mark.parametrize("rule", ["boundary", "utilisation"])
def test_adaptive_budgets_fit_the_uniform_cap(tiny_model_fp32, rule, offline_generate) -> None:
    """crystal moves budget every 4 steps, in whole 32-entry head-blocks, inside the blocks
    a uniform budget is granted (the scheduler grants no slack block): the engine runs to
    the end with debug_checks on and really reallocates."""
    policy_config = {
        "debug_checks": True,
        "prompt": "keep",
        "realloc_interval": 4,
        "realloc_rule": rule,
        "realloc_move": 0.3,
        "min_tokens": 1,
        "floor_ratio": 0.0,
    }
    config = {"kv_policy": "crystal", "kv_budget": 24, "kv_policy_config": policy_config}
    result = offline_generate(tiny_model_fp32, config, "--block-size", "32", "--max-tokens", "64")
    stats = result["stats"]
    assert stats["reallocations"] > 0 and stats["evictions"] > 0
    assert all(len(tokens) == 64 for tokens in result["tokens"])


def test_chunked_prefill_is_token_identical_at_a_large_budget(
    tiny_model_fp32, vanilla_tokens, offline_generate
) -> None:
    """Prompts prefilled in chunks of 16 tokens (each chunk attends over the entries the
    earlier ones left) give vanilla's greedy tokens when nothing is evicted."""
    result = offline_generate(
        tiny_model_fp32,
        {"kv_policy": "crystal", "kv_budget": 4096},
        "--max-num-batched-tokens",
        "16",
    )
    assert result["stats"]["evictions"] == 0
    assert result["tokens"] == vanilla_tokens


@pytest.mark.parametrize("prompt", ["keep", "compress", "evict"])
def test_chunked_prefill_with_a_small_budget_keeps_the_invariants(
    tiny_model_fp32, prompt, offline_generate
) -> None:
    policy_config = {"debug_checks": True, "prompt": prompt, "prompt_budget": 8}
    config = {"kv_policy": "crystal", "kv_budget": 16, "kv_policy_config": policy_config}
    args = ("--block-size", "32", "--max-tokens", "48", "--max-num-batched-tokens", "16")
    result = offline_generate(tiny_model_fp32, config, *args)
    stats = result["stats"]
    assert stats["evictions"] + stats["prefill_evictions"] > 0
    assert all(len(tokens) == 48 for tokens in result["tokens"])


#: Every prompt starts with the same ~200 tokens (whole 32-token blocks of it shared).
SHARED_PREFIX = ("--block-size", "32", "--shared-prefix", "60", "--max-tokens", "48")


def _mean_logprob_gap(a: dict, b: dict) -> float:
    gaps = [
        abs(x - y)
        for xs, ys in zip(a["logprobs"], b["logprobs"], strict=True)
        for x, y in zip(xs, ys, strict=True)
    ]
    return sum(gaps) / len(gaps)


def test_prefix_caching_and_chunked_prefill_are_token_identical_at_a_large_budget(
    tiny_model_fp32, offline_generate
) -> None:
    """prompt `keep` shares the full prompt blocks through vLLM's prefix cache: with both
    prefix caching and 16-token chunks on, crystal gives the tokens of crystal with both
    off and of vanilla vLLM."""
    config = {"kv_policy": "crystal", "kv_budget": 4096, "kv_policy_config": {"prompt": "keep"}}
    both = offline_generate(
        tiny_model_fp32, config, *SHARED_PREFIX, "--max-num-batched-tokens", "16"
    )
    neither = offline_generate(tiny_model_fp32, config, *SHARED_PREFIX, "--prefix-caching", "off")
    vanilla = offline_generate(tiny_model_fp32, {"kv_policy": "none"}, *SHARED_PREFIX)
    assert both["prefix_cache"]["hits"] > 0
    assert neither["prefix_cache"]["hits"] == 0
    assert both["tokens"] == neither["tokens"] == vanilla["tokens"]
    assert _mean_logprob_gap(both, neither) < 5e-3


def test_prefix_caching_at_a_small_budget_matches_it_off(tiny_model_fp32, offline_generate) -> None:
    """Budget 16: the requests that hit the cache read the shared prompt blocks and evict
    only their own entries. debug_checks fingerprint every full prompt block once written
    and fail the run if any later step writes into one; all blocks are free at the end."""
    policy_config = {"prompt": "keep", "debug_checks": True}
    config = {"kv_policy": "crystal", "kv_budget": 16, "kv_policy_config": policy_config}
    args = (*SHARED_PREFIX, "--max-model-len", "512", "--num-blocks", "18")
    shared = offline_generate(tiny_model_fp32, config, *args)
    private = offline_generate(tiny_model_fp32, config, *args, "--prefix-caching", "off")
    assert shared["prefix_cache"]["hits"] > 0 and private["prefix_cache"]["hits"] == 0
    assert shared["stats"]["evictions"] > 0
    assert shared["tokens"] == private["tokens"]
    # A request reading the wrong entries moves its log-probs by ~0.04 on average here.
    assert _mean_logprob_gap(shared, private) < 5e-3
    assert shared["free_blocks"] == shared["usable_blocks"]
