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
import json
import math
import os
import statistics
import sys
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
    engine_settings,
    kv_bytes_held,
    open_engine,
    parse_case,
    positive_int,
    prompt_tokens,
    report_progress,
    report_result,
    run_worker,
)
from benchmarks.common.results import markdown_table, write_results  # noqa: E402

#: Policies that keep every entry (never evict).
NON_EVICTING = ("none", "full")
WARMUP_PROMPT_LEN = 32
WARMUP_OUTPUT_LEN = 4


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
        "--cases",
        nargs="+",
        type=parse_case,
        default=[("none", None), ("crystal", 256), ("crystal", 1024)],
        help="cases to run, each 'none' or POLICY:BUDGET, BUDGET = KV entries kept per "
        "(layer, KV head) (default: none crystal:256 crystal:1024)",
    )
    parser.add_argument(
        "--contexts",
        nargs="+",
        type=positive_int,
        default=[512, 1024, 2048, 4096, 8128],
        help="prompt lengths in tokens; the largest plus --output-len must fit the model's "
        "context (default: 512 1024 2048 4096 8128, for SmolLM2's 8192 with 64 new tokens)",
    )
    parser.add_argument(
        "--output-len",
        type=positive_int,
        default=64,
        help="tokens generated per request, ignore_eos; >= 2 so that decode is timed (default 64)",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=3,
        help="measurements per (case, context); the median is reported (default 3)",
    )
    parser.add_argument(
        "--block-size",
        type=block_size_arg,
        default=32,
        help="KV block size in tokens, a multiple of 32 (default 32)",
    )
    parser.add_argument(
        "--name",
        default="latency",
        help="result file name suffix: <date>_<machine>_<name>.{json,md,png} (default: latency)",
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
        help="internal: run one case from its JSON spec and print its result",
    )
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


def _timed_request(parts: EngineParts, req_id: str, tokens: list[int], params: Any) -> dict:
    """Run one request alone; its timing and the KV it held at most (blocks, head-blocks).

    Besides wall time, the process's CPU time is timed: the engine runs in this process on
    one thread, so CPU time per token is what a token costs regardless of other jobs
    competing for the cores, which wall time is not.
    """
    from vllm.inputs import TokensPrompt

    start, cpu_start = time.perf_counter(), time.process_time()
    parts.engine.add_request(req_id, TokensPrompt(prompt_token_ids=tokens), params)
    first = cpu_first = None
    peak_blocks = peak_head_blocks = 0
    while parts.engine.has_unfinished_requests():
        outputs = parts.engine.step()
        now, cpu_now = time.perf_counter(), time.process_time()
        peak_blocks = max(peak_blocks, parts.blocks_in_use())
        summary = parts.cache_summary()
        if summary is not None:
            peak_head_blocks = max(peak_head_blocks, summary["head_blocks_in_use"])
        for out in outputs:
            if first is None and out.outputs[0].token_ids:
                first, cpu_first = now, cpu_now
            if out.finished:
                timing = RequestTiming(start, first, now, len(out.outputs[0].token_ids))
                cpu = RequestTiming(cpu_start, cpu_first, cpu_now, timing.output_tokens)
    return {
        "ttft_s": timing.ttft,
        "tpot_s": timing.tpot,
        "cpu_ttft_s": cpu.ttft,
        "cpu_tpot_s": cpu.tpot,
        "peak_blocks": peak_blocks,
        "peak_head_blocks": peak_head_blocks if parts.cache is not None else None,
    }


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Warm up once, then time every context ``repeats`` times, counting evictions."""
    from vllm import SamplingParams

    parts = EngineParts.of(open_engine(spec))
    vocab = spec["vocab_size"]
    warmup = SamplingParams(temperature=0.0, max_tokens=WARMUP_OUTPUT_LEN, ignore_eos=True)
    _timed_request(parts, "warmup", prompt_tokens(0, WARMUP_PROMPT_LEN, vocab), warmup)
    params = SamplingParams(temperature=0.0, max_tokens=spec["output_len"], ignore_eos=True)

    def evictions() -> int | None:
        summary = parts.cache_summary()
        return None if summary is None else summary["evictions"]

    measurements = []
    for context in spec["contexts"]:
        before = evictions()
        runs = []
        for r in range(spec["repeats"]):
            tokens = prompt_tokens(r, context, vocab)
            runs.append(_timed_request(parts, f"{context}-{r}", tokens, params))
            report_progress()
        after = evictions()
        measurements.append(
            {
                "context": context,
                "runs": runs,
                "evictions": None if after is None else after - before,
            }
        )
    return {"ops": parts.ops_impl(), "torch_threads": parts.threads(), "measurements": measurements}


# -- the driver ----------------------------------------------------------------------------


def summarize(
    policy: str, measurement: dict[str, Any], geometry: KVGeometry, block_size: int
) -> dict[str, Any]:
    """Medians over a (case, context)'s repeats and the KV bytes held at the peak."""
    runs = measurement["runs"]
    tpot = statistics.median(r["tpot_s"] for r in runs)
    cpu_tpot = statistics.median(r["cpu_tpot_s"] for r in runs)
    held = kv_bytes_held(
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

    def ratio(m: dict[str, Any], key: str) -> float:
        return m[key] / base[m["context"]][key] if m["context"] in base else math.nan

    rows = []
    for r in results:
        for m in r["contexts"]:
            rows.append(
                [
                    case_label(r["policy"], r["budget"]),
                    m["context"],
                    m["decode_tok_s"],
                    ratio(m, "decode_tok_s"),
                    m["tpot_median_s"] * 1000,
                    m["cpu_decode_tok_s"],
                    ratio(m, "cpu_decode_tok_s"),
                    m["ttft_median_s"],
                    m["peak_kv_bytes"] / 2**20,
                    "n/a" if m["evictions"] is None else m["evictions"],
                    "{:.1f} / {:.1f}".format(*r["load_avg_1m"]),
                ]
            )
    headers = [
        "case",
        "context",
        "decode tok/s (wall)",
        "x none",
        "TPOT ms (wall)",
        "decode tok per CPU-s",
        "x none",
        "TTFT s (wall)",
        "KV MiB held (peak)",
        "evictions",
        "load avg start / end",
    ]
    return (
        f"# Decode speed vs context (single request)\n\n{setting}\n\n"
        + markdown_table(headers, rows, 2)
        + "\nMedians over the repeats. Decode excludes the prefill (first token to last). "
        "Per CPU-s: the same tokens over the engine process's CPU time (one thread), which "
        "other jobs on the machine inflate far less than wall time. KV held: head-blocks in "
        "use x bytes per head-block for a policy, vLLM blocks in use x bytes per block for "
        "none. Evictions: over all repeats of that context. Load avg: the machine's 1-minute "
        f"load average when the case started and ended ({os.cpu_count()} cores).\n"
    )


def _plot(results: list[dict[str, Any]]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("decode_tok_s", "decode tokens / s (wall)"),
        ("cpu_decode_tok_s", "decode tokens / CPU-s"),
        ("ttft_median_s", "TTFT s (wall)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 3.8))
    for ax, (key, ylabel) in zip(axes, panels, strict=True):
        for r in results:
            contexts = [m["context"] for m in r["contexts"]]
            label = case_label(r["policy"], r["budget"])
            ax.plot(contexts, [m[key] for m in r["contexts"]], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (prompt tokens)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.legend()
    fig.suptitle("Single-request decode speed vs context (medians)")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker is not None:
        report_result(run_case(json.loads(args.worker)))
        return

    from crystal_vllm.models import MODEL_NAMES, prepare_model

    model = prepare_model(args.model) if args.model in MODEL_NAMES else Path(args.model)
    geometry = KVGeometry.from_model_dir(model)
    contexts = sorted(set(args.contexts))
    problem = check_lengths(contexts, args.output_len, geometry.max_context)
    if problem:
        parser.error(problem)
    max_model_len = contexts[-1] + args.output_len
    block_bytes = geometry.block_bytes(args.block_size)
    num_blocks = -(-max_model_len // args.block_size) + 1  # one longest request + null block
    from tqdm import tqdm
    from transformers import AutoTokenizer

    vocab_size = AutoTokenizer.from_pretrained(model).vocab_size

    started = time.perf_counter()
    results = []
    for policy, budget in tqdm(args.cases, desc="cases", unit="case"):
        label = case_label(policy, budget)
        spec = {
            "model": str(model),
            "policy": policy,
            "budget": budget,
            "contexts": contexts,
            "output_len": args.output_len,
            "repeats": args.repeats,
            "vocab_size": vocab_size,
            "kv_bytes": num_blocks * block_bytes,
            "engine": engine_settings(max_model_len, args.block_size, max_num_seqs=1),
        }
        case_start, load_start = time.perf_counter(), os.getloadavg()[0]
        measured = run_worker(Path(__file__), spec, label, len(contexts) * args.repeats)
        for m in measured["measurements"]:
            if policy not in NON_EVICTING and m["context"] > budget and not m["evictions"]:
                raise SystemExit(
                    f"case {label}: context {m['context']} > budget {budget} but it evicted "
                    "nothing: compression did not run"
                )
        results.append(
            {
                **spec,
                "ops": measured["ops"],
                "torch_threads": measured["torch_threads"],
                "contexts": [
                    {**summarize(policy, m, geometry, args.block_size), "runs": m["runs"]}
                    for m in measured["measurements"]
                ],
                "case_wall_s": time.perf_counter() - case_start,
                "load_avg_1m": [load_start, os.getloadavg()[0]],
            }
        )

    walls = ", ".join(
        f"{case_label(r['policy'], r['budget'])} {r['case_wall_s']:.0f} s" for r in results
    )
    setting = (
        f"model {args.model}, one request at a time, {args.output_len} generated tokens "
        f"(ignore_eos, greedy) after a prompt of each context, median of {args.repeats} "
        f"repeats after a warm-up request; eager, bf16, block size {args.block_size}, no "
        "prefix caching, no chunked prefill, KV memory for one request of the longest "
        f"context ({(num_blocks - 1) * block_bytes / 2**20:.1f} MiB); wall time "
        f"{time.perf_counter() - started:.0f} s ({walls})"
    )
    markdown = report(results, setting)
    paths = write_results(
        args.name,
        {"setting": setting, "cases": results},
        markdown,
        _plot(results),
        args.results_dir,
    )
    print(markdown)
    print(f"results: {paths.json} {paths.markdown} {paths.png}")


if __name__ == "__main__":
    main()
