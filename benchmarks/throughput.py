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
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import cli  # noqa: E402
from benchmarks.common import engine_runs as er  # noqa: E402
from benchmarks.common.results import record_table  # noqa: E402

#: Policies that keep every entry: they must not evict.
NON_EVICTING = ("none", "full")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.script_parser(__doc__)
    er.add_case_args(parser, "none crystal:256", output_len=2048, num_requests=32, prompt_len=32)
    parser.add_argument(
        "--mode",
        choices=("offline", "http"),
        default="offline",
        help="offline: in-process engine stepped by hand; http: `vllm serve` and streaming "
        "clients (default: offline)",
    )
    parser.add_argument(
        "--memory-requests",
        type=cli.positive_float,
        default=4.0,
        help="KV memory, in full-length (prompt + output) requests that vanilla vLLM could "
        "hold; >= 1 (default 4)",
    )
    parser.add_argument(
        "--max-num-seqs", type=cli.positive_int, default=64, help="running requests at most (64)"
    )
    parser.add_argument(
        "--tensor-parallel-size",
        type=cli.positive_int,
        default=1,
        help="tensor-parallel workers (default 1); each holds its share of the KV heads and "
        "of the KV memory, so the block count is the same as with 1. On a CPU machine vLLM "
        "also needs VLLM_CPU_OMP_THREADS_BIND (e.g. '0|1')",
    )
    parser.add_argument(
        "--concurrency",
        type=cli.positive_int,
        help="http mode: streaming clients in flight at once (default: --num-requests)",
    )
    parser.add_argument(
        "--poll-interval",
        type=cli.positive_float,
        default=0.25,
        help="http mode: seconds between two reads of the server's /metrics (default 0.25)",
    )
    parser.add_argument(
        "--expect-no-eviction",
        action="store_true",
        help="measure the policy path's overhead: budgets above every sequence, so a case "
        "that evicts fails the run (by default a policy case that evicts nothing fails it)",
    )
    cli.add_output_args(parser, "throughput", worker=True)
    return parser


# -- offline: one case, inside a fresh process ---------------------------------------------


def run_offline_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Add every request, step the engine until all finish, read the counters each step."""
    engine = er.Engine(spec)
    engine.add_batch(spec)

    start, cpu_start = engine.wall(), engine.cpu()
    first_token: dict[str, float] = {}
    timings: list[er.RequestTiming] = []
    samples: list[tuple[float, int]] = []  # (step start, requests in the step)
    peak_blocks = peak_head_blocks = steps = 0
    while engine.engine.has_unfinished_requests():
        step_start = engine.wall() - start
        outputs = engine.engine.step()
        now = engine.wall() - start
        steps += 1
        done = 0
        for out in outputs:
            if out.outputs and out.outputs[0].token_ids:
                first_token.setdefault(out.request_id, now)
            if out.finished:
                done += 1
                tokens = len(out.outputs[0].token_ids)
                timings.append(er.RequestTiming(0.0, first_token[out.request_id], now, tokens))
        samples.append((step_start, len(outputs)))
        blocks, head_blocks = engine.read()
        peak_blocks = max(peak_blocks, blocks)
        peak_head_blocks = max(peak_head_blocks, head_blocks or 0)
        if done:
            er.report_progress(done)
    elapsed = engine.wall() - start
    cpu_elapsed = engine.cpu() - cpu_start

    summary = engine.summary()
    generated = sum(t.output_tokens for t in timings)
    return {
        **engine.info(),
        "elapsed_s": elapsed,
        "generated_tokens": generated,
        "output_tok_s": generated / elapsed,
        # One engine thread in this process: tokens per CPU-second barely depend on other
        # jobs competing for the cores, which tokens per wall-second do.
        "output_tok_per_cpu_s": generated / cpu_elapsed,
        **er.running_stats(samples, elapsed),
        "timeline": er.downsample(samples),
        "peak_blocks": peak_blocks,
        "total_blocks": engine.total_blocks,
        "peak_head_blocks": None if summary is None else peak_head_blocks,
        **er.latency_summary(timings),
        "steps": steps,
        "evictions": engine.evictions(),
        "reallocations": summary and summary["reallocations"],
    }


# -- http: one case, against a fresh server ------------------------------------------------


def run_http_case(
    spec: dict[str, Any], concurrency: int, poll_interval: float, label: str
) -> dict[str, Any]:
    """Serve the case, stream every request, then read the policy's counters from the log.

    ``serve`` sets ``VLLM_CPU_KVCACHE_SPACE``, which vLLM's CPU platform lets replace
    ``--kv-cache-memory-bytes``; the pool is fixed by ``--num-gpu-blocks-override`` (the
    block count the offline mode gets from its byte size) and checked on ``/metrics``.
    """
    import httpx

    from benchmarks.common import server as srv
    from benchmarks.common.http_load import run_load, server_num_blocks

    flags = er.cli_flags(spec["engine"]) + ["--num-gpu-blocks-override", str(spec["num_blocks"])]
    flags += srv.policy_flags(spec["policy"], spec["budget"], spec.get("policy_config"))
    vocab = spec["vocab_size"]
    prompts = [er.prompt_tokens(i, spec["prompt_len"], vocab) for i in range(spec["num_requests"])]
    with tempfile.TemporaryDirectory(prefix="throughput-http-") as tmp:
        log_path = Path(tmp) / "server.log"
        with srv.policy_server(spec["model"], flags, log_path) as server:
            blocks = server_num_blocks(httpx.get(f"{server.base_url}/metrics", timeout=30).text)
            if blocks != spec["num_blocks"]:
                raise SystemExit(
                    f"case {label}: the server has {blocks} KV blocks, not {spec['num_blocks']}"
                )
            load = asyncio.run(
                run_load(
                    server.base_url, spec["model"], prompts, spec["output_len"], concurrency,
                    poll_interval, label,
                )
            )  # fmt: skip
            during = srv.logged_cache_stats(log_path)
            if spec["policy"] != "none":
                srv.flush_stats(server.base_url, spec["model"])
            after = srv.logged_cache_stats(log_path)

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
        **er.running_stats(running, load.elapsed),
        "timeline": er.downsample(running),
        "peak_blocks": round(peak_usage * usable),
        "total_blocks": usable,
        # Sampled at the runner's stats interval: a lower bound on the true peak.
        "peak_head_blocks": max((s.head_blocks for s in during), default=None),
        **er.latency_summary(load.timings),
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


def report(args: argparse.Namespace, results: list[dict[str, Any]], setting: str) -> str:
    """The markdown table (plus notes on where the http mode's numbers come from)."""
    base = next((r for r in results if r["policy"] == "none"), None)

    def x_none(key: str) -> Callable[[dict[str, Any]], float]:
        return lambda r: (
            r[key] / base[key] if base and base[key] and r[key] is not None else math.nan
        )

    def held(r: dict[str, Any]) -> float | str | None:
        mib = None if r["peak_kv_bytes"] is None else r["peak_kv_bytes"] / 2**20
        lower_bound = args.mode == "http" and r["policy"] != "none" and mib is not None
        return f">= {mib:.2f}" if lower_bound else mib

    columns = [
        ("case", er.label_of),
        ("tok/s", "output_tok_s"),
        ("x none", x_none("output_tok_s")),
        ("tok per CPU-s", "output_tok_per_cpu_s"),
        ("x none", x_none("output_tok_per_cpu_s")),
        ("peak running", "peak_running"),
        ("steady running", "steady_running"),
        ("x none", x_none("steady_running")),
        ("mean running", "mean_running"),
        ("KV MiB held (peak)", held),
        ("KV MiB in vLLM blocks (peak)", lambda r: r["peak_reserved_kv_bytes"] / 2**20),
        ("TTFT s (median)", "ttft_median_s"),
        ("TPOT ms (median)", lambda r: r["tpot_median_s"] * 1000),
        ("E2E s (median)", "e2e_median_s"),
        ("evictions", "evictions"),
        ("case wall s", "case_wall_s"),
        ("load avg start / end", er.load_avg_cell),
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
        + record_table(results, columns, 2)
        + "\n"
        + "\n\n".join(notes)
        + "\n"
    )


def _plot(results: list[dict[str, Any]], mode: str):
    labels = [er.case_label(r["policy"], r["budget"]) for r in results]
    x = range(len(results))
    title = f"Throughput at fixed KV memory ({mode})"
    fig, (ax1, ax2, ax3) = cli.subplots(title, 3, figsize=(14, 3.8))
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
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = er.parse_or_work(parser, argv, run_offline_case)
    if args.memory_requests < 1:
        parser.error(
            f"--memory-requests {args.memory_requests:g} is invalid: it must be >= 1 "
            "(vanilla vLLM must fit one full-length request)"
        )
    model, geometry, vocab_size = er.model_geometry(args.model)
    seq_len = args.prompt_len + args.output_len
    if seq_len > geometry.max_context:
        parser.error(
            f"--prompt-len {args.prompt_len} + --output-len {args.output_len} = {seq_len} "
            f"tokens exceeds the model's {geometry.max_context}-token context"
        )
    tp = args.tensor_parallel_size
    if geometry.num_kv_heads % tp:
        parser.error(
            f"--tensor-parallel-size {tp} is invalid for this model: it must divide its "
            f"{geometry.num_kv_heads} KV heads"
        )
    block_bytes = geometry.block_bytes(args.block_size)
    blocks_per_request = -(-seq_len // args.block_size)
    num_blocks = int(args.memory_requests * blocks_per_request + 1)  # + vLLM's null block
    concurrency = args.concurrency or args.num_requests

    shared = {
        "block_size": args.block_size,
        "num_blocks": num_blocks,
        # Per worker: a tensor-parallel rank holds 1/tp of every block (its KV heads).
        "kv_bytes": num_blocks * block_bytes // tp,
        "engine": er.engine_settings(
            seq_len, args.block_size, args.max_num_seqs, tensor_parallel_size=tp
        ),
    }
    started = time.perf_counter()
    results = []
    for policy, budget in er.progress(args.cases):
        label = er.case_label(policy, budget)
        spec = er.case_spec(model, (policy, budget), args, vocab_size, **shared)
        if args.mode == "offline":
            total = args.num_requests
            measured = er.measure_case(er.run_worker, Path(__file__), spec, label, total)
            if measured["total_blocks"] != num_blocks - 1:
                raise SystemExit(
                    f"case {label}: the engine has {measured['total_blocks'] + 1} KV blocks, "
                    f"not {num_blocks}"
                )
        else:
            measured = er.measure_case(run_http_case, spec, concurrency, args.poll_interval, label)
        problem = eviction_problem(policy, measured["evictions"], args.expect_no_eviction)
        if problem:
            raise SystemExit(f"case {label}: {problem}")
        peak_blocks, peak_head_blocks = measured["peak_blocks"], measured["peak_head_blocks"]
        results.append(
            {
                **spec,
                **measured,
                "mode": args.mode,
                "block_bytes": block_bytes,
                "head_block_bytes": geometry.head_block_bytes(args.block_size),
                "peak_kv_bytes": er.kv_bytes_held(
                    policy, geometry, args.block_size, peak_blocks, peak_head_blocks
                ),
                "peak_reserved_kv_bytes": peak_blocks * block_bytes,
            }
        )

    setting = (
        f"{args.mode} mode, model {args.model}, {args.num_requests} requests x "
        f"({args.prompt_len} prompt + {args.output_len} generated) tokens"
        + (f", {concurrency} concurrent streaming clients" if args.mode == "http" else "")
        + (f", tensor parallel {tp}" if tp > 1 else "")
        + f", ignore_eos, greedy, eager, bf16, block size {args.block_size}, "
        f"no prefix caching, no chunked prefill, max {args.max_num_seqs} running, KV memory "
        f"{num_blocks - 1} blocks = {(num_blocks - 1) * block_bytes / 2**20:.1f} MiB "
        f"(= {args.memory_requests:g} full-length requests), "
        f"total wall time {time.perf_counter() - started:.0f} s"
    )
    payload = {"setting": setting, "mode": args.mode, "cases": results}
    markdown = report(args, results, setting)
    cli.publish(args, "throughput", payload, markdown, _plot(results, args.mode))


if __name__ == "__main__":
    main()
