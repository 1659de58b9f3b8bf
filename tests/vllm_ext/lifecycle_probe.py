"""Drive an in-process engine through many requests, aborts and preemptions; print JSON.

Checks each step that no request holds more vLLM blocks than its cap, and reports the
free blocks and the runtime's leftover rows at the end. Used by test_lifecycle.py and
test_tensor_parallel.py.
    python lifecycle_probe.py MODEL POLICY BUDGET NUM_REQUESTS NUM_BLOCKS [PROMPT_MODE [TP]]

With TP > 1 the workers are child processes: every rank's runtime is read through
``collective_rpc``, and each rank's adaptive budget targets are checked every step
against the request's share on that rank (``budget`` x layers x the rank's KV heads).
"""

from __future__ import annotations

import json
import random
import sys


def main() -> None:
    model, policy, budget, num_requests, num_blocks = sys.argv[1:6]
    prompt_mode = sys.argv[6] if len(sys.argv) > 6 else "compress"
    tp = int(sys.argv[7]) if len(sys.argv) > 7 else 1
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=model,
        enforce_eager=True,
        max_model_len=512,
        block_size=32,
        num_gpu_blocks_override=int(num_blocks),
        max_num_seqs=16,
        tensor_parallel_size=tp,
        distributed_executor_backend="uni" if tp == 1 else "mp",
        seed=0,
        additional_config={
            "kv_policy": policy,
            "kv_budget": int(budget),
            "kv_policy_config": {"debug_checks": True, "prompt": prompt_mode, "prompt_budget": 64}
            | ({"realloc_interval": 8} if policy == "crystal" and tp > 1 else {}),
        },
    )
    engine = llm.llm_engine
    core = engine.engine_core.engine_core
    scheduler = core.scheduler
    (manager,) = scheduler.kv_cache_manager.coordinator.single_type_managers
    rng = random.Random(0)
    pending = list(range(int(num_requests)))
    live: set[str] = set()
    max_over_cap = 0
    aborted = 0
    preempted: set[str] = set()
    budgets: dict[str, int] = {}
    share_checks = 0
    while pending or engine.has_unfinished_requests():
        while pending and len(live) < 24:
            i = pending.pop()
            prompt = [rng.randrange(10, 1000) for _ in range(rng.randrange(1, 300))]
            extra = {"kv_budget": rng.randrange(8, int(budget) + 1)} if i % 3 == 0 else None
            budgets[str(i)] = extra["kv_budget"] if extra else int(budget)
            params = SamplingParams(
                temperature=0.0,
                max_tokens=rng.randrange(1, 120),
                ignore_eos=True,
                extra_args=extra,
            )
            engine.add_request(str(i), TokensPrompt(prompt_token_ids=prompt), params)
            live.add(str(i))
        outputs = engine.step()
        for out in outputs:
            if out.finished:
                live.discard(out.request_id)
        if live and rng.random() < 0.05:
            victim = rng.choice(sorted(live))
            engine.abort_request([victim])
            live.discard(victim)
            aborted += 1
        preempted.update(r.request_id for r in scheduler.requests.values() if r.num_preemptions)
        for req_id, blocks in manager.req_to_blocks.items():
            cap = manager.resident_tokens(req_id, 10**9) // manager.block_size
            max_over_cap = max(max_over_cap, len(blocks) - cap)
        if tp > 1 and policy == "crystal":
            for rank_targets in llm.collective_rpc(_target_sums):
                for internal, (total, heads) in rank_targets.items():
                    expected = budgets[internal.rsplit("-", 1)[0]] * heads
                    assert total == expected, (internal, total, expected)
                    share_checks += 1
    # The worker hears of finished and aborted requests with the next step: run one more
    # short request so that every earlier one has been released; only its row may remain.
    engine.add_request("flush", TokensPrompt(prompt_token_ids=[11]), SamplingParams(max_tokens=2))
    while engine.has_unfinished_requests():
        engine.step()
    pool = scheduler.kv_cache_manager.block_pool
    ranks = llm.collective_rpc(_runtime_report)
    print(
        json.dumps(
            {
                "free_blocks": pool.get_num_free_blocks(),
                "total_blocks": pool.num_gpu_blocks,
                "max_over_cap": max_over_cap,
                "aborted": aborted,
                "preempted_requests": len(preempted),
                "share_checks": share_checks,
                # Rank 0's runtime as before; every rank's under "ranks".
                **ranks[0],
                "ranks": ranks,
            }
        )
    )


def _runtime_report(worker) -> dict:
    """One rank's leftover rows, head-blocks held by them and evictions."""
    cache = worker.model_runner.crystal_cache
    others = [r for r in cache.request_ids() if not r.startswith("flush")]
    return {
        "runtime_rows_left": sorted(r.rsplit("-", 1)[0] for r in cache.request_ids()),
        "head_blocks_held_by_others": int(
            sum(int(cache.tables.num_head_blocks[row].sum()) for row in cache.rows_of(others))
        ),
        "evictions": cache.stats.evictions,
    }


def _target_sums(worker) -> dict[str, tuple[int, int]]:
    """Per running request: the sum of its heads' budget targets on this rank, and the
    rank's (layer, KV head) count."""
    cache = worker.model_runner.crystal_cache
    heads = cache.layout.num_layers * cache.layout.num_kv_heads
    return {
        req_id: (int(cache.targets[row].sum()), heads)
        for req_id in cache.request_ids()
        for row in cache.rows_of([req_id])
    }


if __name__ == "__main__":
    main()
