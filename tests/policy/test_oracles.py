"""Each policy's ranking against a slow, obvious per-head Python implementation.

The vectorised policy and the oracle see the same inserts and attention (dyadic values, so
sums are exact and ties are frequent) and must pick the same victims at every step.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_topp import oracle_top_p

from crystal_vllm.policy import make_policy
from crystal_vllm.policy.windowed import redundancy

LAYERS, HEADS, GROUP, DIM = 2, 2, 2, 4


class Head:
    """One (layer, head) of one request: a dict slot -> entry."""

    def __init__(self, policy: str, params: dict) -> None:
        self.policy, self.params = policy, params
        self.entries: dict[int, dict] = {}

    # -- inputs
    def insert(self, slot: int, pos: int, t: int, prefill: bool, key: list[float]) -> None:
        self.entries[slot] = {
            "pos": pos,
            "born": t,
            "prompt": prefill,
            "hits": [] if prefill else [t],
            "acc": 0.0,
            "ring": {},
            "key": key,
        }

    def observe(self, p: list[float], t: int, budget: int) -> None:
        if self.policy in ("crystal", "crystal-lite", "lru"):
            if not self.params.get("hits_before_full", True) and len(self._counted()) < budget:
                return
            slots = range(len(p))
            pos = [self.entries[s]["pos"] if s in self.entries else -1 for s in slots]
            valid = [s in self.entries for s in slots]
            for s in oracle_top_p(p, pos, valid, self.params.get("top_p", 0.9)):
                if t not in self.entries[s]["hits"]:
                    self.entries[s]["hits"].append(t)
        for s, e in self.entries.items():
            e["acc"] += p[s]
            e["ring"][t % self.params.get("window", 1)] = p[s]

    def remove(self, slots: set[int]) -> None:
        for s in slots:
            del self.entries[s]

    # -- selection
    def _counted(self) -> list[int]:
        protect = self.params.get("prompt", "compress") != "evict"
        return [s for s, e in self.entries.items() if not (protect and e["prompt"])]

    def _visible(self) -> dict[int, dict]:
        """The entries the policy chooses among: protected prompt entries are hidden."""
        return {s: self.entries[s] for s in self._counted()}

    def select(self, budget: int, t: int) -> set[int] | None:
        """Victims, or None when the decision hinges on a float near-tie (rkv only)."""
        counted = self._counted()
        # Never evicted: born at t, or (LRFU's recent window, at most the budget, at least
        # 1) a decode entry born in the last `recent_window` steps.
        window = max(1, min(self.params.get("recent_window", 1), budget))
        born = [
            s
            for s in counted
            if self.entries[s]["born"] == t
            or (not self.entries[s]["prompt"] and self.entries[s]["born"] > t - window)
        ]
        cands = [s for s in counted if s not in born]
        excess = len(counted) - max(budget, len(born))
        cadence = self.policy in ("snapkv", "rkv")
        if cadence and len(counted) < budget + self.params["buffer"]:
            return set()
        if excess <= 0:
            return set()
        if self.policy in ("crystal", "crystal-lite", "lru"):
            # A head over its budget evicts in a burst, down to budget - interval + 1.
            burst = max(budget - self.params.get("evict_interval", 1) + 1, 0)
            excess = len(counted) - max(burst, len(born))
        order = sorted(cands, key=self._key(budget, t))
        if self.policy == "rkv":
            keys = [self._key(budget, t)(s) for s in order]
            if excess < len(keys) and abs(keys[excess - 1][1] - keys[excess][1]) < 1e-5:
                return None
        if self.policy in ("crystal", "crystal-lite", "lru") and excess < len(order):
            # float32 CRF (decayed lazily) cannot order two scores closer than its rounding:
            # exact ties are decided by the tie-breaks, near-ties are undecidable here.
            last, first_kept = (self._key(budget, t)(s)[0] for s in order[excess - 1 : excess + 1])
            if last != first_kept and abs(last - first_kept) <= 2**-20 * max(last, first_kept):
                return None
        return set(order[:excess])

    def _key(self, budget: int, t: int):
        e = self._visible()
        if self.policy in ("crystal", "crystal-lite", "lru"):
            lam = Fraction(self.params.get("lam", 0.0 if self.policy == "lru" else 0.6))

            def lrfu(s):
                crf = sum((lam ** (t - tj) for tj in e[s]["hits"]), Fraction(0))
                return (crf, max(e[s]["hits"], default=0), e[s]["pos"])

            return lrfu
        by_pos = sorted(e, key=lambda s: e[s]["pos"])
        if self.policy == "streaming":
            sinks = set(by_pos[: self.params.get("sinks", 4)])
            return lambda s: (1, -e[s]["pos"]) if s in sinks else (0, e[s]["pos"])
        if self.policy == "h2o":
            recent = set(by_pos[::-1][: budget // 2])
            return lambda s: (1, 0.0, e[s]["pos"]) if s in recent else (0, e[s]["acc"], e[s]["pos"])
        # snapkv / rkv
        newest = by_pos[::-1]
        window = set(newest[: min(self.params["window"], budget)])
        w = self.params["window"]
        attn = [sum(e[s]["ring"].values()) / w for s in newest]
        half = self.params["kernel"] // 2
        pooled = {s: max(attn[max(0, i - half) : i + half + 1]) for i, s in enumerate(newest)}
        if self.policy == "rkv":
            red = self._redundancy()
            wi = self.params.get("importance_weight", 0.1)
            score = {s: wi * pooled[s] - (1 - wi) * red[s] for s in e}
        else:
            score = pooled
        return lambda s: (1, 0.0, e[s]["pos"]) if s in window else (0, score[s], e[s]["pos"])

    def _redundancy(self) -> dict[int, float]:
        e = self._visible()
        thr = self.params.get("similarity_threshold", 0.5)
        slots = list(e)

        def cos(a, b):
            ka, kb = e[a]["key"], e[b]["key"]
            na = max(math.sqrt(sum(x * x for x in ka)), 1e-8)
            nb = max(math.sqrt(sum(x * x for x in kb)), 1e-8)
            return sum(x * y for x, y in zip(ka, kb, strict=True)) / (na * nb)

        mean = {}
        for i in slots:
            row = {j: cos(i, j) for j in slots if j != i}
            similar = [j for j, v in row.items() if v > thr]
            if similar:
                row[max(similar, key=lambda j: e[j]["pos"])] = 0.0
            mean[i] = sum(row.values()) / len(slots)
        z = sum(math.exp(v) for v in mean.values())
        return {i: math.exp(v) / z for i, v in mean.items()}


def _dyadic_probs(g: torch.Generator, valid: torch.Tensor) -> torch.Tensor:
    p = torch.randint(0, 9, (1, LAYERS, HEADS * GROUP, valid.shape[-1]), generator=g).float() / 64
    return torch.where(valid.repeat_interleave(GROUP, dim=2), p, 0.0)


def run_lockstep(name: str, params: dict, seed: int, steps: int = 14) -> int:
    """Drive policy and oracle together; returns how many entries were evicted."""
    policy = make_policy(name, params)
    g = torch.Generator().manual_seed(seed)
    budgets = torch.randint(1, 5, (1, LAYERS, HEADS), generator=g)
    slots = int(budgets.max()) + params.get("buffer", 1) + 8
    state = policy.init_state(1, LAYERS, HEADS, slots)
    rows = torch.tensor([0])
    keys = torch.zeros(1, LAYERS, HEADS, slots, DIM)
    heads = [[Head(name, params) for _ in range(HEADS)] for _ in range(LAYERS)]
    evicted = 0

    def write(new: torch.Tensor, positions: torch.Tensor, prefill: bool) -> None:
        policy.insert(state, rows, new, positions, prefill=prefill)
        fresh = torch.randn(keys.shape, generator=g)
        keys.copy_(torch.where(new.unsqueeze(-1), fresh, keys))
        t = int(state.step[0])
        for li, hi, s in new[0].nonzero().tolist():
            heads[li][hi].insert(
                s, int(positions[0, li, hi, s]), t, prefill, keys[0, li, hi, s].tolist()
            )

    def observe() -> None:
        probs = _dyadic_probs(g, state.valid)
        policy.observe(state, rows, probs, budgets=budgets)
        reduced = probs.view(1, LAYERS, HEADS, GROUP, slots).mean(3)
        t = int(state.step[0])
        for li in range(LAYERS):
            for hi in range(HEADS):
                heads[li][hi].observe(reduced[0, li, hi].tolist(), t, int(budgets[0, li, hi]))

    def select() -> None:
        nonlocal evicted
        evict = policy.select_evictions(state, rows, budgets, keys if policy.needs_keys else None)
        t = int(state.step[0])
        for li in range(LAYERS):
            for hi in range(HEADS):
                want = heads[li][hi].select(int(budgets[0, li, hi]), t)
                got = set(evict[0, li, hi].nonzero().flatten().tolist())
                if want is not None:
                    assert got == want, (li, hi, t)
                heads[li][hi].remove(got)
        evicted += int(evict.sum())
        policy.remove(state, rows, evict)

    prompt = int(torch.randint(1, 8, (1,), generator=g))
    new = (torch.arange(slots) < prompt).expand(1, LAYERS, HEADS, slots).clone()
    write(new, torch.arange(slots).expand_as(new).clone(), prefill=True)
    for _ in range(max(policy.obs_window, 1)):
        policy.begin_step(state, rows)
        observe()
    select()
    for i in range(steps):
        policy.begin_step(state, rows)
        slot = (~state.valid).to(torch.int8).argmax(-1, keepdim=True)
        new = torch.zeros_like(state.valid).scatter_(-1, slot, True)
        write(new, torch.full_like(state.position, prompt + i), prefill=False)
        observe()
        select()
    return evicted


CASES = [
    ("crystal", {"lam": 0.5, "top_p": 0.75, "obs_window": 2}),
    ("crystal", {"lam": 1.0, "top_p": 0.5, "obs_window": 3}),
    ("crystal", {"lam": 0.5, "top_p": 0.75, "prompt": "evict", "obs_window": 1}),
    ("crystal", {"lam": 0.5, "top_p": 0.75, "hits_before_full": False, "obs_window": 2}),
    ("crystal", {"lam": 0.5, "top_p": 0.75, "recent_window": 2, "obs_window": 1}),
    ("crystal", {"top_p": 0.75, "recent_window": 3, "prompt": "evict", "obs_window": 2}),
    ("crystal-lite", {"lam": 0.25, "top_p": 0.875, "obs_window": 2}),
    ("crystal-lite", {"lam": 1.0, "top_p": 0.875, "recent_window": 9, "obs_window": 1}),
    ("crystal-lite", {"lam": 0.5, "top_p": 0.75, "evict_interval": 3, "obs_window": 1}),
    ("crystal", {"top_p": 0.75, "evict_interval": 2, "recent_window": 2, "obs_window": 2}),
    ("lru", {"top_p": 0.5, "obs_window": 2}),
    ("streaming", {"sinks": 2}),
    ("streaming", {"sinks": 0}),
    ("h2o", {"obs_window": 2}),
    ("snapkv", {"buffer": 3, "window": 2, "kernel": 3}),
    ("snapkv", {"buffer": 2, "window": 3, "kernel": 1}),
    ("rkv", {"buffer": 3, "window": 2, "kernel": 3}),
    ("rkv", {"buffer": 2, "window": 2, "kernel": 5, "importance_weight": 0.5}),
]
# The default prompt mode (compress) protects the prompt; every policy also runs with evict.
CASES += [
    (name, {**params, "prompt": "evict"})
    for name, params in CASES
    if "prompt" not in params and name != "crystal"
]


@pytest.mark.parametrize(
    ("name", "params"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)]
)
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**31))
def test_policy_matches_python_oracle(name: str, params: dict, seed: int) -> None:
    run_lockstep(name, params, seed)


def test_lockstep_evicts() -> None:
    """The oracle comparison is not vacuous: every case evicts something."""
    for name, params in CASES:
        assert run_lockstep(name, params, 1) > 0, name


def test_redundancy_matches_python() -> None:
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(3, 9, DIM, generator=g)
    keys[0, 4] = keys[0, 1] * 2  # an exact duplicate direction
    valid = torch.rand(3, 9, generator=g) < 0.8
    valid[:, 0] = True
    position = torch.randperm(9, generator=g).expand(3, 9)
    got = redundancy(keys, valid, position, 0.5)
    for n in range(3):
        head = Head("rkv", {})
        for s in valid[n].nonzero().flatten().tolist():
            head.insert(s, int(position[n, s]), 0, False, keys[n, s].tolist())
        want = head._redundancy()
        for s, v in want.items():
            assert got[n, s].item() == pytest.approx(v, rel=1e-4, abs=1e-6)
        assert (got[n][~valid[n]] == 0).all()
