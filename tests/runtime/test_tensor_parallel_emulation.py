"""Tensor parallelism in the runtime, without vLLM: one cache over every KV head (TP=1)
against one cache per rank over its slice of the heads, fed the same tokens.

Every policy but ``crystal`` decides per head, so each rank keeps exactly the positions
the single cache keeps for the same head (``random`` because a rank ranks by model-wide
head index). ``crystal`` reallocates budget among a rank's own heads only (Algorithm 2 is
rank-local, docs/algorithm.md §5): each rank holds exactly its share of the total.
"""

from __future__ import annotations

import math

import pytest
import torch
from cache_builder import build_cache

from crystal_vllm.policy import POLICY_NAMES, make_policy
from crystal_vllm.runtime import StepRequest
from crystal_vllm.vllm_ext.runner_mixin import first_kv_head

L, H, G, D, BS = 2, 4, 2, 16, 8
TP = 2
HR = H // TP  # KV heads per rank
SCALE = D**-0.5


def _cache(policy_name: str, params: dict, heads: int, budget: int, prompt: int, rank: int):
    policy = make_policy(policy_name, params)
    policy.first_kv_head = first_kv_head(H, H // heads, rank)
    # No slack for crystal either: a rank's budgets move inside its uniform reservation.
    cap = math.ceil(min(policy.resident_bound(budget, prompt), 96) / BS)
    cache = build_cache(
        policy,
        layers=L,
        kv_heads=heads,
        block_size=BS,
        head_dim=D,
        cap=cap,
        num_blocks=32,
        max_rows=2,
    )
    return cache, list(range(1, 1 + cap))


def _run(policy_name: str, params: dict, budget: int, prompt: int, steps: int, check, same=True):
    """Drive the single cache and the rank caches through the same steps; ``check(single,
    ranks)`` runs after every step, and with ``same`` the ranks' outputs side by side must
    be the single cache's."""
    torch.manual_seed(5)
    total = prompt + steps
    q = torch.randn(total, L, H * G, D) * 3
    k = torch.randn(total, L, H, D)
    v = torch.randn(total, L, H, D)
    single = _cache(policy_name, params, H, budget, prompt, 0)
    ranks = [_cache(policy_name, params, HR, budget, prompt, r) for r in range(TP)]
    for pos in range(0, total):
        t = slice(0, prompt) if pos == 0 else slice(pos, pos + 1)
        if 0 < pos < prompt:
            continue
        computed, new = (0, prompt) if pos == 0 else (pos, 1)
        outs = []
        for r, (cache, blocks) in enumerate([single, *ranks]):
            heads = slice(0, H) if r == 0 else slice((r - 1) * HR, r * HR)
            qheads = slice(heads.start * G, heads.stop * G)
            cache.begin_step([StepRequest("r", new, computed, prompt, blocks, budget)])
            layer_outs = [
                cache.attention(layer, q[t, layer, qheads], k[t, layer, heads], v[t, layer, heads])
                for layer in range(L)
            ]
            cache.end_step()
            outs.append(torch.stack(layer_outs))
        if same:
            torch.testing.assert_close(torch.cat(outs[1:], dim=2), outs[0], rtol=1e-4, atol=1e-5)
        check(single[0], [cache for cache, _ in ranks])


@pytest.mark.parametrize("policy_name", [p for p in POLICY_NAMES if p != "crystal"])
def test_each_rank_keeps_what_one_worker_keeps_for_its_heads(policy_name: str) -> None:
    params = {"buffer": 4} if policy_name in ("snapkv", "rkv") else {}
    params.update(prompt="compress", prompt_budget=6)

    def same_positions(single, ranks) -> None:
        for layer in range(L):
            for head in range(H):
                rank, local = divmod(head, HR)
                assert ranks[rank].kept_positions("r", layer, local) == single.kept_positions(
                    "r", layer, head
                ), f"layer {layer}, head {head}"

    _run(policy_name, params, budget=10, prompt=16, steps=30, check=same_positions)


def test_random_without_its_head_offset_would_differ() -> None:
    """The check above can fail: ranking by the local head index changes rank 1's picks."""
    params = {"prompt": "evict"}
    single, _ = _cache("random", params, H, 10, 16, 0)
    rank1, _ = _cache("random", params, HR, 10, 16, 1)
    assert rank1.policy.first_kv_head == HR
    rank1.policy.first_kv_head = 0
    positions = torch.arange(40).view(1, 1, 1, -1)
    heads = torch.arange(HR).view(1, 1, -1, 1)
    from crystal_vllm.policy.baselines import uniform_rank

    assert not torch.equal(
        uniform_rank(0, positions, heads), uniform_rank(0, positions, heads + HR)
    )


def test_crystal_reallocates_within_each_rank_and_the_shares_sum_to_the_total() -> None:
    budget = 6
    params = {"realloc_interval": 4, "min_tokens": 1, "floor_ratio": 0.0, "prompt": "evict"}
    seen = {"filled": 0, "uneven": False}

    def rank_shares(single, ranks) -> None:
        held = [c.policy.counted(c.state, torch.tensor(c.rows_of(["r"]))).sum(-1)[0] for c in ranks]
        # Between steps a full head holds one fewer than its budget (exact residency).
        share = L * HR * (budget - 1)
        if all(int(h.sum()) >= share for h in held):
            seen["filled"] += 1
            for h in held:  # each rank holds exactly its share, however split
                assert int(h.sum()) == share, h.tolist()
            assert sum(int(h.sum()) for h in held) == L * H * (budget - 1)
            seen["uneven"] |= any(bool((h != budget - 1).any()) for h in held)
        for cache in ranks:
            row = cache.rows_of(["r"])[0]
            assert int(cache.targets[row].sum()) == L * HR * budget

    # The rank-local allocation differs from one over all heads: outputs differ too.
    _run("crystal", params, budget=budget, prompt=12, steps=60, check=rank_shares, same=False)
    assert seen["filled"] > 20
    assert seen["uneven"]  # the budgets really moved between a rank's heads
