"""Top-p hit masks and GQA reduction against plain-Python oracles."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crystal_vllm.policy import top_p_mask
from crystal_vllm.policy.select import gqa_reduce


def oracle_top_p(probs: list[float], position: list[int], valid: list[bool], p: float) -> set[int]:
    """Smallest set reaching p * total: take by (prob desc, position desc)."""
    slots = [i for i in range(len(probs)) if valid[i]]
    if p >= 1.0:
        return set(slots)
    total = sum(probs[i] for i in slots)
    slots.sort(key=lambda i: (-probs[i], -position[i]))
    taken, mass = set(), 0.0
    for i in slots:
        if mass >= p * total:
            break
        taken.add(i)
        mass += probs[i]
    return taken


def _random_case(seed: int, heads: int, slots: int, dyadic: bool):
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(heads, slots, generator=g) < 0.8
    position = torch.stack([torch.randperm(4 * slots, generator=g)[:slots] for _ in range(heads)])
    position = torch.where(valid, position, -1)
    if dyadic:
        probs = torch.randint(0, 6, (heads, slots), generator=g).float() / 32
    else:
        probs = torch.randn(heads, slots, generator=g).exp()
    probs = torch.where(valid, probs, 0.0)
    return probs, position, valid


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    heads=st.integers(1, 6),
    slots=st.integers(1, 40),
    p16=st.integers(1, 16),
)
def test_top_p_matches_oracle_with_ties(seed: int, heads: int, slots: int, p16: int) -> None:
    # Dyadic probabilities and p = k/16 make every sum exact: ties and boundaries are real.
    probs, position, valid = _random_case(seed, heads, slots, dyadic=True)
    p = p16 / 16
    hit = top_p_mask(probs, position, valid, p)
    for h in range(heads):
        want = oracle_top_p(probs[h].tolist(), position[h].tolist(), valid[h].tolist(), p)
        assert set(hit[h].nonzero().flatten().tolist()) == want


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), p=st.floats(0.05, 0.99))
def test_top_p_continuous_is_smallest_set(seed: int, p: float) -> None:
    probs, position, valid = _random_case(seed, 4, 64, dyadic=False)
    hit = top_p_mask(probs, position, valid, p)
    for h in range(4):
        total = probs[h].sum()
        mass = probs[h][hit[h]].sum()
        assert mass >= p * total * (1 - 1e-5)
        if hit[h].any():  # dropping the smallest hit falls below p
            smallest = probs[h][hit[h]].min()
            assert mass - smallest < p * total * (1 + 1e-5)
            assert (probs[h][valid[h] & ~hit[h]] <= smallest).all()


def test_top_p_ties_prefer_recent_position() -> None:
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25]])
    position = torch.tensor([[5, 9, 1, 7]])
    valid = torch.ones_like(probs, dtype=torch.bool)
    hit = top_p_mask(probs, position, valid, 0.5)
    assert hit.tolist() == [[False, True, False, True]]
    # Higher probability beats recency.
    probs = torch.tensor([[0.4, 0.2, 0.2, 0.2]])
    assert top_p_mask(probs, position, valid, 0.5).tolist() == [[True, True, False, False]]


def test_top_p_one_takes_all_valid_even_zero_mass() -> None:
    probs = torch.tensor([[0.5, 0.0, 0.5, 0.0]])
    position = torch.tensor([[0, 1, 2, -1]])
    valid = torch.tensor([[True, True, True, False]])
    assert top_p_mask(probs, position, valid, 1.0).tolist() == [[True, True, True, False]]
    assert top_p_mask(probs, position, valid, 0.99).tolist() == [[True, False, True, False]]


def test_top_p_all_zero_head_has_no_hits() -> None:
    probs = torch.zeros(1, 3)
    valid = torch.ones(1, 3, dtype=torch.bool)
    assert not top_p_mask(probs, torch.arange(3).view(1, 3), valid, 0.9).any()


@pytest.mark.parametrize("mode", ["mean", "max"])
def test_gqa_reduce_matches_loop(mode: str) -> None:
    g = torch.Generator().manual_seed(0)
    kv, group, slots = 3, 4, 10
    probs = torch.rand(2, 5, kv * group, slots, generator=g)
    out = gqa_reduce(probs, kv, mode)
    for h in range(kv):
        members = probs[:, :, h * group : (h + 1) * group]
        if mode == "mean":
            want = members.mean(2)
        else:
            want = members.max(2).values
            want = want / want.sum(-1, keepdim=True)
        torch.testing.assert_close(out[:, :, h], want)
    if mode == "max":
        torch.testing.assert_close(out.sum(-1), torch.ones(2, 5, kv))


def test_gqa_reduce_rejects_bad_group() -> None:
    with pytest.raises(ValueError, match="multiple"):
        gqa_reduce(torch.rand(1, 1, 5, 4), 2, "mean")
    with pytest.raises(ValueError, match="gqa_reduce"):
        gqa_reduce(torch.rand(1, 1, 4, 4), 2, "median")
