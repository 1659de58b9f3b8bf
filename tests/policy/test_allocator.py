"""Algorithm 2 budget allocation: exact totals, floors, caps, proportionality."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crystal_vllm.policy import allocate_budgets
from crystal_vllm.policy.allocator import boundary_targets, converge, fit_blocks, fit_growth


def _targets(s: torch.Tensor, budgets: torch.Tensor, total: int) -> torch.Tensor:
    """Algorithm 2 in plain Python loops (real-valued, before floors and rounding)."""
    layers, heads = s.shape
    eta_l = [sum(s[l]) / sum(budgets[l]) for l in range(layers)]  # noqa: E741
    out = torch.zeros(layers, heads, dtype=torch.float64)
    for l in range(layers):  # noqa: E741
        b_l = total * eta_l[l] / sum(eta_l)
        eta_h = [s[l, h] / budgets[l, h] for h in range(heads)]
        for h in range(heads):
            out[l, h] = b_l * eta_h[h] / sum(eta_h) if sum(eta_h) > 0 else 0.0
    return out


def _case(seed: int, b: int, layers: int, heads: int):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(b, layers, heads, generator=g) * 10
    s[torch.rand(b, layers, heads, generator=g) < 0.2] = 0.0
    budgets = torch.randint(1, 200, (b, layers, heads), generator=g)
    return s, budgets


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    b=st.integers(1, 3),
    layers=st.integers(1, 6),
    heads=st.integers(1, 4),
    avg=st.integers(0, 300),
    floor_ratio=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
    min_tokens=st.integers(0, 20),
    cap=st.integers(0, 700),
)
def test_totals_floors_and_caps(seed, b, layers, heads, avg, floor_ratio, min_tokens, cap) -> None:
    s, budgets = _case(seed, b, layers, heads)
    n = layers * heads
    total = torch.full((b,), avg * n)
    out = allocate_budgets(
        s, budgets, total, floor_ratio=floor_ratio, min_tokens=min_tokens, max_per_head=cap
    )
    assert out.dtype == torch.int64 and out.shape == s.shape
    assert (out <= cap).all() and (out >= 0).all()
    sums = out.sum((1, 2))
    if avg <= cap:
        assert (sums == total).all()
        floor = min(max(math.ceil(floor_ratio * avg), min_tokens), avg, cap)
        assert (out >= floor).all()
    else:  # infeasible: the quota cannot hold the total
        assert (out == cap).all()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), layers=st.integers(1, 5), heads=st.integers(1, 4))
def test_proportional_when_floors_do_not_bind(seed: int, layers: int, heads: int) -> None:
    s, budgets = _case(seed, 1, layers, heads)
    s = s + 1.0  # every head used, so no zero-share head sits at the floor
    total = 1000 * layers * heads
    out = allocate_budgets(
        s, budgets, torch.tensor([total]), floor_ratio=0.0, min_tokens=0, max_per_head=10**9
    )
    want = _targets(s[0].double(), budgets[0].double(), total)
    assert (out[0] - want).abs().max() < 1.0 + 1e-9
    assert int(out.sum()) == total
    # Largest remainder: rounding down every target and adding 1 to the largest fractions.
    frac = want - want.floor()
    missing = total - int(want.floor().sum())
    top = set(frac.flatten().argsort(descending=True, stable=True)[:missing].tolist())
    got_up = set(((out[0] - want.floor()) == 1).flatten().nonzero().flatten().tolist())
    assert got_up == top


def test_uniform_utilisation_gives_uniform_budgets() -> None:
    budgets = torch.tensor([[[100, 300], [50, 350]]])
    s = budgets.double() * 0.7  # same eta everywhere
    out = allocate_budgets(
        s, budgets, torch.tensor([800]), floor_ratio=0.2, min_tokens=16, max_per_head=1000
    )
    assert out.tolist() == [[[200, 200], [200, 200]]]
    # ... and uniform budgets are a fixed point.
    again = allocate_budgets(
        out.double() * 0.7,
        out,
        torch.tensor([800]),
        floor_ratio=0.2,
        min_tokens=16,
        max_per_head=1000,
    )
    assert torch.equal(again, out)


def test_floor_binds_and_rest_is_water_filled() -> None:
    s = torch.tensor([[[0.0, 1.0, 3.0, 6.0]]])
    budgets = torch.full((1, 1, 4), 100)
    out = allocate_budgets(
        s, budgets, torch.tensor([400]), floor_ratio=0.25, min_tokens=0, max_per_head=1000
    )
    # floor 25 for the idle head; the other 375 split 1:3:6 by a common scale.
    assert out.tolist() == [[[25, 38, 112, 225]]] or out.tolist() == [[[25, 37, 113, 225]]]
    assert int(out.sum()) == 400


def test_cap_redistributes_excess() -> None:
    s = torch.tensor([[[1.0, 1.0, 98.0]]])
    budgets = torch.full((1, 1, 3), 10)
    out = allocate_budgets(
        s, budgets, torch.tensor([30]), floor_ratio=0.0, min_tokens=0, max_per_head=12
    )
    assert out.tolist() == [[[9, 9, 12]]]


def test_zero_utilisation_splits_uniformly_and_low_total_lowers_floor() -> None:
    out = allocate_budgets(
        torch.zeros(1, 2, 3),
        torch.full((1, 2, 3), 7),
        torch.tensor([20]),
        floor_ratio=0.2,
        min_tokens=16,
        max_per_head=100,
    )
    assert int(out.sum()) == 20 and out.max() - out.min() <= 1
    assert (out >= 3).all()  # floor lowered from 16 to 20 // 6


def test_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="b, L, H"):
        allocate_budgets(
            torch.zeros(2, 3),
            torch.zeros(2, 3),
            torch.tensor([1, 1]),
            floor_ratio=0.2,
            min_tokens=1,
            max_per_head=4,
        )


# -- converge: moving heads toward new targets without leaving budget unused -------------


@settings(max_examples=60, deadline=None)
@given(data=st.data(), b=st.integers(1, 3), layers=st.integers(1, 3), heads=st.integers(1, 3))
def test_converge_conserves_and_reaches_the_targets(data, b: int, layers: int, heads: int):
    """A full request (held entries = the targets' total) after a reallocation: every step
    the heads below their targets grow by one, the heads above give up exactly as much,
    never dropping below their target; the total never moves; all targets are reached
    within max |target - held| steps. (After a step every head holds its budget, so the
    next ``held`` is what converge returned.)"""
    cells = b * layers * heads
    draw = st.lists(st.integers(0, 30), min_size=cells, max_size=cells)
    held = torch.tensor(data.draw(draw)).view(b, layers, heads)
    targets = _with_totals(torch.tensor(data.draw(draw)).view_as(held), held.sum(dim=(1, 2)))
    total = targets.sum(dim=(1, 2))
    for _ in range(int((targets - held).abs().max())):
        nxt = converge(held, targets)
        below, above, at = held < targets, held > targets, held == targets
        assert torch.equal(nxt[below], held[below] + 1)
        assert bool((nxt[above] >= targets[above]).all())
        assert bool((nxt[above] <= held[above]).all())
        assert torch.equal(nxt[at], held[at])
        assert torch.equal(nxt.sum(dim=(1, 2)), total)  # never unused, never over
        held = nxt
    assert torch.equal(held, targets)


def _with_totals(targets: torch.Tensor, totals: torch.Tensor) -> torch.Tensor:
    """``targets`` changed by single units, round-robin, until each row sums to its total."""
    out = targets.clone().view(targets.shape[0], -1)
    for i, total in enumerate(totals.tolist()):
        k = 0
        while int(out[i].sum()) != total:
            j = k % out.shape[1]
            if int(out[i].sum()) < total:
                out[i, j] += 1
            elif out[i, j] > 0:
                out[i, j] -= 1
            k += 1
    return out.view_as(targets)


def test_converge_lets_an_unfilled_request_grow() -> None:
    """Below the total (the cache still filling), growth needs no matching shrink; a head
    above its target gives up entries only once the total would be exceeded."""
    targets = torch.tensor([[[6, 6]]])
    assert converge(torch.tensor([[[2, 6]]]), targets).tolist() == [[[3, 6]]]
    assert converge(torch.tensor([[[2, 9]]]), targets).tolist() == [[[3, 9]]]  # 12 <= 12
    assert converge(torch.tensor([[[3, 9]]]), targets).tolist() == [[[4, 8]]]
    with pytest.raises(ValueError, match=r"\[b, L, H\]"):
        converge(torch.zeros(2, 3), torch.zeros(2, 3))


# -- boundary targets, whole head-blocks ---------------------------------------------------


def _blocks(t: torch.Tensor, fixed: torch.Tensor, bs: int) -> torch.Tensor:
    """Blocks each request needs, in plain loops: sum over heads of ceil((fixed + t) / bs)."""
    out = []
    for i in range(t.shape[0]):
        out.append(
            sum(
                math.ceil((int(f) + int(x)) / bs)
                for f, x in zip(fixed[i].flatten(), t[i].flatten(), strict=True)
            )
        )
    return torch.tensor(out)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), layers=st.integers(1, 3), heads=st.integers(1, 4))
def test_boundary_targets_keep_layer_totals_floor_and_cap(seed, layers, heads) -> None:
    g = torch.Generator().manual_seed(seed)
    slots, b = 12, 2
    targets = torch.randint(4, 10, (b, layers, heads), generator=g)
    counted = torch.arange(slots) < (targets - 1).unsqueeze(-1)
    scores = torch.where(counted, torch.rand(b, layers, heads, slots, generator=g) * 5, torch.inf)
    new = boundary_targets(scores, targets, move=0.3, floor=3, max_per_head=11)
    assert torch.equal(new.sum(-1), targets.sum(-1))  # no layer takes another's budget
    assert bool((new >= torch.minimum(targets, torch.tensor(3))).all())
    assert bool((new <= torch.maximum(targets, torch.tensor(11))).all())


def test_boundary_targets_move_budget_to_the_stronger_boundary() -> None:
    """Head 0's weakest kept entry scores 5, head 1's scores 0.1: budget flows to head 0,
    taken from head 1's weakest entries."""
    scores = torch.full((1, 1, 2, 10), torch.inf)
    scores[0, 0, 0, :8] = torch.linspace(5, 9, 8)
    scores[0, 0, 1, :8] = torch.linspace(0.1, 4, 8)
    targets = torch.tensor([[[9, 9]]])
    new = boundary_targets(scores, targets, move=0.2, floor=2, max_per_head=20)
    # m = round(0.2 * 18) = 4 units leave head 1 (it owns the 4 weakest entries), and
    # go by boundary score: 5 / (5 + 0.1) of them to head 0 (largest remainder: all 4).
    assert new.tolist() == [[[13, 5]]]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), heads=st.integers(1, 6), bs=st.sampled_from([1, 4, 8]))
def test_fit_blocks_fits_the_capacity_and_keeps_the_total(seed, heads, bs) -> None:
    g = torch.Generator().manual_seed(seed)
    b, budget = 3, int(torch.randint(4, 30, (1,), generator=g))
    fixed = torch.randint(0, 10, (b, 1, 1), generator=g).expand(b, 2, heads)
    # The capacity of the uniform budget, and any targets with that total.
    capacity = _blocks(torch.full((b, 2, heads), budget), fixed, bs)
    raw = torch.rand(b, 2, heads, generator=g) + 0.05
    targets = allocate_budgets(
        raw,
        torch.full_like(fixed, budget),
        torch.full((b,), budget * 2 * heads),
        floor_ratio=0.0,
        min_tokens=1,
        max_per_head=10 * budget,
    )
    fitted = fit_blocks(targets, fixed, block_size=bs, capacity=capacity, floor=1)
    assert bool((_blocks(fitted, fixed, bs) <= capacity).all())
    assert torch.equal(fitted.sum((1, 2)), targets.sum((1, 2)))
    assert bool((fitted >= 1).all())
    # Rows that already fitted are unchanged.
    fits = _blocks(targets, fixed, bs) <= capacity
    assert torch.equal(fitted[fits], targets[fits])


def test_fit_growth_holds_back_only_a_head_that_would_start_a_block() -> None:
    bs, fixed = 4, torch.zeros(1, 1, 3, dtype=torch.long)
    next_held = torch.tensor([[[4, 6, 3]]])  # head 0 sits at a block boundary
    budgets = torch.tensor([[[5, 7, 2]]])  # converge: heads 0 and 1 grow, head 2 gives one
    targets = torch.tensor([[[6, 8, 2]]])
    capacity = torch.tensor([5])  # 1 + 2 + 1 used during the next step; 1 free
    assert torch.equal(
        fit_growth(budgets, next_held, fixed, targets, block_size=bs, capacity=capacity), budgets
    )
    capacity = torch.tensor([4])  # no free block: head 0 waits, head 1 grows inside its block
    held_back = fit_growth(budgets, next_held, fixed, targets, block_size=bs, capacity=capacity)
    assert held_back.tolist() == [[[4, 7, 2]]]
    assert bool((_blocks(held_back, fixed, bs) <= capacity).all())
    # A head above its target shrinks one more while another waits for a block.
    targets = torch.tensor([[[6, 8, 1]]])
    held_back = fit_growth(budgets, next_held, fixed, targets, block_size=bs, capacity=capacity)
    assert held_back.tolist() == [[[4, 7, 1]]]


def test_boundary_targets_never_return_units_above_the_cap() -> None:
    """A head that gives and receives in one round must not get back, with the units the
    cap turned away, what it gave: that put a head two entries over its slots in a
    64 x 2048 serving run (targets 66/446 with a 66-token prompt in 512 slots became
    64/448, and the server failed with "all its 512 slots are live")."""
    slots = 512
    scores = torch.full((1, 1, 2, slots), torch.inf)
    scores[0, 0, 0, :66] = 0.0  # the weak head: boundary 0, no weight as a receiver
    scores[0, 0, 1, :446] = torch.linspace(1.0, 2.0, 446)  # the strong head, at the cap
    targets = torch.tensor([[[66, 446]]])
    new = boundary_targets(scores, targets, move=0.05, floor=51, max_per_head=446)
    assert int(new.max()) <= 446
    assert int(new.sum()) == int(targets.sum())
    assert bool((new >= 51).all())


@pytest.mark.parametrize("fixed_entries", [0, 64, 50])
def test_budgets_reach_new_targets_when_the_blocks_are_exactly_full(fixed_entries: int) -> None:
    """converge + fit_growth, stepped as the runtime steps them (a head keeps budget - 1
    entries between steps), reach targets that move less than a block even when the
    request's blocks are exactly full: the donor frees a block while the receiver waits.
    Found in a replay of two heads at 255/256 entries (+64 prompt, blocks of 32, 20
    blocks) whose targets 224/288 were never reached."""
    bs = 32
    fixed = torch.tensor([[[fixed_entries, fixed_entries]]])
    held = torch.tensor([[[254, 255]]])
    targets = torch.tensor([[[224, 288]]])
    capacity = _blocks(held + 1, fixed, bs)
    for _ in range(4 * bs):
        budgets = converge(held + 1, targets)
        budgets = fit_growth(budgets, held + 1, fixed, targets, block_size=bs, capacity=capacity)
        # In the next step a head holds its entries and its new token before it evicts.
        during = torch.maximum(budgets, held + 1)
        assert bool((_blocks(during, fixed, bs) <= capacity).all())
        assert int(budgets.sum()) <= int(targets.sum())
        held = budgets - 1
        if torch.equal(budgets, targets):
            break
    assert budgets.tolist() == targets.tolist()
