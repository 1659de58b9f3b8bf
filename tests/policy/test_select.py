"""The two selection paths (repeated arg-min, full sort) pick the same entries."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crystal_vllm.policy import select as sel


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), heads=st.integers(1, 8), slots=st.integers(1, 30))
def test_iterative_and_sorted_paths_agree_with_python(seed: int, heads: int, slots: int) -> None:
    g = torch.Generator().manual_seed(seed)
    primary = torch.randint(0, 4, (heads, slots), generator=g).float()  # many ties
    secondary = torch.stack([torch.randperm(slots, generator=g) for _ in range(heads)])
    cands = torch.rand(heads, slots, generator=g) < 0.7
    count = torch.randint(0, sel.FAST_PATH_MAX_EVICT + 1, (heads,), generator=g)
    count = torch.minimum(count, cands.sum(-1))  # select_lowest clamps before dispatching
    fast = sel._select_lowest_iterative(primary, secondary, cands, count, int(count.max()))
    slow = sel._select_lowest_sorted(primary, secondary, cands, count)
    for h in range(heads):
        order = sorted(
            (i for i in range(slots) if cands[h, i]),
            key=lambda i: (primary[h, i].item(), secondary[h, i].item()),
        )
        want = set(order[: int(count[h])])
        assert set(fast[h].nonzero().flatten().tolist()) == want
        assert set(slow[h].nonzero().flatten().tolist()) == want


def test_select_lowest_clamps_to_candidates() -> None:
    primary = torch.tensor([[1.0, 2.0, 3.0]])
    cands = torch.tensor([[True, False, True]])
    out = sel.select_lowest(primary, torch.arange(3).view(1, 3), cands, torch.tensor([10]))
    assert out.tolist() == [[True, False, True]]
