"""Prompt blocks shared through vLLM's prefix cache (``share_prompt_blocks``, prompt ``keep``).

A reader request starts with computed tokens: its first blocks are another request's full
prompt blocks. The oracle is dense attention over the positions each head holds, with the
K/V of every position kept aside; the shared blocks' bytes are compared directly.
"""

from __future__ import annotations

import math

import pytest
import torch
from cache_builder import build_cache

from crystal_vllm.cache import HeadBlockLayout
from crystal_vllm.policy import POLICY_NAMES, make_policy
from crystal_vllm.runtime import CompressedKVCache, StepRequest

L, H, G, D, BS = 2, 2, 2, 16, 8
SCALE = D**-0.5
PROMPT = 20  # two full blocks (16 shared tokens) and a private tail of 4
SHARED = PROMPT // BS * BS
BUDGET = 6


def _cache(policy_name: str, *, share: bool = True) -> tuple[CompressedKVCache, int]:
    params = {"prompt": "keep", **({"buffer": 4} if policy_name in ("snapkv", "rkv") else {})}
    policy = make_policy(policy_name, params)
    resident = 64 if policy_name == "full" else policy.max_resident(BUDGET) + PROMPT
    cap = math.ceil(resident / BS)
    cache = build_cache(
        policy,
        layers=L,
        kv_heads=H,
        block_size=BS,
        head_dim=D,
        cap=cap,
        num_blocks=64,
        max_rows=4,
        share_prompt_blocks=share,
    )
    return cache, cap


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [G, D]; k, v [n, D] -> [G, D] in float64."""
    probs = (q.double() @ k.double().T * SCALE).softmax(-1)
    return probs @ v.double()


class _Requests:
    """Runs steps of several requests and checks each token's attention against the
    dense oracle over the positions its head holds."""

    def __init__(self, cache: CompressedKVCache) -> None:
        self.cache = cache
        self.k: dict[str, torch.Tensor] = {}  # [positions, L, H, D]
        self.v: dict[str, torch.Tensor] = {}

    def step(self, batch: list[StepRequest], k: dict, v: dict) -> None:
        """``k[req] / v[req]``: ``[new tokens, L, H, D]``; decode tokens are checked."""
        cache = self.cache
        before = {
            r.req_id: [[cache.kept_positions(r.req_id, la, h) for h in range(H)] for la in range(L)]
            for r in batch
            if r.req_id in cache.request_ids() and r.num_new_tokens == 1
        }
        for r in batch:
            if r.num_computed_tokens == 0 or r.req_id not in self.k:
                self.k[r.req_id] = torch.empty(0, L, H, D)
                self.v[r.req_id] = torch.empty(0, L, H, D)
            self.k[r.req_id] = torch.cat([self.k[r.req_id], k[r.req_id]])
            self.v[r.req_id] = torch.cat([self.v[r.req_id], v[r.req_id]])
        cache.begin_step(batch)
        tokens = sum(r.num_new_tokens for r in batch)
        for layer in range(L):
            q = torch.randn(tokens, H * G, D)
            out = cache.attention(
                layer,
                q,
                torch.cat([k[r.req_id][:, layer] for r in batch]),
                torch.cat([v[r.req_id][:, layer] for r in batch]),
            )
            start = 0
            for r in batch:
                if r.req_id in before:
                    pos = r.num_computed_tokens
                    for h in range(H):
                        held = before[r.req_id][layer][h] + [pos]
                        expected = _dense(
                            q[start, h * G : (h + 1) * G],
                            self.k[r.req_id][held, layer, h],
                            self.v[r.req_id][held, layer, h],
                        )
                        got = out[start, h * G : (h + 1) * G].double()
                        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
                start += r.num_new_tokens
        cache.end_step()


def _fresh(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, L, H, D), torch.randn(n, L, H, D)


def _shared_head_blocks(cache: CompressedKVCache, blocks: list[int]) -> torch.Tensor:
    layers = torch.arange(L).view(-1, 1, 1)
    heads = torch.arange(H).view(1, -1, 1)
    return cache.layout.head_block_id(torch.tensor(blocks).view(1, 1, -1), layers, heads)


@pytest.mark.parametrize("same_step", [False, True], ids=["later", "same-step"])
@pytest.mark.parametrize("policy_name", POLICY_NAMES)
def test_a_reader_attends_over_the_borrowed_prompt_and_never_writes_it(
    policy_name: str, same_step: bool
) -> None:
    """A writer prefills a prompt; a reader with the same first 16 tokens borrows its two
    full blocks (prefix-cache hits) and prefills only its own 4-token tail, later or in
    the very step the writer writes them (vLLM caches blocks when it schedules them; the
    reader comes first in the batch). Both then decode at a small budget: every token
    attends exactly over what its heads hold, the reader's heads hold the whole shared
    prompt, and the shared blocks' bytes never change, through the writer's release and
    the reader's preemption and resumption too."""
    torch.manual_seed(11)
    cache, cap = _cache(policy_name)
    requests = _Requests(cache)
    writer_blocks = list(range(1, 1 + cap))
    reader_blocks = writer_blocks[:2] + list(range(30, 30 + cap - 2))
    prompt_k, prompt_v = _fresh(PROMPT)
    tail_k, tail_v = _fresh(PROMPT - SHARED)
    reader_k = torch.cat([prompt_k[:SHARED], tail_k])
    reader_v = torch.cat([prompt_v[:SHARED], tail_v])
    write = StepRequest("w", PROMPT, 0, PROMPT, writer_blocks, BUDGET)
    read = StepRequest("r", PROMPT - SHARED, SHARED, PROMPT, reader_blocks, BUDGET)
    if same_step:
        requests.step([read, write], {"r": tail_k, "w": prompt_k}, {"r": tail_v, "w": prompt_v})
    else:
        requests.step([write], {"w": prompt_k}, {"w": prompt_v})
        requests.step([read], {"r": tail_k}, {"r": tail_v})
    requests.k["r"], requests.v["r"] = reader_k, reader_v  # the reader's whole history
    shared = _shared_head_blocks(cache, writer_blocks[:2])
    snapshot = cache.kv_pool[shared].clone()
    # The shared blocks hold the prompt's first tokens in vLLM's layout.
    torch.testing.assert_close(
        snapshot[..., 0, :, :], prompt_k[:SHARED].permute(1, 2, 0, 3).reshape(L, H, 2, BS, D)
    )
    for step in range(16):
        live = ["w", "r"] if step < 8 else ["r"]  # the writer finishes first
        if step == 8:
            cache.release("w")
        if step == 11:
            # The reader is preempted, then resumed: vLLM re-prefills its prompt tail and
            # outputs after the same hits, which it borrows again.
            cache.release("r")
            history = (requests.k["r"], requests.v["r"])
            requests.k["r"], requests.v["r"] = (h[:SHARED] for h in history)
            resumed = StepRequest(
                "r", history[0].shape[0] - SHARED, SHARED, PROMPT, reader_blocks, BUDGET
            )
            requests.step([resumed], {"r": history[0][SHARED:]}, {"r": history[1][SHARED:]})
            assert torch.equal(cache.kv_pool[shared], snapshot)
        batch = [
            StepRequest(
                r,
                1,
                requests.k[r].shape[0],
                PROMPT,
                writer_blocks if r == "w" else reader_blocks,
                BUDGET,
            )
            for r in live
        ]
        new = {r: _fresh(1) for r in live}
        requests.step(
            batch, {r: kv[0] for r, kv in new.items()}, {r: kv[1] for r, kv in new.items()}
        )
        for layer in range(L):
            for h in range(H):
                assert set(range(PROMPT)) <= set(cache.kept_positions("r", layer, h))
        assert torch.equal(cache.kv_pool[shared], snapshot), f"step {step}"
    if policy_name != "full":
        assert cache.stats.evictions > 0
    cache.release("r")
    assert int(cache.tables.num_head_blocks.sum()) == 0
    assert int(cache.tables.borrowers.sum()) == 0
    cache.check_invariants()


def test_a_prompt_without_a_full_block_shares_nothing() -> None:
    """A 5-token prompt has no full block to share (or to fingerprint); it decodes."""
    cache, cap = _cache("crystal")
    requests = _Requests(cache)
    blocks = list(range(1, 1 + cap))
    k, v = _fresh(5)
    requests.step([StepRequest("s", 5, 0, 5, blocks, BUDGET)], {"s": k}, {"s": v})
    for pos in range(5, 12):
        new_k, new_v = _fresh(1)
        requests.step([StepRequest("s", 1, pos, 5, blocks, BUDGET)], {"s": new_k}, {"s": new_v})
    assert int(cache.tables.num_borrowed.sum()) == 0


def test_a_hit_without_shared_prompt_blocks_is_refused() -> None:
    cache, cap = _cache("crystal", share=False)
    blocks = list(range(1, 1 + cap))
    with pytest.raises(RuntimeError, match="not shared here"):
        cache.begin_step([StepRequest("r", 4, SHARED, PROMPT, blocks, BUDGET)])


def test_a_hit_must_be_whole_prompt_blocks() -> None:
    cache, cap = _cache("crystal")
    blocks = list(range(1, 1 + cap))
    with pytest.raises(RuntimeError, match="whole 8-token blocks"):
        cache.begin_step([StepRequest("r", 4, 12, PROMPT, blocks, BUDGET)])


@pytest.mark.parametrize("prompt", ["compress", "evict"])
def test_sharing_needs_prompt_keep(prompt: str) -> None:
    policy = make_policy("crystal", {"prompt": prompt})
    layout = HeadBlockLayout(num_blocks=8, num_layers=L, num_kv_heads=H, block_size=BS, head_dim=D)
    with pytest.raises(ValueError, match="needs prompt mode 'keep'"):
        CompressedKVCache(
            policy,
            layout,
            torch.zeros(layout.num_head_blocks, 2, BS, D),
            max_rows=2,
            max_slots=32,
            max_blocks_per_row=4,
            scale=SCALE,
            share_prompt_blocks=True,
        )
