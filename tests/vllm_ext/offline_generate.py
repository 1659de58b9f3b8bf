"""Run vLLM offline on a model and print the platform class, the generated token ids and
(in-process) the cache counters as one JSON line prefixed by ``RESULT ``.

Used by the tests as a subprocess so that each run gets a fresh vLLM (plugins and the
platform are resolved once per process). Usage:
    python offline_generate.py MODEL '{"kv_policy": "none"}' [--max-tokens N]
        [--tensor-parallel-size N] [--executor {uni,mp,ray}]
        [--shared-prefix N] [--prefix-caching {on,off}]

With ``--shared-prefix N`` every prompt starts with the same N-word text (so that
vLLM's prefix cache can share its full blocks); the result then also carries vLLM's own
prefix-cache counters (``prefix_cache``: queries and hits, in tokens).

With ``--tensor-parallel-size`` above 1 the workers are child processes (``mp``) or Ray
actors (``ray``); the result then carries each rank's cache summary under ``ranks``
(``LLM.collective_rpc("crystal_kv_summary")``), in rank order.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

#: vLLM may print log lines after ours; the result line carries this prefix.
RESULT_PREFIX = "RESULT "

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "In a hole in the ground there lived a hobbit. Not a nasty, dirty, wet hole " * 6,
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("additional_config", help="JSON object for additional_config")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="tokens per step (with chunked prefill, a prompt longer than this is chunked)",
    )
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--executor", choices=("uni", "mp", "ray"), default=None)
    parser.add_argument("--shared-prefix", type=int, default=0, metavar="WORDS")
    parser.add_argument("--prefix-caching", choices=("on", "off"), default=None)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument(
        "--num-blocks", type=int, default=None, help="KV blocks (small: vLLM preempts)"
    )
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    llm = LLM(
        model=args.model,
        enforce_eager=True,
        max_model_len=args.max_model_len,
        seed=0,
        dtype=args.dtype,
        block_size=args.block_size,
        max_num_batched_tokens=args.max_num_batched_tokens,
        # vLLM needs max_num_seqs <= max_num_batched_tokens; four prompts run here.
        max_num_seqs=min(16, args.max_num_batched_tokens or 16),
        enable_chunked_prefill=args.max_num_batched_tokens is not None or None,
        tensor_parallel_size=args.tensor_parallel_size,
        distributed_executor_backend=args.executor
        or ("uni" if args.tensor_parallel_size == 1 else "mp"),
        additional_config=json.loads(args.additional_config),
        enable_prefix_caching=None if args.prefix_caching is None else args.prefix_caching == "on",
        disable_log_stats=not args.shared_prefix,
        num_gpu_blocks_override=args.num_blocks,
    )
    # With a shared prefix, the chosen tokens' log-probs too: the random tiny model often
    # repeats one token, and log-probs still show a wrong attention there.
    params = SamplingParams(
        temperature=0.0,
        max_tokens=args.max_tokens,
        ignore_eos=True,
        logprobs=0 if args.shared_prefix else None,
    )
    # Varied words: a repetitive prefix sends the random tiny model into one token.
    prefix = " ".join(str(i * 7919 % 1009) for i in range(args.shared_prefix))
    prompts = [prefix + " " + prompt for prompt in PROMPTS] if prefix else PROMPTS
    if prefix:
        # The first request fills the prefix cache; the others may then hit it.
        outputs = llm.generate(prompts[:1], params, use_tqdm=False)
        outputs += llm.generate(prompts[1:], params, use_tqdm=False)
    else:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    from vllm.platforms import current_platform

    tokens = [list(out.outputs[0].token_ids) for out in outputs]
    result = {"platform": type(current_platform).__name__, "tokens": tokens}
    if prefix:
        result["logprobs"] = [
            [
                entry[token].logprob
                for entry, token in zip(out.outputs[0].logprobs, tokens_, strict=True)
            ]
            for out, tokens_ in zip(outputs, tokens, strict=True)
        ]
        counters = {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")}
        result["prefix_cache"] = {
            "queries": counters.get("vllm:prefix_cache_queries", 0),
            "hits": counters.get("vllm:prefix_cache_hits", 0),
        }
        result["preemptions"] = counters.get("vllm:num_preemptions", 0)
    runner = _in_process_runner(llm)
    if getattr(runner, "crystal_cache", None) is not None:
        result["stats"] = dataclasses.asdict(runner.crystal_cache.stats)
        result["head_blocks_in_use"] = int(runner.crystal_cache.tables.num_head_blocks.sum())
    pool = _in_process_block_pool(llm)
    if pool is not None:  # every request has finished: all blocks must be free again
        result["free_blocks"] = pool.get_num_free_blocks()
        result["usable_blocks"] = pool.num_gpu_blocks - 1  # vLLM keeps one null block
    if json.loads(args.additional_config).get("kv_policy", "none") != "none":
        result["ranks"] = llm.collective_rpc("crystal_kv_summary")
    print(RESULT_PREFIX + json.dumps(result))


def _in_process_block_pool(llm):
    """The scheduler's block pool, when the engine runs in this process (else None)."""
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)
    scheduler = getattr(core, "scheduler", None)
    return None if scheduler is None else scheduler.kv_cache_manager.block_pool


def _in_process_runner(llm):
    """The model runner, when the engine runs in this process (else None)."""
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)
    worker = getattr(getattr(core, "model_executor", None), "driver_worker", None)
    if worker is None:
        return None
    return worker.worker.model_runner


if __name__ == "__main__":
    main()
