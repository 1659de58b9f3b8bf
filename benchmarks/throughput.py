"""Throughput at fixed KV memory: vanilla vLLM vs KV policies, side by side in one run.

Every (policy, budget) case gets the same model, KV memory (in blocks), block size,
prompts, output lengths (``ignore_eos``) and engine flags (eager, bf16, no prefix caching,
no chunked prefill).

--mode offline (default): each case runs in a fresh subprocess with an in-process engine
stepped by hand, so the running requests, the vLLM blocks and the policy's head-blocks in
use are read every step.

--mode http: each case starts ``vllm serve``; concurrent streaming clients time every
request (TTFT, TPOT, end-to-end) from the stream while ``/metrics`` is polled for the
running requests and KV block usage.

"KV held" is the peak of what the cache really holds: for a policy, head-blocks in use x
bytes per head-block (block_size x head_dim x K,V x 2 bytes); for vanilla vLLM, blocks in
use x bytes per block.

Example (memory for 3 full-length requests of 1536 tokens, 16 requests):
    python benchmarks/throughput.py --model smollm2 --num-requests 16 --prompt-len 512 \\
        --output-len 1024 --memory-requests 3 --cases none crystal:256 streaming:256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common.engine_runs import (  # noqa: E402
    EngineParts,
    KVGeometry,
    RequestTiming,
    block_size_arg,
    case_label,
    cli_flags,
    downsample,
    engine_settings,
    kv_bytes_held,
    latency_summary,
    open_engine,
    parse_case,
    positive_float,
    positive_int,
    prompt_tokens,
    report_progress,
    report_result,
    run_worker,
    running_stats,
)
from benchmarks.common.results import markdown_table, write_results  # noqa: E402

#: Policies that keep every entry: they must not evict.
NON_EVICTING = ("none", "full")
#: How long a server may take to start: three processes import vLLM, which took over the
#: default 300 s on a 2-core machine shared with other jobs.
SERVER_STARTUP_S = 900.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default="smollm2",
        help="bundled model name (smollm2, qwen2.5-coder-0.5b, tiny) or an HF folder "
        "(default: smollm2)",
    )
    parser.add_argument(
        "--mode",
        choices=("offline", "http"),
        default="offline",
        help="offline: in-process engine stepped by hand; http: `vllm serve` and streaming "
        "clients (default: offline)",
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        type=parse_case,
        default=[("none", None), ("crystal", 256)],
        help="cases to run, each 'none' or POLICY:BUDGET, BUDGET = KV entries kept per "
        "(layer, KV head) (default: none crystal:256)",
    )
    parser.add_argument(
        "--num-requests", type=positive_int, default=32, help="requests per case (default 32)"
    )
    parser.add_argument(
        "--prompt-len", type=positive_int, default=32, help="prompt tokens per request (default 32)"
    )
    parser.add_argument(
        "--output-len",
        type=positive_int,
        default=2048,
        help="tokens generated per request, ignore_eos (default 2048)",
    )
    parser.add_argument(
        "--memory-requests",
        type=positive_float,
        default=4.0,
        help="KV memory, in full-length (prompt + output) requests that vanilla vLLM could "
        "hold; >= 1 (default 4)",
    )
    parser.add_argument(
        "--block-size",
        type=block_size_arg,
        default=32,
        help="KV block size in tokens, a multiple of 32 (default 32)",
    )
    parser.add_argument(
        "--max-num-seqs",
        type=positive_int,
        default=64,
        help="scheduler limit on running requests (default 64)",
    )
    parser.add_argument(
        "--concurrency",
        type=positive_int,
        default=None,
        help="http mode: streaming clients in flight at once (default: --num-requests)",
    )
    parser.add_argument(
        "--poll-interval",
        type=positive_float,
        default=0.25,
        help="http mode: seconds between two reads of the server's /metrics (default 0.25)",
    )
    parser.add_argument(
        "--expect-no-eviction",
        action="store_true",
        help="measure the policy path's overhead: budgets above every sequence, so a case "
        "that evicts fails the run (by default a policy case that evicts nothing fails it)",
    )
    parser.add_argument(
        "--name",
        default="throughput",
        help="result file name suffix: <date>_<machine>_<name>.{json,md,png} (default: throughput)",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="where results go (default: benchmarks/results)",
    )
    parser.add_argument(
        "--worker",
        default=None,
        metavar="SPEC",
        help="internal: run one offline case from its JSON spec and print its result",
    )
    return parser


# -- offline: one case, inside a fresh process ---------------------------------------------


def run_offline_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Add every request, step the engine until all finish, read the counters each step."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = open_engine(spec)
    parts = EngineParts.of(llm)
    vocab = spec["vocab_size"]
    params = SamplingParams(temperature=0.0, max_tokens=spec["output_len"], ignore_eos=True)
    for i in range(spec["num_requests"]):
        tokens = prompt_tokens(i, spec["prompt_len"], vocab)
        parts.engine.add_request(str(i), TokensPrompt(prompt_token_ids=tokens), params)

    start, cpu_start = time.perf_counter(), time.process_time()
    first_token: dict[str, float] = {}
    timings: list[RequestTiming] = []
    samples: list[tuple[float, int]] = []  # (step start, requests in the step)
    peak_blocks = peak_head_blocks = steps = 0
    while parts.engine.has_unfinished_requests():
        step_start = time.perf_counter() - start
        outputs = parts.engine.step()
        now = time.perf_counter() - start
        steps += 1
        done = 0
        for out in outputs:
            if out.outputs and out.outputs[0].token_ids:
                first_token.setdefault(out.request_id, now)
            if out.finished:
                done += 1
                tokens = len(out.outputs[0].token_ids)
                timings.append(RequestTiming(0.0, first_token[out.request_id], now, tokens))
        # Finished requests have left the running list already.
        samples.append((step_start, len(parts.scheduler.running) + done))
        peak_blocks = max(peak_blocks, parts.blocks_in_use())
        summary = parts.cache_summary()
        if summary is not None:
            peak_head_blocks = max(peak_head_blocks, summary["head_blocks_in_use"])
        if done:
            report_progress(done)
    elapsed = time.perf_counter() - start
    cpu_elapsed = time.process_time() - cpu_start

    summary = parts.cache_summary()
    generated = sum(t.output_tokens for t in timings)
    return {
        "ops": parts.ops_impl(),
        "torch_threads": parts.threads(),
        "elapsed_s": elapsed,
        "generated_tokens": generated,
        "output_tok_s": generated / elapsed,
        # One engine thread in this process: tokens per CPU-second barely depend on other
        # jobs competing for the cores, which tokens per wall-second do.
        "output_tok_per_cpu_s": generated / cpu_elapsed,
        **running_stats(samples, elapsed),
        "timeline": downsample(samples),
        "peak_blocks": peak_blocks,
        "total_blocks": parts.total_blocks(),
        "peak_head_blocks": peak_head_blocks if summary is not None else None,
        **latency_summary(timings),
        "steps": steps,
        "evictions": None if summary is None else summary["evictions"],
        "reallocations": None if summary is None else summary["reallocations"],
    }


# -- http: one case, against a fresh server ------------------------------------------------


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode()


def run_http_case(
    spec: dict[str, Any], concurrency: int, poll_interval: float, label: str
) -> dict[str, Any]:
    """Serve the case, stream every request, then read the policy's counters from the log.

    ``serve`` sets ``VLLM_CPU_KVCACHE_SPACE``, which vLLM's CPU platform lets replace
    ``--kv-cache-memory-bytes``; the pool is fixed by ``--num-gpu-blocks-override`` (the
    block count the offline mode gets from its byte size) and checked on ``/metrics``.
    """
    from openai import OpenAI
    from tqdm import tqdm

    from benchmarks.common.http_load import (
        logging_config_file,
        parse_cache_stats,
        run_load,
        server_num_blocks,
    )
    from crystal_vllm.serving import serve
    from crystal_vllm.vllm_ext.runner_mixin import STATS_LOG_INTERVAL_S

    flags = cli_flags(spec["engine"]) + ["--num-gpu-blocks-override", str(spec["num_blocks"])]
    flags += ["--kv-policy", spec["policy"]]
    if spec["budget"] is not None:
        flags += ["--kv-budget", str(spec["budget"])]
    with tempfile.TemporaryDirectory(prefix="throughput-http-") as tmp:
        log_config = logging_config_file(Path(tmp) / "logging.json")
        env = {"VLLM_LOGGING_CONFIG_PATH": str(log_config)}
        log_path = Path(tmp) / "server.log"
        with serve(
            spec["model"], flags, env=env, log_path=log_path, startup_timeout=SERVER_STARTUP_S
        ) as server:
            blocks = server_num_blocks(_get(f"{server.base_url}/metrics"))
            if blocks != spec["num_blocks"]:
                raise SystemExit(
                    f"case {label}: the server has {blocks} KV blocks, not {spec['num_blocks']}"
                )
            vocab = spec["vocab_size"]
            prompts = [
                prompt_tokens(i, spec["prompt_len"], vocab) for i in range(spec["num_requests"])
            ]
            with tqdm(total=len(prompts), desc=label, unit="req", leave=False) as bar:
                load = asyncio.run(
                    run_load(
                        server.base_url,
                        spec["model"],
                        prompts,
                        spec["output_len"],
                        concurrency,
                        poll_interval,
                        on_done=lambda: bar.update(1),
                    )
                )
            during = parse_cache_stats(server.log_path.read_text(errors="replace"))
            after = during
            if spec["policy"] != "none":
                # The runner logs its counters at most every STATS_LOG_INTERVAL_S, on a
                # step; one tiny request after that long gets the final count logged.
                time.sleep(STATS_LOG_INTERVAL_S + 0.5)
                with OpenAI(base_url=f"{server.base_url}/v1", api_key="unused") as client:
                    client.completions.create(
                        model=spec["model"], prompt=prompt_tokens(0, 1, vocab), max_tokens=2
                    )
                after = parse_cache_stats(server.log_path.read_text(errors="replace"))

    usable = spec["num_blocks"] - 1
    running = [(t, int(g.running)) for t, g in load.gauges]
    peak_usage = max((g.kv_usage for _, g in load.gauges), default=0.0)
    generated = sum(t.output_tokens for t in load.timings)
    return {
        "ops": None,
        "elapsed_s": load.elapsed,
        "generated_tokens": generated,
        "output_tok_s": generated / load.elapsed,
        "output_tok_per_cpu_s": None,  # the server's processes are not timed
        **running_stats(running, load.elapsed),
        "timeline": downsample(running),
        "peak_blocks": round(peak_usage * usable),
        "total_blocks": usable,
        # Sampled at the runner's stats interval: a lower bound on the true peak.
        "peak_head_blocks": max((s.head_blocks for s in during), default=None),
        **latency_summary(load.timings),
        "requests": [
            {"ttft_s": t.ttft, "tpot_s": t.tpot, "e2e_s": t.e2e, "tokens": t.output_tokens}
            for t in load.timings
        ],
        "evictions": after[-1].evictions if after else None,
        "reallocations": after[-1].reallocations if after else None,
    }


# -- the driver ----------------------------------------------------------------------------


def eviction_problem(policy: str, evictions: int | None, expect_no_eviction: bool) -> str | None:
    """Why a case's eviction count makes its numbers meaningless, or None if it is fine:
    a compressing policy must evict (else it measured vanilla behaviour), and with
    ``--expect-no-eviction`` nothing may."""
    if policy == "none":
        return None
    unknown = "the server exposed no eviction count, so whether it evicted is unknown"
    if expect_no_eviction:
        if evictions is None:
            return unknown
        return f"evicted {evictions} entries despite --expect-no-eviction" if evictions else None
    if policy in NON_EVICTING:
        return None
    if evictions is None:
        return unknown
    return None if evictions else "evicted nothing: compression did not run"


def _mib(value: int | None) -> float | str:
    return "n/a" if value is None else value / 2**20


def _per_cpu(value: float | None) -> float | str:
    return "n/a" if value is None else value


def _ratio(value: float, base: float | None) -> float:
    return value / base if base else math.nan


def report(args: argparse.Namespace, results: list[dict[str, Any]], setting: str) -> str:
    """The markdown table (plus notes on where the http mode's numbers come from)."""
    base = next((r for r in results if r["policy"] == "none"), None)
    rows = []
    for r in results:
        held = _mib(r["peak_kv_bytes"])
        if args.mode == "http" and r["policy"] != "none" and r["peak_kv_bytes"] is not None:
            held = f">= {held:.2f}"
        rows.append(
            [
                case_label(r["policy"], r["budget"]),
                r["output_tok_s"],
                _ratio(r["output_tok_s"], base and base["output_tok_s"]),
                _per_cpu(r["output_tok_per_cpu_s"]),
                _ratio(r["output_tok_per_cpu_s"] or 0.0, base and base["output_tok_per_cpu_s"]),
                r["peak_running"],
                r["steady_running"],
                _ratio(r["steady_running"], base and base["steady_running"]),
                r["mean_running"],
                held,
                _mib(r["peak_reserved_kv_bytes"]),
                r["ttft_median_s"],
                r["tpot_median_s"] * 1000,
                r["e2e_median_s"],
                "n/a" if r["evictions"] is None else r["evictions"],
                r["case_wall_s"],
                "{:.1f} / {:.1f}".format(*r["load_avg_1m"]),
            ]
        )
    headers = [
        "case",
        "tok/s",
        "x none",
        "tok per CPU-s",
        "x none",
        "peak running",
        "steady running",
        "x none",
        "mean running",
        "KV MiB held (peak)",
        "KV MiB in vLLM blocks (peak)",
        "TTFT s (median)",
        "TPOT ms (median)",
        "E2E s (median)",
        "evictions",
        "case wall s",
        "load avg start / end",
    ]
    notes = [
        "tok/s: output tokens over the wall time from the first request to the last token; "
        "per CPU-s: over the engine process's CPU time (offline mode, one thread), which "
        "other jobs on the machine inflate far less than wall time. "
        "Steady running: time-weighted mean over the middle half of the run; mean running: "
        "over the whole run. KV held: head-blocks in use x bytes per head-block for a policy, "
        "vLLM blocks in use x bytes per block for none. Load avg: the machine's 1-minute "
        f"load average when the case started and ended ({os.cpu_count()} cores; other jobs "
        "share them)."
    ]
    if args.mode == "http":
        notes.append(
            "HTTP mode: running requests and vLLM block usage are sampled from /metrics every "
            f"{args.poll_interval:g} s. The server exports no head-block count on /metrics; a "
            "policy's head-blocks and evictions come from its periodic log line, so its KV held "
            "is the largest sample (a lower bound on the peak), or n/a if no line was logged."
        )
    return (
        f"# Throughput at fixed KV memory ({args.mode})\n\n{setting}\n\n"
        + markdown_table(headers, rows, 2)
        + "\n"
        + "\n\n".join(notes)
        + "\n"
    )


def _plot(results: list[dict[str, Any]], mode: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [case_label(r["policy"], r["budget"]) for r in results]
    x = range(len(results))
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 3.8))
    ax1.bar(labels, [r["output_tok_s"] for r in results], color="tab:blue")
    ax1.set_ylabel("output tokens / s")
    ax1.set_title("throughput")
    width = 0.4
    ax2.bar([i - width / 2 for i in x], [r["peak_running"] for r in results], width, label="peak")
    ax2.bar(
        [i + width / 2 for i in x], [r["steady_running"] for r in results], width, label="steady"
    )
    ax2.set_xticks(list(x), labels)
    ax2.set_ylabel("running requests")
    ax2.set_title("running requests")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=30)
    for label, r in zip(labels, results, strict=True):
        times, running = zip(*r["timeline"], strict=True) if r["timeline"] else ((), ())
        ax3.step(times, running, where="post", label=label)
    ax3.set_xlabel("seconds")
    ax3.set_ylabel("running requests")
    ax3.set_title("running requests over time")
    ax3.legend()
    fig.suptitle(f"Throughput at fixed KV memory ({mode})")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker is not None:
        report_result(run_offline_case(json.loads(args.worker)))
        return
    if args.memory_requests < 1:
        parser.error(
            f"--memory-requests {args.memory_requests:g} is invalid: it must be >= 1 "
            "(vanilla vLLM must fit one full-length request)"
        )

    from crystal_vllm.models import MODEL_NAMES, prepare_model

    model = prepare_model(args.model) if args.model in MODEL_NAMES else Path(args.model)
    geometry = KVGeometry.from_model_dir(model)
    seq_len = args.prompt_len + args.output_len
    if seq_len > geometry.max_context:
        parser.error(
            f"--prompt-len {args.prompt_len} + --output-len {args.output_len} = {seq_len} "
            f"tokens exceeds the model's {geometry.max_context}-token context"
        )
    block_bytes = geometry.block_bytes(args.block_size)
    blocks_per_request = -(-seq_len // args.block_size)
    num_blocks = int(args.memory_requests * blocks_per_request + 1)  # + vLLM's null block
    settings = engine_settings(seq_len, args.block_size, args.max_num_seqs)
    from tqdm import tqdm
    from transformers import AutoTokenizer

    vocab_size = AutoTokenizer.from_pretrained(model).vocab_size
    concurrency = args.concurrency or args.num_requests

    started = time.perf_counter()
    results = []
    for policy, budget in tqdm(args.cases, desc="cases", unit="case"):
        label = case_label(policy, budget)
        spec = {
            "model": str(model),
            "policy": policy,
            "budget": budget,
            "num_requests": args.num_requests,
            "prompt_len": args.prompt_len,
            "output_len": args.output_len,
            "vocab_size": vocab_size,
            "block_size": args.block_size,
            "num_blocks": num_blocks,
            "kv_bytes": num_blocks * block_bytes,
            "engine": settings,
        }
        case_start, load_start = time.perf_counter(), os.getloadavg()[0]
        if args.mode == "offline":
            measured = run_worker(Path(__file__), spec, label, args.num_requests)
            if measured["total_blocks"] != num_blocks - 1:
                raise SystemExit(
                    f"case {label}: the engine has {measured['total_blocks'] + 1} KV blocks, "
                    f"not {num_blocks}"
                )
        else:
            measured = run_http_case(spec, concurrency, args.poll_interval, label)
        problem = eviction_problem(policy, measured["evictions"], args.expect_no_eviction)
        if problem:
            raise SystemExit(f"case {label}: {problem}")
        results.append(
            {
                **spec,
                **measured,
                "mode": args.mode,
                "block_bytes": block_bytes,
                "head_block_bytes": geometry.head_block_bytes(args.block_size),
                "peak_kv_bytes": kv_bytes_held(
                    policy,
                    geometry,
                    args.block_size,
                    measured["peak_blocks"],
                    measured["peak_head_blocks"],
                ),
                "peak_reserved_kv_bytes": measured["peak_blocks"] * block_bytes,
                "case_wall_s": time.perf_counter() - case_start,
                # Other jobs share the machine: the 1-minute load average around the case.
                "load_avg_1m": [load_start, os.getloadavg()[0]],
            }
        )

    setting = (
        f"{args.mode} mode, model {args.model}, {args.num_requests} requests x "
        f"({args.prompt_len} prompt + {args.output_len} generated) tokens"
        + (f", {concurrency} concurrent streaming clients" if args.mode == "http" else "")
        + f", ignore_eos, greedy, eager, bf16, block size {args.block_size}, "
        f"no prefix caching, no chunked prefill, max {args.max_num_seqs} running, KV memory "
        f"{num_blocks - 1} blocks = {(num_blocks - 1) * block_bytes / 2**20:.1f} MiB "
        f"(= {args.memory_requests:g} full-length requests), "
        f"total wall time {time.perf_counter() - started:.0f} s"
    )
    markdown = report(args, results, setting)
    paths = write_results(
        args.name,
        {"setting": setting, "mode": args.mode, "cases": results},
        markdown,
        _plot(results, args.mode),
        args.results_dir,
    )
    print(markdown)
    print(f"results: {paths.json} {paths.markdown} {paths.png}")


if __name__ == "__main__":
    main()
