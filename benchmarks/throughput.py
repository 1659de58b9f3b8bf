"""Throughput at fixed KV memory: vanilla vLLM vs KV policies, side by side in one run.

Each (policy, budget) case runs in a fresh subprocess with an in-process engine, the
same model, the same fixed KV memory, block size, prompts and output lengths
(``ignore_eos``). The engine is stepped by hand so that the peak number of running
requests and the peak KV blocks in use can be read from the scheduler each step.

Example (the issue's setting: memory for ~4 requests of 2048 tokens, 32 requests):
    python benchmarks/throughput.py --model smollm2 --num-requests 32 \\
        --output-len 2048 --memory-requests 4 --cases none crystal:256
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common.results import markdown_table, write_results  # noqa: E402


def parse_case(text: str) -> tuple[str, int | None]:
    """``none`` or ``POLICY:BUDGET``."""
    if text == "none":
        return "none", None
    policy, sep, budget = text.partition(":")
    if not sep or not budget.isdigit() or int(budget) < 1:
        raise argparse.ArgumentTypeError(
            f"case {text!r} must be 'none' or POLICY:BUDGET with BUDGET >= 1 (e.g. crystal:256)"
        )
    return policy, int(budget)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="bundled model name or HF folder")
    parser.add_argument(
        "--cases",
        nargs="+",
        type=parse_case,
        default=[("none", None), ("crystal", 256)],
        help="cases to run, each 'none' or POLICY:BUDGET (default: none crystal:256)",
    )
    parser.add_argument("--num-requests", type=int, default=32, help="requests per case")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=2048, help="generated tokens each")
    parser.add_argument(
        "--memory-requests",
        type=float,
        default=4.0,
        help="KV memory, in full-length requests that vanilla vLLM could hold (default 4)",
    )
    parser.add_argument("--block-size", type=int, default=32, help="KV block size (both sides)")
    parser.add_argument(
        "--max-num-seqs", type=int, default=64, help="scheduler limit on running requests"
    )
    parser.add_argument(
        "--expect-no-eviction",
        action="store_true",
        help="measure the policy path's overhead: budgets above every sequence, so a case "
        "that evicts fails the run (by default a policy case that evicts nothing fails it)",
    )
    parser.add_argument("--name", default="throughput", help="result file name suffix")
    parser.add_argument("--results-dir", type=Path, default=None, help="where results go")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


# -- one case, inside a fresh process -----------------------------------------------------


def run_case(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    additional = {}
    if spec["policy"] != "none":
        additional = {"kv_policy": spec["policy"], "kv_budget": spec["budget"]}
    llm = LLM(
        model=spec["model"],
        enforce_eager=True,
        dtype="bfloat16",
        max_model_len=spec["prompt_len"] + spec["output_len"],
        block_size=spec["block_size"],
        kv_cache_memory_bytes=spec["kv_bytes"],
        max_num_seqs=spec["max_num_seqs"],
        enable_prefix_caching=False,
        distributed_executor_backend="uni",
        seed=0,
        additional_config=additional,
    )
    engine = llm.llm_engine
    core = engine.engine_core.engine_core
    scheduler = core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    vocab = llm.get_tokenizer().vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=spec["output_len"], ignore_eos=True)
    for i in range(spec["num_requests"]):
        tokens = [
            (7919 * (i * spec["prompt_len"] + j) + 13) % (vocab - 100) + 50
            for j in range(spec["prompt_len"])
        ]
        engine.add_request(str(i), TokensPrompt(prompt_token_ids=tokens), params)

    start = time.perf_counter()
    first_token: dict[str, float] = {}
    finished: dict[str, tuple[float, int]] = {}
    peak_running = peak_blocks = steps = 0
    timeline: list[tuple[float, int]] = []  # (seconds since start, running after the step)
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter() - start
        steps += 1
        peak_running = max(peak_running, len(scheduler.running))
        timeline.append((now, len(scheduler.running)))
        peak_blocks = max(peak_blocks, pool.num_gpu_blocks - 1 - pool.get_num_free_blocks())
        for out in outputs:
            if out.outputs and out.outputs[0].token_ids:
                first_token.setdefault(out.request_id, now)
            if out.finished:
                finished[out.request_id] = (now, len(out.outputs[0].token_ids))
    elapsed = time.perf_counter() - start

    runner = core.model_executor.driver_worker.worker.model_runner
    cache = getattr(runner, "crystal_cache", None)
    stats = None
    if cache is not None:
        summary = cache.summary()
        stats = {"evictions": summary["evictions"], "reallocations": summary["reallocations"]}
    generated = sum(n for _, n in finished.values())
    tpot = [(finished[r][0] - first_token[r]) / max(finished[r][1] - 1, 1) for r in finished]
    from crystal_vllm import ops

    return {
        **spec,
        "ops": ops.get_impl().__name__.rsplit(".", 1)[-1] if cache is not None else None,
        "elapsed_s": elapsed,
        "generated_tokens": generated,
        "output_tok_s": generated / elapsed,
        "peak_running": peak_running,
        # Time-weighted: each step's running count weighs as long as the step took.
        "mean_running": sum(
            n * (t - t0)
            for (t0, _), (t, n) in zip([(0.0, 0), *timeline[:-1]], timeline, strict=True)
        )
        / elapsed,
        "timeline": timeline,
        "peak_blocks": peak_blocks,
        "total_blocks": pool.num_gpu_blocks - 1,
        "peak_kv_bytes": peak_blocks * spec["page_bytes"],
        "ttft_median_s": statistics.median(first_token.values()),
        "tpot_median_s": statistics.median(tpot),
        "e2e_median_s": statistics.median(t for t, _ in finished.values()),
        "steps": steps,
        "crystal": stats,
    }


# -- the driver ---------------------------------------------------------------------------


def _model_geometry(model_dir: Path) -> tuple[int, int, int]:
    config = json.loads((model_dir / "config.json").read_text())
    layers = config["num_hidden_layers"]
    kv_heads = config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return layers, kv_heads, head_dim


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        print("RESULT " + json.dumps(run_case(json.loads(args.worker))))
        return

    from crystal_vllm.models import MODEL_NAMES, prepare_model

    model = prepare_model(args.model) if args.model in MODEL_NAMES else Path(args.model)
    layers, kv_heads, head_dim = _model_geometry(model)
    page_bytes = layers * kv_heads * head_dim * 2 * 2 * args.block_size  # K+V, bf16
    seq_len = args.prompt_len + args.output_len
    blocks_per_request = -(-seq_len // args.block_size)
    kv_bytes = int(args.memory_requests * blocks_per_request + 1) * page_bytes
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1"}
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override --kv-cache-memory-bytes
    env.setdefault("OMP_NUM_THREADS", "1")

    from tqdm import tqdm

    results = []
    for policy, budget in tqdm(args.cases, desc="cases", unit="case"):
        spec = {
            "model": str(model),
            "policy": policy,
            "budget": budget,
            "num_requests": args.num_requests,
            "prompt_len": args.prompt_len,
            "output_len": args.output_len,
            "block_size": args.block_size,
            "kv_bytes": kv_bytes,
            "page_bytes": page_bytes,
            "max_num_seqs": args.max_num_seqs,
        }
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec)],
            capture_output=True,
            text=True,
            env=env,
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"case {policy}:{budget} failed:\n{proc.stderr[-4000:]}")
        result = json.loads(lines[-1][len("RESULT ") :])
        evictions = (result["crystal"] or {}).get("evictions", 0)
        if args.expect_no_eviction and evictions:
            raise SystemExit(f"case {policy}:{budget} evicted {evictions} entries")
        if not args.expect_no_eviction and policy not in ("none", "full") and not evictions:
            raise SystemExit(f"case {policy}:{budget} evicted nothing: compression did not run")
        results.append(result)

    base = next((r for r in results if r["policy"] == "none"), None)
    rows = []
    for r in results:
        rows.append(
            [
                r["policy"] if r["budget"] is None else f"{r['policy']}:{r['budget']}",
                r["output_tok_s"],
                r["output_tok_s"] / base["output_tok_s"] if base else float("nan"),
                r["peak_running"],
                r["mean_running"],
                r["mean_running"] / base["mean_running"] if base else float("nan"),
                r["peak_kv_bytes"] / 2**20,
                r["ttft_median_s"],
                r["tpot_median_s"] * 1000,
                r["e2e_median_s"],
                (r["crystal"] or {}).get("evictions", 0),
            ]
        )
    headers = [
        "case",
        "tok/s",
        "x none",
        "peak running",
        "mean running",
        "x none",
        "peak KV MiB",
        "TTFT s (median)",
        "TPOT ms (median)",
        "E2E s (median)",
        "evictions",
    ]
    setting = (
        f"model {args.model}, {args.num_requests} requests x ({args.prompt_len} prompt + "
        f"{args.output_len} generated) tokens, ignore_eos, greedy, eager, bf16, block size "
        f"{args.block_size}, KV memory {kv_bytes / 2**20:.1f} MiB (= {args.memory_requests:g} "
        "full-length requests)"
    )
    markdown = f"# Throughput at fixed KV memory\n\n{setting}\n\n" + markdown_table(
        headers, rows, 2
    )
    figure = _plot(results)
    paths = write_results(
        args.name, {"setting": setting, "cases": results}, markdown, figure, args.results_dir
    )
    print(markdown)
    print(f"results: {paths.json} {paths.markdown} {paths.png}")


def _plot(results: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [
        r["policy"] if r["budget"] is None else f"{r['policy']}:{r['budget']}" for r in results
    ]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.bar(labels, [r["output_tok_s"] for r in results], color="tab:blue")
    ax1.set_ylabel("output tokens / s")
    ax1.tick_params(axis="x", rotation=30)
    for label, r in zip(labels, results, strict=True):
        times = [t for t, _ in r["timeline"]]
        ax2.step(times, [n for _, n in r["timeline"]], where="post", label=label)
    ax2.set_xlabel("seconds")
    ax2.set_ylabel("running requests")
    ax2.legend()
    fig.suptitle("Throughput at fixed KV memory")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
