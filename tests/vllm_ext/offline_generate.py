"""Run vLLM offline on a model and print the platform class, the generated token ids and
(in-process) the cache counters as one JSON line prefixed by ``RESULT ``.

Used by the tests as a subprocess so that each run gets a fresh vLLM (plugins and the
platform are resolved once per process). Usage:
    python offline_generate.py MODEL '{"kv_policy": "none"}' [--max-tokens N]
        [--tensor-parallel-size N] [--executor {uni,mp,ray}]

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
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    llm = LLM(
        model=args.model,
        enforce_eager=True,
        max_model_len=1024,
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
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    from vllm.platforms import current_platform

    tokens = [list(out.outputs[0].token_ids) for out in outputs]
    result = {"platform": type(current_platform).__name__, "tokens": tokens}
    runner = _in_process_runner(llm)
    if getattr(runner, "crystal_cache", None) is not None:
        result["stats"] = dataclasses.asdict(runner.crystal_cache.stats)
    if json.loads(args.additional_config).get("kv_policy", "none") != "none":
        result["ranks"] = llm.collective_rpc("crystal_kv_summary")
    print(RESULT_PREFIX + json.dumps(result))


def _in_process_runner(llm):
    """The model runner, when the engine runs in this process (else None)."""
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)
    worker = getattr(getattr(core, "model_executor", None), "driver_worker", None)
    if worker is None:
        return None
    return worker.worker.model_runner


if __name__ == "__main__":
    main()
