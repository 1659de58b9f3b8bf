"""The promises every policy makes, checked on the same random simulations."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_sim import SMALL_PARAMS, Sim

from crystal_vllm.policy import POLICY_NAMES, PROMPT_MODES, UNBOUNDED, make_policy

ROWS = torch.tensor([2, 0, 1])


def _make(name: str, mode: str = "keep"):
    return make_policy(name, {**SMALL_PARAMS.get(name, {}), "prompt": mode})


def _budgets(seed: int, rows: int = 3, layers: int = 2, heads: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 6, (rows, layers, heads), generator=g)


def _run(
    name: str, seed: int, *, steps: int = 12, layerwise: bool = False, rows=ROWS, mode="keep"
) -> Sim:
    policy = _make(name, mode)
    budgets = _budgets(seed)
    slots = 12 if policy.max_resident(1) == UNBOUNDED else policy.max_resident(5) + 8
    slots = max(slots, 8 + steps) if name == "full" else slots
    sim = Sim(policy, budgets, slots, seed=seed, layerwise=layerwise)
    g = torch.Generator().manual_seed(seed + 1)
    lengths = torch.randint(1, 8, (budgets.shape[0],), generator=g)
    sim.prefill(rows, [int(lengths[r]) for r in rows])
    for _ in range(steps):
        sim.decode(rows)
    return sim


@pytest.mark.parametrize("mode", PROMPT_MODES)
@pytest.mark.parametrize("name", POLICY_NAMES)
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_budget_born_and_validity(name: str, mode: str, seed: int) -> None:
    """Evictions hit only valid, older entries, never a kept prompt entry; heads stay
    within their budget, counting what the prompt mode counts."""
    policy = _make(name, mode)
    budgets = _budgets(seed)[ROWS]
    sim = Sim(policy, _budgets(seed), 40, seed=seed)
    sim.prefill(ROWS, [7, 3, 5])
    evicted_any = False
    for _ in range(12):
        evict = sim.decode(ROWS)
        assert not (evict & ~sim.last_valid).any(), "evicted an empty slot"
        assert not (evict & sim.last_born_now).any(), "evicted an entry born this step"
        evicted_any |= bool(evict.any())
        protected = sim.last_prompt if policy.keeps_prompt else torch.zeros_like(evict)
        assert not (evict & protected).any(), "evicted a kept prompt entry"
        held = (sim.last_valid & ~protected).sum(-1)
        count = policy.counted(sim.state, ROWS).sum(-1)
        if name == "full":
            assert not evict.any()
        elif name in ("snapkv", "rkv"):
            assert (count < budgets + policy.config.buffer).all()
            assert (held <= budgets + policy.config.buffer).all()
        else:
            assert (count <= (budgets - 1).clamp_min(1)).all()
            assert (held <= budgets.clamp_min(2)).all()
        if name != "full":
            assert all(
                int(held[i]) <= policy.max_resident(int(budgets[i]))
                for i in zip(*held.nonzero().T, strict=True)
            )
    assert evicted_any or name == "full"


@pytest.mark.parametrize("mode", PROMPT_MODES)
@pytest.mark.parametrize("name", [n for n in POLICY_NAMES if n not in ("snapkv", "rkv")])
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_one_in_one_out_holds_exactly_budget(name: str, mode: str, seed: int) -> None:
    """Every-step policies keep exactly one fewer than their budget (at least one) counted
    entries after each select, so the next token fits (the kept prompt comes on top)."""
    sim = _run(name, seed, mode=mode)
    count = sim.policy.counted(sim.state, ROWS).sum(-1)
    if name == "full":
        assert (sim.state.valid[ROWS].sum(-1) == sim.next_pos[ROWS].view(-1, 1, 1)).all()
    else:
        assert (count == (sim.budgets[ROWS] - 1).clamp_min(1)).all()


@pytest.mark.parametrize("mode", PROMPT_MODES)
@pytest.mark.parametrize("name", ["snapkv", "rkv"])
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_cadence_compresses_to_budget(name: str, mode: str, seed: int) -> None:
    """Cadence policies evict only at budget + buffer, then down to the budget."""
    sim = _run(name, seed, steps=0, mode=mode)
    buffer = sim.policy.config.buffer
    for _ in range(10):
        before = sim.policy.counted(sim.state, ROWS).sum(-1) + 1
        evict = sim.decode(ROWS)
        n = evict.sum(-1)
        due = before >= sim.budgets[ROWS] + buffer
        assert (n[~due] == 0).all()
        after = sim.policy.counted(sim.state, ROWS).sum(-1)
        assert (after[due] == sim.budgets[ROWS][due]).all()


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_deterministic(name: str) -> None:
    a, b = _run(name, 7), _run(name, 7)
    for f in a.state.entry_fields():
        assert torch.equal(getattr(a.state, f), getattr(b.state, f)), f
    assert all(torch.equal(x[1], y[1]) for x, y in zip(a.log, b.log, strict=True))


@pytest.mark.parametrize("name", POLICY_NAMES)
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_batch_equals_one_by_one(name: str, seed: int) -> None:
    batched = _run(name, seed)
    for r in ROWS.tolist():
        single = _run(name, seed, rows=torch.tensor([r]))
        for f in batched.state.entry_fields():
            assert torch.equal(getattr(batched.state, f)[r], getattr(single.state, f)[r]), f


@pytest.mark.parametrize("name", POLICY_NAMES)
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_layer_views_equal_full_state(name: str, seed: int) -> None:
    full = _run(name, seed)
    by_layer = _run(name, seed, layerwise=True)
    for f in full.state.entry_fields():
        assert torch.equal(getattr(full.state, f), getattr(by_layer.state, f)), f
    assert any(e[1].any() for e in full.log) or name == "full"


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_reset_forgets_rows(name: str) -> None:
    sim = _run(name, 3)
    policy, state = sim.policy, sim.state
    fresh = policy.init_state(*state.valid.shape)
    kept = {f: getattr(state, f)[1].clone() for f in state.entry_fields()}
    policy.reset(state, torch.tensor([0, 2]))
    for f in state.entry_fields():
        assert torch.equal(getattr(state, f)[[0, 2]], getattr(fresh, f)[[0, 2]]), f
        assert torch.equal(getattr(state, f)[1], kept[f]), f
    assert state.valid[1].any()
    assert state.step.tolist() == [0, int(state.step[1]), 0]


def test_layer_view_is_a_view() -> None:
    policy = make_policy("crystal")
    state = policy.init_state(2, 3, 2, 4)
    view = state.layer(1)
    assert view.valid.shape == (2, 1, 2, 4)
    assert view.step is state.step
    view.crf[0, 0, 1, 2] = 5.0
    assert state.crf[0, 1, 1, 2] == 5.0
    with pytest.raises(IndexError):
        state.layer(3)
