"""Single-request decode speed vs context length: vanilla vLLM vs KV policies.

One request at a time: a prompt of C deterministic tokens, then ``--output-len`` tokens
with ``ignore_eos``. TTFT (the prefill) is reported apart; decode speed is the time from
the first token to the last divided by the tokens after the first, so it excludes the
prefill. Each case runs in a fresh subprocess with an in-process engine (the same flags on
every side: eager, bf16, block size, no prefix caching, no chunked prefill, KV memory for
one request of the longest context); each (case, context) is measured ``--repeats`` times
after one warm-up request and the median is reported.

A policy keeps at most its budget per (layer, KV head), so its decode reads a bounded KV
cache while vanilla vLLM reads the whole context: the gap should grow with the context.

Example:
    python benchmarks/latency.py --model smollm2 --cases none crystal:256 crystal:1024 \\
        --contexts 512 1024 2048 4096 8128 --output-len 64 --repeats 3
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import cli  # noqa: E402
from benchmarks.common import engine_runs as er  # noqa: E402
from benchmarks.common.results import record_table  # noqa: E402

#: Policies that keep every entry (never evict).
NON_EVICTING = ("none", "full")
WARMUP_PROMPT_LEN = 32
WARMUP_OUTPUT_LEN = 4


def build_parser() -> argparse.ArgumentParser:
    parser = cli.script_parser(__doc__)
    # The context is the prompt: "evict" compresses it to the budget, which is what this
    # benchmark measures (decode speed over a long context held at the budget).
    er.add_case_args(
        parser,
        "none crystal:256 crystal:1024",
        output_len=64,
        kv_policy_config='{"prompt": "evict"}',
    )
    parser.add_argument(
        "--contexts",
        nargs="+",
        type=cli.positive_int,
        default=[512, 1024, 2048, 4096, 8128],
        help="prompt lengths in tokens; the largest plus --output-len must fit the model's "
        "context (default: 512 1024 2048 4096 8128, for SmolLM2's 8192 with 64 new tokens)",
    )
    parser.add_argument(
        "--repeats",
        type=cli.positive_int,
        default=3,
        help="measurements per (case, context); the median is reported (default 3)",
    )
    cli.add_output_args(parser, "latency", worker=True)
    return parser


def check_lengths(contexts: list[int], output_len: int, max_context: int) -> str | None:
    """Why these lengths cannot run on a model with ``max_context`` tokens, or None."""
    if output_len < 2:
        return f"--output-len {output_len} is invalid: decode needs >= 2 tokens to be timed"
    longest = max(contexts)
    if longest + output_len > max_context:
        return (
            f"context {longest} + output {output_len} = {longest + output_len} tokens exceeds "
            f"the model's {max_context}-token context; with --output-len {output_len} the "
            f"largest context allowed is {max_context - output_len}"
        )
    return None


# -- one case, inside a fresh process ------------------------------------------------------


def _timed_request(engine: er.Engine, req_id: str, tokens: list[int], max_tokens: int) -> dict:
    """Run one request alone; its timing and the KV it held at most (blocks, head-blocks).

    Besides wall time, the process's CPU time is timed: the engine runs in this process on
    one thread, so CPU time per token is what a token costs regardless of other jobs
    competing for the cores, which wall time is not.
    """
    start, cpu_start = engine.wall(), engine.cpu()
    engine.add(req_id, tokens, max_tokens)
    first = cpu_first = None
    peak_blocks = peak_head_blocks = 0
    while engine.engine.has_unfinished_requests():
        outputs = engine.engine.step()
        now, cpu_now = engine.wall(), engine.cpu()
        blocks, head_blocks = engine.read()
        peak_blocks = max(peak_blocks, blocks)
        peak_head_blocks = max(peak_head_blocks, head_blocks or 0)
        for out in outputs:
            if first is None and out.outputs[0].token_ids:
                first, cpu_first = now, cpu_now
            if out.finished:
                timing = er.RequestTiming(start, first, now, len(out.outputs[0].token_ids))
                cpu = er.RequestTiming(cpu_start, cpu_first, cpu_now, timing.output_tokens)
    return {
        "ttft_s": timing.ttft,
        "tpot_s": timing.tpot,
        "cpu_ttft_s": cpu.ttft,
        "cpu_tpot_s": cpu.tpot,
        "peak_blocks": peak_blocks,
        "peak_head_blocks": None if engine.policy == "none" else peak_head_blocks,
    }


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Warm up once, then time every context ``repeats`` times, counting evictions."""
    engine = er.Engine(spec)
    vocab = spec["vocab_size"]
    warmup = er.prompt_tokens(0, WARMUP_PROMPT_LEN, vocab)
    _timed_request(engine, "warmup", warmup, WARMUP_OUTPUT_LEN)
    measurements = []
    for context in spec["contexts"]:
        before = engine.evictions()
        runs = []
        for r in range(spec["repeats"]):
            tokens = er.prompt_tokens(r, context, vocab)
            runs.append(_timed_request(engine, f"{context}-{r}", tokens, spec["output_len"]))
            er.report_progress()
        after = engine.evictions()
        evictions = None if after is None else after - before
        measurements.append({"context": context, "runs": runs, "evictions": evictions})
    return {**engine.info(), "measurements": measurements}


# -- the driver ----------------------------------------------------------------------------


def summarize(
    policy: str, measurement: dict[str, Any], geometry: er.KVGeometry, block_size: int
) -> dict[str, Any]:
    """Medians over a (case, context)'s repeats and the KV bytes held at the peak."""
    runs = measurement["runs"]
    tpot = statistics.median(r["tpot_s"] for r in runs)
    cpu_tpot = statistics.median(r["cpu_tpot_s"] for r in runs)
    held = er.kv_bytes_held(
        policy,
        geometry,
        block_size,
        max(r["peak_blocks"] for r in runs),
        None if policy == "none" else max(r["peak_head_blocks"] for r in runs),
    )
    return {
        "context": measurement["context"],
        "ttft_median_s": statistics.median(r["ttft_s"] for r in runs),
        "tpot_median_s": tpot,
        "decode_tok_s": 1.0 / tpot,
        "cpu_tpot_median_s": cpu_tpot,
        "cpu_decode_tok_s": 1.0 / cpu_tpot,
        "peak_kv_bytes": held,
        "evictions": measurement["evictions"],
    }


def report(results: list[dict[str, Any]], setting: str) -> str:
    base = {m["context"]: m for r in results if r["policy"] == "none" for m in r["contexts"]}

    def x_none(key: str) -> Callable[[dict[str, Any]], float]:
        return lambda m: m[key] / base[m["context"]][key] if m["context"] in base else math.nan

    rows = [{**r, **m} for r in results for m in r["contexts"]]
    columns = [
        ("case", er.label_of),
        ("context", "context"),
        ("decode tok/s (wall)", "decode_tok_s"),
        ("x none", x_none("decode_tok_s")),
        ("TPOT ms (wall)", lambda m: m["tpot_median_s"] * 1000),
        ("decode tok per CPU-s", "cpu_decode_tok_s"),
        ("x none", x_none("cpu_decode_tok_s")),
        ("TTFT s (wall)", "ttft_median_s"),
        ("KV MiB held (peak)", lambda m: m["peak_kv_bytes"] / 2**20),
        ("evictions", "evictions"),
        ("load avg start / end", er.load_avg_cell),
    ]
    return (
        f"# Decode speed vs context (single request)\n\n{setting}\n\n"
        + record_table(rows, columns, 2)
        + "\nMedians over the repeats. Decode excludes the prefill (first token to last). "
        "Per CPU-s: the same tokens over the engine process's CPU time (one thread), which "
        "other jobs on the machine inflate far less than wall time. KV held: head-blocks in "
        "use x bytes per head-block for a policy, vLLM blocks in use x bytes per block for "
        "none. Evictions: over all repeats of that context. Load avg: the machine's 1-minute "
        f"load average when the case started and ended ({os.cpu_count()} cores).\n"
    )


def _plot(results: list[dict[str, Any]]):
    panels = [
        ("decode_tok_s", "decode tokens / s (wall)"),
        ("cpu_decode_tok_s", "decode tokens / CPU-s"),
        ("ttft_median_s", "TTFT s (wall)"),
    ]
    title = "Single-request decode speed vs context (medians)"
    fig, axes = cli.subplots(title, len(panels), figsize=(14, 3.8))
    for ax, (key, ylabel) in zip(axes, panels, strict=True):
        for r in results:
            contexts = [m["context"] for m in r["contexts"]]
            label = er.case_label(r["policy"], r["budget"])
            ax.plot(contexts, [m[key] for m in r["contexts"]], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (prompt tokens)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.legend()
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = er.parse_or_work(parser, argv, run_case)

    model, geometry, vocab_size = er.model_geometry(args.model)
    contexts = sorted(set(args.contexts))
    problem = check_lengths(contexts, args.output_len, geometry.max_context)
    if problem:
        parser.error(problem)
    max_model_len = contexts[-1] + args.output_len
    block_bytes = geometry.block_bytes(args.block_size)
    num_blocks = -(-max_model_len // args.block_size) + 1  # one longest request + null block

    engine = er.engine_settings(max_model_len, args.block_size, max_num_seqs=1)
    shared = {"contexts": contexts, "repeats": args.repeats, "engine": engine}
    started = time.perf_counter()
    results = []
    for policy, budget in er.progress(args.cases):
        label = er.case_label(policy, budget)
        spec = er.case_spec(
            model, (policy, budget), args, vocab_size, kv_bytes=num_blocks * block_bytes, **shared
        )
        total = len(contexts) * args.repeats
        measured = er.measure_case(er.run_worker, Path(__file__), spec, label, total)
        for m in measured["measurements"]:
            evicts_prompt = args.kv_policy_config.get("prompt") == "evict"
            if (
                evicts_prompt
                and policy not in NON_EVICTING
                and m["context"] > budget
                and not m["evictions"]
            ):
                raise SystemExit(
                    f"case {label}: context {m['context']} > budget {budget} but it evicted "
                    "nothing: compression did not run"
                )
        results.append(
            {
                **spec,
                **{k: v for k, v in measured.items() if k != "measurements"},
                "contexts": [
                    {**summarize(policy, m, geometry, args.block_size), "runs": m["runs"]}
                    for m in measured["measurements"]
                ],
            }
        )

    walls = ", ".join(
        f"{er.case_label(r['policy'], r['budget'])} {r['case_wall_s']:.0f} s" for r in results
    )
    setting = (
        f"model {args.model}, one request at a time, {args.output_len} generated tokens "
        f"(ignore_eos, greedy) after a prompt of each context, median of {args.repeats} "
        f"repeats after a warm-up request; eager, bf16, block size {args.block_size}, no "
        "prefix caching, no chunked prefill, KV memory for one request of the longest "
        f"context ({(num_blocks - 1) * block_bytes / 2**20:.1f} MiB); wall time "
        f"{time.perf_counter() - started:.0f} s ({walls})"
    )
    payload = {"setting": setting, "cases": results}
    cli.publish(args, "latency", payload, report(results, setting), _plot(results))


if __name__ == "__main__":
    main()
