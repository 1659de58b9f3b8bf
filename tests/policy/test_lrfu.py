"""LRFU scoring: incremental CRF == closed form, and the lam limits (LRU, LFU)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crystal_vllm.policy import make_policy

SLOTS = 12


def _drive(lam: float, seed: int, steps: int, budget: int | None = None):
    """Random hit histories on one head: returns policy, state and each slot's hit steps.

    A hit set H is produced exactly by uniform attention on H (top_p just below 1).
    """
    policy = make_policy("crystal-lite", {"lam": lam, "top_p": 0.999, "prompt": "evict"})
    state = policy.init_state(1, 1, 1, SLOTS)
    rows = torch.tensor([0])
    g = torch.Generator().manual_seed(seed)
    n_prompt = 6
    new = (torch.arange(SLOTS) < n_prompt).view(1, 1, 1, SLOTS)
    policy.insert(state, rows, new, torch.arange(SLOTS).view(1, 1, 1, SLOTS), prefill=True)
    hits: dict[int, list[int]] = {s: [] for s in range(n_prompt)}
    for t in range(1, steps + 1):
        policy.begin_step(state, rows)
        if t % 3 == 0 and len(hits) < SLOTS:  # a decode insert counts as a hit at t
            s = len(hits)
            one = torch.zeros(1, 1, 1, SLOTS, dtype=torch.bool)
            one[..., s] = True
            policy.insert(state, rows, one, torch.full((1, 1, 1, SLOTS), s))
            hits[s] = [t]
        chosen = (torch.rand(SLOTS, generator=g) < 0.3) & state.valid[0, 0, 0]
        probs = chosen.float() / max(int(chosen.sum()), 1)
        policy.observe(state, rows, probs.view(1, 1, 1, SLOTS))
        for s in chosen.nonzero().flatten().tolist():
            if t not in hits[s]:
                hits[s].append(t)
    return policy, state, rows, hits


@settings(max_examples=25, deadline=None)
@given(lam=st.floats(0.0, 1.0), seed=st.integers(0, 2**31), steps=st.integers(1, 40))
def test_incremental_crf_equals_closed_form(lam: float, seed: int, steps: int) -> None:
    policy, state, rows, hits = _drive(lam, seed, steps)
    crf = policy.decayed_crf(state, rows)[0, 0, 0]
    for s, times in hits.items():
        want = sum(lam ** (steps - tj) for tj in times)
        assert crf[s].item() == pytest.approx(want, rel=1e-5, abs=1e-6), (s, times)
        assert int(state.tau[0, 0, 0, s]) == max(times, default=0)


def _victims(policy, state, rows, budget: int) -> set[int]:
    evict = policy.select_evictions(state, rows, torch.tensor([[[budget]]]))
    return set(evict[0, 0, 0].nonzero().flatten().tolist())


def _expected(hits, state, budget: int, key) -> set[int]:
    t = int(state.step[0])
    cands = [s for s in hits if int(state.born[0, 0, 0, s]) != t]
    keep = max(budget, len(hits) - len(cands))
    excess = len(hits) - keep
    return set(sorted(cands, key=key)[: max(excess, 0)])


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31), steps=st.integers(2, 30), budget=st.integers(0, 8))
def test_lam_zero_is_lru_over_hits(seed: int, steps: int, budget: int) -> None:
    policy, state, rows, hits = _drive(0.0, seed, steps)

    def lru(s):
        return (max(hits[s], default=0), s)  # position == slot here

    assert _victims(policy, state, rows, budget) == _expected(hits, state, budget, lru)


@pytest.mark.parametrize("lam", [0.1, 0.3, 0.5])
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31), steps=st.integers(2, 30), budget=st.integers(0, 8))
def test_small_lam_ranks_as_lru_over_hits(lam: float, seed: int, steps: int, budget: int) -> None:
    """For lam <= 0.5 no victim was hit more recently than a kept entry."""
    policy, state, rows, hits = _drive(lam, seed, steps)
    victims = _victims(policy, state, rows, budget)
    t = int(state.step[0])
    kept = [s for s in hits if s not in victims and int(state.born[0, 0, 0, s]) != t]
    last = {s: max(h, default=0) for s, h in hits.items()}
    assert all(last[v] <= last[k] for v in victims for k in kept)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31), steps=st.integers(2, 30), budget=st.integers(0, 8))
def test_lam_one_ranks_as_lfu_over_hits(seed: int, steps: int, budget: int) -> None:
    policy, state, rows, hits = _drive(1.0, seed, steps)

    def lfu(s):
        return (len(hits[s]), max(hits[s], default=0), s)

    assert _victims(policy, state, rows, budget) == _expected(hits, state, budget, lfu)


def test_new_entry_is_not_rewarded_twice() -> None:
    policy = make_policy("crystal", {"lam": 0.5})
    state = policy.init_state(1, 1, 1, 2)
    rows = torch.tensor([0])
    policy.begin_step(state, rows)
    new = torch.tensor([[[[True, False]]]])
    policy.insert(state, rows, new, torch.zeros(1, 1, 1, 2, dtype=torch.int64))
    policy.observe(state, rows, torch.tensor([[[[1.0, 0.0]]]]))
    assert state.crf[0, 0, 0, 0] == 1.0 and state.tau[0, 0, 0, 0] == 1
    policy.begin_step(state, rows)
    policy.observe(state, rows, torch.tensor([[[[1.0, 0.0]]]]))
    assert state.crf[0, 0, 0, 0] == 1.5 and state.tau[0, 0, 0, 0] == 2


def test_utilisation_is_decayed_crf_sum() -> None:
    policy, state, rows, hits = _drive(0.6, 5, 20)
    steps = int(state.step[0])
    want = sum(sum(0.6 ** (steps - tj) for tj in times) for times in hits.values())
    assert policy.head_utilisation(state, rows).item() == pytest.approx(want, rel=1e-5)


def test_kept_prompt_is_neither_evicted_nor_counted() -> None:
    policy = make_policy("crystal", {"prompt": "keep"})
    state = policy.init_state(1, 1, 1, 8)
    rows = torch.tensor([0])
    prompt = torch.tensor([[[[True] * 4 + [False] * 4]]])
    policy.insert(state, rows, prompt, torch.arange(8).view(1, 1, 1, 8), prefill=True)
    for i in range(4):
        policy.begin_step(state, rows)
        one = torch.zeros(1, 1, 1, 8, dtype=torch.bool)
        one[..., 4 + i] = True
        policy.insert(state, rows, one, torch.full((1, 1, 1, 8), 4 + i))
    policy.begin_step(state, rows)
    evict = policy.select_evictions(state, rows, torch.tensor([[[2]]]))
    assert evict[0, 0, 0].tolist() == [False] * 4 + [True, True, False, False]
    unprotected = make_policy("crystal", {"prompt": "evict"})
    assert unprotected.select_evictions(state, rows, torch.tensor([[[2]]]))[0, 0, 0, :4].all()


def test_hits_before_full_false_needs_budgets() -> None:
    policy = make_policy("crystal", {"hits_before_full": False})
    state = policy.init_state(1, 1, 1, 4)
    with pytest.raises(ValueError, match="budgets"):
        policy.observe(state, torch.tensor([0]), torch.zeros(1, 1, 1, 4))


def test_time_unit_decays_lam_once_per_unit() -> None:
    """lam 0.6 per unit of 8 steps is lam ** (1/8) per step: after 8 steps an entry hit
    once has decayed by exactly lam, and the unit changes which entry goes first."""
    slow = make_policy("crystal-lite", {"lam": 0.6, "time_unit": 8, "prompt": "evict"})
    assert slow.config.step_decay == pytest.approx(0.6 ** (1 / 8))
    assert make_policy("crystal-lite", {"lam": 0.6}).config.step_decay == 0.6
    state = slow.init_state(1, 1, 1, 4)
    rows = torch.tensor([0])
    one = torch.zeros(1, 1, 1, 4, dtype=torch.bool)
    one[..., 0] = True
    slow.begin_step(state, rows)
    slow.insert(state, rows, one, torch.zeros(1, 1, 1, 4, dtype=torch.long))  # crf 1 at t=1
    for _ in range(8):
        slow.begin_step(state, rows)
    assert slow.decayed_crf(state, rows)[0, 0, 0, 0].item() == pytest.approx(0.6, rel=1e-5)
    with pytest.raises(ValueError, match="time_unit must be an integer >= 1, got 0"):
        make_policy("crystal-lite", {"time_unit": 0})
    with pytest.raises(ValueError, match="unknown parameter 'time_unit'"):
        make_policy("lru", {"time_unit": 8})


def _insert_next(policy, state, rows: torch.Tensor, position: int) -> None:
    """Begin a step and insert one decode entry at ``position`` into a one-head state."""
    policy.begin_step(state, rows)
    slots = state.num_slots
    new = torch.zeros(1, 1, 1, slots, dtype=torch.bool)
    new[..., int((~state.valid[0, 0, 0]).nonzero()[0])] = True
    policy.insert(state, rows, new, torch.full((1, 1, 1, slots), position))


def _ignored_newcomers(recent_window: int, budget: int, steps: int = 8) -> list[int]:
    """Positions a head keeps when attention only ever goes to its first two decode
    entries and every later one is ignored."""
    policy = make_policy(
        "crystal-lite", {"prompt": "evict", "recent_window": recent_window, "obs_window": 0}
    )
    slots = budget + 2
    state = policy.init_state(1, 1, 1, slots)
    rows = torch.tensor([0])
    for position in range(steps):
        _insert_next(policy, state, rows, position)
        early = state.valid & (state.position < 2)
        probs = early.float().repeat_interleave(2, dim=2)  # 2 query heads, on entries 0 and 1
        policy.observe(state, rows, probs / probs.sum(-1, keepdim=True))
        policy.remove(state, rows, policy.select_evictions(state, rows, torch.tensor([[[budget]]])))
    return sorted(state.position[state.valid].tolist())


def test_recent_window_keeps_the_newest_entries_attention_ignores() -> None:
    """Window 1 (the paper): the attended entries stay and each newcomer goes at the next
    step; a window of w keeps the w newest whatever their CRF, at most the budget."""
    assert _ignored_newcomers(1, 3) == [0, 1, 7]
    assert _ignored_newcomers(2, 3) == [0, 6, 7]  # the better of the two attended stays
    assert _ignored_newcomers(5, 3) == [5, 6, 7]  # clamped to the budget
    with pytest.raises(ValueError, match="recent_window must be an integer >= 1, got 0"):
        make_policy("crystal", {"recent_window": 0})


def _held_per_step(evict_interval: int, budget: int, steps: int) -> tuple[list[int], int]:
    """Counted entries one head holds after each step's selection, and the most it held
    during a step (the new token included), with one new decode entry per step."""
    policy = make_policy(
        "crystal-lite", {"prompt": "evict", "evict_interval": evict_interval, "obs_window": 0}
    )
    slots = budget + 1
    state = policy.init_state(1, 1, 1, slots)
    rows = torch.tensor([0])
    held, peak = [], 0
    for position in range(steps):
        _insert_next(policy, state, rows, position)
        peak = max(peak, int(state.valid.sum()))
        probs = state.valid.float().repeat_interleave(2, dim=2)
        policy.observe(state, rows, probs / probs.sum(-1, keepdim=True))
        keep = policy.keep_between_steps(budget)
        policy.remove(state, rows, policy.select_evictions(state, rows, torch.tensor([[[keep]]])))
        held.append(int(state.valid.sum()))
    return held, peak


def test_evict_interval_compresses_in_bursts_at_the_same_peak() -> None:
    """Interval 1 keeps a full head at budget - 1 between steps; interval k drops it to
    budget - k once every k steps; neither ever holds more than the budget."""
    held, peak = _held_per_step(1, 6, 12)
    assert held == [1, 2, 3, 4, 5, 5, 5, 5, 5, 5, 5, 5] and peak == 6
    held, peak = _held_per_step(3, 6, 12)
    assert held == [1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 3] and peak == 6
    assert make_policy("crystal", {"evict_interval": 4}).kernel_params() is None
    assert make_policy("crystal", {}).kernel_params() is not None
    with pytest.raises(ValueError, match="evict_interval must be an integer >= 1, got 0"):
        make_policy("crystal-lite", {"evict_interval": 0})
