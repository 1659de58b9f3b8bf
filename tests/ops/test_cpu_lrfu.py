"""The fused C++ LRFU decode step (``cpu.lrfu_decode``) against the reference.

The reference is the policy's generic step (``KVPolicy.decode_layer``): the policy
library's own insert / observe / select / remove around the reference attention, on the
torch ops. Both sides run the same random multi-step scenario (rows scheduled in random
subsets and orders, per-head budgets that change, heads that fill, evict and hold
unassigned table entries) and must agree after every layer step:

* ``out``: float32 attention from the same inputs, so ``|cpu - ref| <= 1e-5 * max|ref|``
  per row (the bound of test_cpu_kernels.py);
* the state: ``valid``, ``position``, ``born``, ``tau``, ``prompt`` exactly and ``crf`` to
  float32 rounding, and the eviction counts exactly. The two sides' probabilities differ
  by about an ulp, so a victim choice may differ only between two candidates whose
  decayed scores are equal to 1e-6 relative; any other difference fails the test.

The per-slot passes of the LRFU update have an AVX2 and a baseline version (chosen with
the kernel ISA); the ``isa`` tests run both.
"""

from __future__ import annotations

import pytest
import torch

from crystal_vllm import ops
from crystal_vllm.ops import DecodeLayer
from crystal_vllm.policy import KVPolicy, make_policy

try:
    from crystal_vllm.ops import cpu
except ImportError as exc:
    pytest.skip(f"the C++ extension is not built: {exc}", allow_module_level=True)

R, L, BS = 5, 2, 4
_ISAS = ("avx2", "scalar")  # the LRFU passes: AVX2 (also under avx512) or baseline


@pytest.fixture(autouse=True)
def _torch_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """The generic step (the reference) runs on the torch ops, not on the C++ ones."""
    monkeypatch.setenv(ops.ENV_VAR, "torch")


@pytest.fixture(params=_ISAS)
def isa(request: pytest.FixtureRequest):
    """Run the test once per version of the LRFU passes this CPU can execute."""
    try:
        previous = cpu.set_cpu_isa(request.param)
    except ValueError:
        pytest.skip(f"this CPU cannot run the {request.param} kernels")
    yield request.param
    cpu.set_cpu_isa(previous)


class Scenario:
    """Random tables over a pool and a driver that schedules decode steps."""

    def __init__(self, policy, h, g, d, max_blocks, dtype, seed, same_keys=False, prompt=0):
        self.gen = torch.Generator().manual_seed(seed)
        self.policy, self.h, self.g, self.d = policy, h, g, d
        self.same_keys = same_keys
        self.max_blocks = max_blocks
        self.num_slots = max_blocks * BS
        ids = torch.randperm(R * L * h * max_blocks, generator=self.gen).view(R, L, h, -1)
        assigned = torch.randint(1, max_blocks + 1, (R, L, h, 1), generator=self.gen)
        column = torch.arange(max_blocks).view(1, 1, 1, -1)
        self.tables = torch.where(column < assigned, ids, -1).to(torch.int32)
        self.pool = torch.randn(R * L * h * max_blocks, 2, BS, d, generator=self.gen).to(dtype)
        self.state = policy.init_state(R, L, h, self.num_slots)
        self.next_position = torch.zeros(R, dtype=torch.long)
        if prompt:  # prompt entries in the lowest slots of every head (a prefill)
            new = torch.zeros(R, L, h, self.num_slots, dtype=torch.bool)
            new[..., :prompt] = True
            positions = torch.arange(self.num_slots).expand(R, L, h, -1)
            policy.insert(self.state, torch.arange(R), new, positions, prefill=True)
            self.next_position += prompt

    def capacity(self, rows, layer):
        return (self.tables[rows, layer] >= 0).sum(-1) * BS  # [b, H]

    def step_inputs(self, layer, rows):
        """Slots (lowest free assigned slot), budgets and q/k/v for one layer step."""
        b, h, d = rows.numel(), self.h, self.d
        valid = self.state.valid[rows, layer]  # [b, H, S]
        assigned = (self.tables[rows, layer] >= 0).repeat_interleave(BS, dim=-1)
        free = assigned & ~valid
        slots = torch.where(free.any(-1), free.float().argmax(-1), -1)
        cap = self.capacity(rows, layer)
        budgets = torch.randint(0, 1 << 30, (b, h), generator=self.gen) % (cap - 1).clamp_min(1)
        budgets = budgets.clamp_min(1)
        query = torch.randn(b, h * self.g, d, generator=self.gen) * 2
        key = torch.randn(b, h, d, generator=self.gen)
        if self.same_keys:
            key = torch.ones(b, h, d)
        value = torch.randn(b, h, d, generator=self.gen)
        return slots, budgets, query, key, value

    def clone_state(self):
        return type(self.state)(**{k: v.clone() for k, v in vars(self.state).items()})


def _decayed(policy, state, row, layer, head, slot):
    t = state.step[row]
    age = (t - state.tau[row, layer, head, slot]).float()
    return float(state.crf[row, layer, head, slot] * torch.pow(policy.config.step_decay, age))


def _check_same(policy, ref, got, rows, layer, ref_evicted, got_evicted) -> int:
    """Assert the states agree up to near-tie victim swaps; returns how many swaps."""
    swaps = 0
    for i, row in enumerate(rows.tolist()):
        for head in range(ref.valid.shape[2]):
            rv, gv = ref.valid[row, layer, head], got.valid[row, layer, head]
            if torch.equal(rv, gv):
                continue
            only_ref = (rv & ~gv).nonzero().flatten().tolist()  # evicted by cpu only
            only_got = (gv & ~rv).nonzero().flatten().tolist()  # evicted by ref only
            assert len(only_ref) == len(only_got), "different numbers of evictions"
            for a, c in zip(only_ref, only_got, strict=True):
                sa = _decayed(policy, ref, row, layer, head, a)
                sc = _decayed(policy, got, row, layer, head, c)
                assert abs(sa - sc) <= 1e-6 * max(abs(sa), abs(sc), 1e-30), (
                    f"row {row} head {head}: victims differ beyond a near-tie ({sa} vs {sc})"
                )
            swaps += 1
            for name in ref.entry_fields():  # resynchronise that head
                getattr(got, name)[row, layer, head] = getattr(ref, name)[row, layer, head]
        assert torch.equal(ref_evicted[i], got_evicted[i])
    for name in ("valid", "position", "born", "tau", "prompt"):
        assert torch.equal(getattr(ref, name), getattr(got, name)), name
    torch.testing.assert_close(got.crf, ref.crf, rtol=1e-6, atol=0)
    return swaps


def _run(policy_name, params, h, g, d, dtype, seed, steps=24, prompt=0, first_step=0, **kw):
    """``kw``: Scenario options (``same_keys``, ``max_blocks``, default 4)."""
    policy = make_policy(policy_name, params)
    kw.setdefault("max_blocks", 4)
    sc = Scenario(policy, h, g, d, dtype=dtype, seed=seed, prompt=prompt, **kw)
    if first_step:  # the prompt entries keep tau = 0: their age is first_step
        sc.state.step += first_step
        held = sc.state.valid
        sc.state.crf[held] = torch.rand(int(held.sum()), generator=sc.gen) + 0.5
    got_state = sc.clone_state()
    got_pool = sc.pool.clone()
    swaps = evictions = 0
    for _ in range(steps):
        n = int(torch.randint(1, R + 1, (1,), generator=sc.gen))
        rows = torch.randperm(R, generator=sc.gen)[:n]
        policy.begin_step(sc.state, rows)
        policy.begin_step(got_state, rows)
        positions = sc.next_position[rows].clone()
        sc.next_position[rows] += 1
        for layer in range(L):
            slots, budgets, query, key, value = sc.step_inputs(layer, rows)
            args = (layer, rows, slots, positions, budgets, query, key, value)
            ref_out, ref_ev = KVPolicy.decode_layer(
                policy, sc.state, DecodeLayer(*args, sc.pool, sc.tables, d**-0.5)
            )
            got_out, got_ev = cpu.lrfu_decode(
                DecodeLayer(*args, got_pool, sc.tables, d**-0.5),
                got_state,
                **policy.kernel_params(),
            )
            assert got_out.dtype == ref_out.dtype and got_ev.dtype == torch.int32
            err = (got_out.float() - ref_out.float()).abs().amax(-1)
            bound = 1e-5 * ref_out.float().abs().amax(-1) + 1e-7
            assert bool((err <= bound).all()), float((err - bound).max())
            swaps += _check_same(policy, sc.state, got_state, rows, layer, ref_ev, got_ev)
            evictions += int(ref_ev.sum())
            assert torch.equal(sc.pool, got_pool)
    assert evictions > 0, "the scenario never evicted: it tests nothing"
    return swaps


@pytest.mark.parametrize("policy_name", ["crystal-lite", "lru", "crystal"])
@pytest.mark.parametrize(
    ("h", "g", "d"), [(2, 1, 64), (2, 2, 128), (2, 3, 64), (1, 4, 64), (1, 7, 128), (2, 2, 24)]
)
def test_matches_reference_over_random_steps(policy_name, h, g, d):
    swaps = _run(policy_name, {}, h, g, d, torch.float32, seed=h * 100 + g * 10 + d)
    assert swaps <= 2  # near-ties are rare on continuous random inputs


@pytest.mark.parametrize(
    "params",
    [
        {"top_p": 1.0},
        {"top_p": 0.5, "lam": 0.5},
        {"top_p": 0.99, "lam": 1.0},
        {"gqa_reduce": "max"},
        {"lam": 0.6, "time_unit": 16},  # the kernel gets the per-step decay lam ** (1/16)
        {"recent_window": 3},  # often wider than a random budget: clamped to it
        {"recent_window": 2, "lam": 1.0},
    ],
)
def test_parameters_match_reference(params):
    assert _run("crystal-lite", params, 2, 2, 16, torch.float32, seed=7) <= 2


@pytest.mark.parametrize("mode", ["keep", "evict"])
def test_recent_window_with_prompt_entries_matches_reference(isa, mode):
    """The window covers decode entries only: prompt entries (born at step 0, inside the
    window for the first steps) stay evictable under ``evict``."""
    params = {"prompt": mode, "recent_window": 6}
    swaps = _run("crystal", params, 2, 2, 16, torch.float32, seed=13, prompt=3, max_blocks=8)
    assert swaps <= 2


@pytest.mark.parametrize("mode", ["keep", "evict"])
def test_prompt_entries_match_reference(mode):
    """Prompt entries (held from the start) are protected or ordinary, as the mode says."""
    assert _run("crystal-lite", {"prompt": mode}, 2, 2, 16, torch.float32, seed=5, prompt=3) <= 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_pools_match_reference(dtype):
    assert _run("crystal-lite", {}, 2, 2, 32, dtype, seed=3) <= 2


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"top_p": 1.0},
        {"top_p": 0.5, "gqa_reduce": "max"},
        {"prompt": "keep"},
        {"recent_window": 7},
    ],
)
def test_every_isa_matches_reference_on_wide_heads(isa, params):
    """Heads of up to 96 slots: the vector bodies of the passes, their scalar tails, holes
    and the unused tail of the last head-block."""
    prompt = 3 if "prompt" in params else 0
    swaps = _run(
        "crystal-lite", params, 2, 3, 16, torch.float32, seed=21, prompt=prompt, max_blocks=24
    )
    assert swaps <= 2


def test_ages_beyond_the_decay_table(isa):
    """Past 2^16 steps, lam^age is no longer tabulated: the prompt entries (tau = 0) take
    powf, next to entries whose age is in the table."""
    params = {"lam": 0.6, "time_unit": 10_000, "prompt": "evict"}  # lam^70000 ~ 0.03
    swaps = _run(
        "crystal-lite", params, 2, 2, 16, torch.float32, seed=9, prompt=3, first_step=70_000
    )
    assert swaps <= 2


def test_exact_ties_follow_the_tie_rules(isa):
    """Identical keys make every probability equal: hits go to the latest positions and
    victims are chosen by (score, tau, position) alone; no tolerance is granted."""
    assert (
        _run("crystal-lite", {"top_p": 0.5}, 2, 2, 16, torch.float32, seed=11, same_keys=True) == 0
    )
    assert _run("lru", {"top_p": 1.0}, 2, 1, 16, torch.float32, seed=12, same_keys=True) == 0


def test_unserved_configurations_run_the_generic_step(monkeypatch):
    """The kernels do not implement hits-once-full: such policies run the generic step,
    and the kernel refuses pools it does not take."""
    monkeypatch.setenv("CRYSTAL_VLLM_OPS", "cpu")
    assert make_policy("crystal-lite", {"hits_before_full": False}).kernel_params() is None
    assert make_policy("crystal-lite", {"prompt": "keep"}).kernel_params()["protect_prompt"]
    assert not make_policy("crystal-lite", {"prompt": "evict"}).kernel_params()["protect_prompt"]
    sc = Scenario(make_policy("crystal-lite"), 1, 1, 16, max_blocks=2, dtype=torch.float32, seed=0)
    assert ops.fused_lrfu_decode(sc.pool) is cpu.lrfu_decode
    strided = sc.pool.transpose(2, 3)
    assert ops.fused_lrfu_decode(strided) is None
    slots, budgets, query, key, value = sc.step_inputs(0, torch.tensor([0]))
    step = DecodeLayer(
        0,
        torch.tensor([0]),
        slots,
        torch.zeros(1, dtype=torch.long),
        budgets,
        query,
        key,
        value,
        strided,
        sc.tables,
        0.25,
    )
    with pytest.raises(ValueError, match="C\\+\\+ kernel takes a CPU pool"):
        cpu.lrfu_decode(
            step, sc.state, lam=0.5, top_p=0.9, gqa_max=False, protect_prompt=False, recent_window=1
        )


def test_bad_rows_are_rejected_before_any_write():
    policy = make_policy("crystal-lite")
    sc = Scenario(policy, 2, 1, 16, max_blocks=2, dtype=torch.float32, seed=0)
    rows = torch.tensor([1, 1])
    policy.begin_step(sc.state, torch.tensor([1]))
    slots, budgets, query, key, value = sc.step_inputs(0, torch.tensor([1, 2]))
    before = sc.clone_state()
    step = DecodeLayer(
        0,
        rows,
        slots,
        torch.zeros(2, dtype=torch.long),
        budgets,
        query,
        key,
        value,
        sc.pool,
        sc.tables,
        0.25,
    )
    with pytest.raises(ValueError, match="row 1 appears twice"):
        cpu.lrfu_decode(step, sc.state, **policy.kernel_params())
    for name in before.entry_fields():
        assert torch.equal(getattr(before, name), getattr(sc.state, name))
