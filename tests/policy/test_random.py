"""``random``: uniform, seeded eviction among the evictable entries."""

from __future__ import annotations

import pytest
import torch

from crystal_vllm.policy import make_policy


def _filled(policy, prompt: int, generated: int):
    """One head holding ``prompt`` prompt entries and ``generated`` decode entries."""
    total = prompt + generated
    state = policy.init_state(1, 1, 1, total)
    rows = torch.tensor([0])
    positions = torch.arange(total).view(1, 1, 1, total)
    first = torch.zeros(1, 1, 1, total, dtype=torch.bool)
    first[..., :prompt] = True
    policy.insert(state, rows, first, positions, prefill=True)
    for i in range(prompt, total):
        policy.begin_step(state, rows)
        new = torch.zeros_like(first)
        new[..., i] = True
        policy.insert(state, rows, new, positions)
    policy.begin_step(state, rows)  # nothing is born in the selecting step
    return state, rows


@pytest.mark.parametrize("mode", ["keep", "evict"])
def test_evicts_exactly_the_excess_among_evictable_entries(mode: str) -> None:
    policy = make_policy("random", {"prompt": mode})
    state, rows = _filled(policy, prompt=4, generated=12)
    evict = policy.select_evictions(state, rows, torch.tensor([[[5]]]))[0, 0, 0]
    if mode == "keep":  # the prompt is neither evicted nor counted
        assert int(evict.sum()) == 12 - 5 and not evict[:4].any()
    else:
        assert int(evict.sum()) == 16 - 5


def test_never_evicts_the_entry_born_this_step() -> None:
    policy = make_policy("random", {"prompt": "evict"})
    state, rows = _filled(policy, prompt=0, generated=6)
    new = torch.zeros(1, 1, 1, 6, dtype=torch.bool)
    new[..., 5] = True
    policy.remove(state, rows, new)
    policy.insert(state, rows, new, torch.full((1, 1, 1, 6), 5))  # born now
    for _ in range(20):
        assert not policy.select_evictions(state, rows, torch.tensor([[[0]]]))[0, 0, 0, 5]


def test_seeded_and_uniform() -> None:
    """The same seed gives the same victims; over seeds every entry goes equally often."""
    budget, n, trials = 3, 10, 600
    counts = torch.zeros(n)
    for seed in range(trials):
        policy = make_policy("random", {"seed": seed, "prompt": "evict"})
        state, rows = _filled(policy, prompt=0, generated=n)
        budgets = torch.tensor([[[budget]]])
        evict = policy.select_evictions(state, rows, budgets)[0, 0, 0]
        again = make_policy("random", {"seed": seed, "prompt": "evict"})
        state2, _ = _filled(again, prompt=0, generated=n)
        assert torch.equal(evict, again.select_evictions(state2, rows, budgets)[0, 0, 0])
        counts += evict.float()
    expected = trials * (n - budget) / n  # 420 per entry
    # Binomial sd ~ 11: a 6-sd band fails only for a biased choice (e.g. by position).
    assert bool(((counts - expected).abs() < 6 * (expected * budget / n) ** 0.5).all()), counts
