"""Prefix caching under a shared system prompt, and chunked prefill's effect on the other
requests' inter-token latency, measured against live ``vllm serve`` servers.

Two experiments (``--experiments shared chunked``), each case on a server of its own,
every server started with the same flags (eager, ``--dtype``, ``--block-size``,
``--max-model-len``, ``--seed``, ``--enable-prefix-caching``) except ``--kv-policy``,
``--kv-budget`` and ``--kv-policy-config`` (``--kv-policy none`` for vanilla):

A. shared: ``--shared-requests`` GSM8K questions behind one system prompt of worked GSM8K
   examples (about ``--system-tokens`` tokens; the examples are the last problems of the
   test file, the questions start at ``--question-offset``, so they never overlap), chat-
   templated and sent as token ids to /v1/completions (``--shared-output-len`` greedy
   tokens each, ignore_eos, ``--shared-concurrency`` in flight; chunked prefill off).
   One warm-up request (the system prompt and the next GSM8K question) runs first, alone,
   so the prefix is cached before the measured requests; it is reported apart. Per case:
   whether the server really has prefix caching on (vLLM's ``vllm:cache_config_info`` and
   the plugin's log line; the plugin turns it off while a policy is active), the
   prefix-cache hit rate of the measured requests (``vllm:prefix_cache_hits`` /
   ``vllm:prefix_cache_queries``, tokens, read before and after), mean and median TTFT,
   output tok/s, and the peak KV in use (vLLM's ``vllm:kv_cache_usage_perc`` x its usable
   blocks, and the policy's ``crystal_kv:head_blocks_in_use``, polled).

B. chunked: ``--short-requests`` short requests (GSM8K questions, chat-templated) decode;
   once each has streamed ``--short-warmup-tokens`` tokens, one long prompt of
   ``--long-prompt-len`` tokens (GSM8K questions run together) arrives, asking for
   ``--long-output-len`` tokens. The short requests are cancelled ``--tail-s`` seconds after
   the long one ends. Each policy case runs with chunked prefill on
   (``--enable-chunked-prefill --max-num-batched-tokens --chunk-tokens``) and off
   (``--no-enable-chunked-prefill``, max-num-batched-tokens = --max-model-len). Reported:
   the long request's TTFT, and the short requests' gaps between streamed chunks (their
   inter-token latency) that overlap the long prompt's prefill (from its arrival to its
   first token): mean, p50, p99 and max, next to the same before it arrived. The PNG
   plots every short request's token arrivals with the long prompt's arrival and first
   token marked.

Results: benchmarks/results/<date>_<machine>_prefix_chunked[_<name>].{json,md,png}.

Example (the committed smollm2 run, about 20 minutes on 2 CPU cores):
    python benchmarks/prefix_chunked.py --model smollm2 --dtype float32 \\
        --cases none crystal:64 --shared-requests 32 --system-tokens 1500 \\
        --long-prompt-len 8000 --short-requests 8
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import cli  # noqa: E402
from benchmarks.common import engine_runs as er  # noqa: E402
from benchmarks.common.results import record_table  # noqa: E402

NAME = "prefix_chunked"
DEFAULT_CASES = "none crystal:64"
EXPERIMENTS = ("shared", "chunked")
CHUNK_MODES = ("on", "off")

#: Tokens of --max-model-len beyond the longest request (prompt + output).
MODEL_LEN_SLACK = 32

PREFIX_QUERIES = "vllm:prefix_cache_queries"
PREFIX_HITS = "vllm:prefix_cache_hits"
HEAD_BLOCKS = "crystal_kv:head_blocks_in_use"

#: What the plugin logs when it turns prefix caching off (crystal_vllm/vllm_ext/platform.py).
PREFIX_OFF_LINE = "crystal-vllm: prefix caching is off"


# -- arguments -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = cli.script_parser(__doc__)
    cli.add_model_arg(parser)
    parser.add_argument(
        "--cases",
        nargs="+",
        type=er.parse_case,
        default=[er.parse_case(c) for c in DEFAULT_CASES.split()],
        help="cases, each 'none' or POLICY:BUDGET (BUDGET = KV entries kept per (layer, KV "
        f"head)); every experiment runs every case (default: {DEFAULT_CASES})",
    )
    parser.add_argument(
        "--kv-policy-config",
        type=er.json_object,
        default={"prompt": "keep"},
        help='JSON --kv-policy-config of every case but none (default: {"prompt": "keep"}: '
        "prompt entries are never evicted, the only mode where sharing prompt blocks is "
        "meaningful)",
    )
    parser.add_argument(
        "--experiments",
        nargs="+",
        choices=EXPERIMENTS,
        default=list(EXPERIMENTS),
        help="shared: A, the shared system prompt and prefix caching; chunked: B, a long "
        "prompt's prefill against decoding requests (default: both)",
    )
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default="float32",
        help="every server's dtype (default float32: several times faster than bf16 on CPUs "
        "without AVX-512 bf16)",
    )
    parser.add_argument(
        "--block-size",
        type=er.block_size_arg,
        default=32,
        help="KV block size in tokens, a multiple of 32; vLLM caches prefixes in whole blocks "
        "(default 32)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="every server's --seed (default 0; decoding is greedy)"
    )
    shared = parser.add_argument_group("A: shared system prompt")
    cli.add_counts(
        shared,
        ("--shared-requests", 32, "measured requests, each a different GSM8K question"),
        (
            "--system-tokens",
            1500,
            "the system prompt's length to reach, in tokens: worked "
            "examples are added until it is at least this long",
        ),  # fmt: skip
        ("--shared-output-len", 32, "tokens generated per request, greedy, ignore_eos"),
        ("--shared-concurrency", 8, "requests in flight at once (also --max-num-seqs)"),
    )
    shared.add_argument(
        "--question-offset",
        type=int,
        default=0,
        help="index of the first GSM8K test question asked; the warm-up asks the one after "
        "the last measured question (default 0)",
    )
    chunked = parser.add_argument_group("B: chunked prefill and inter-token latency")
    cli.add_counts(
        chunked,
        (
            "--long-prompt-len",
            8000,
            "tokens of the long prompt (prompt + --long-output-len + "
            f"{MODEL_LEN_SLACK} must fit the model's context: 8192 for smollm2)",
        ),  # fmt: skip
        ("--long-output-len", 8, "tokens the long request generates"),
        ("--short-requests", 8, "short requests decoding when the long prompt arrives"),
        (
            "--short-warmup-tokens",
            8,
            "tokens every short request has streamed before the long prompt is sent",
        ),  # fmt: skip
        ("--chunk-tokens", 512, "--max-num-batched-tokens with chunked prefill on"),
    )
    chunked.add_argument(
        "--short-max-tokens",
        type=cli.positive_int,
        default=None,
        help="max_tokens of a short request (ignore_eos); they are cancelled --tail-s after "
        "the long request ends, so this only has to outlast it (default: as many as fit "
        "--max-model-len after the longest short prompt)",
    )
    chunked.add_argument(
        "--chunk-modes",
        nargs="+",
        choices=CHUNK_MODES,
        default=list(CHUNK_MODES),
        help="chunked prefill on (--enable-chunked-prefill --max-num-batched-tokens "
        "--chunk-tokens) and/or off (--no-enable-chunked-prefill, --max-num-batched-tokens "
        "= --max-model-len) (default: on off)",
    )
    chunked.add_argument(
        "--tail-s",
        type=cli.positive_float,
        default=2.0,
        help="seconds the short requests keep decoding after the long request ends, before "
        "they are cancelled (default 2)",
    )
    run = parser.add_argument_group("running")
    run.add_argument(
        "--poll-interval",
        type=cli.positive_float,
        default=0.25,
        help="seconds between two reads of a server's /metrics (default 0.25)",
    )
    run.add_argument(
        "--startup-timeout",
        type=cli.positive_float,
        default=900.0,
        help="seconds a server may take to become healthy (default 900)",
    )
    run.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        help="keep every server's log here (default: a temporary folder, deleted after)",
    )
    cli.add_output_args(parser, NAME)
    return parser


# -- flags ---------------------------------------------------------------------------------


def serve_flags(
    policy: str,
    budget: int | None,
    policy_config: dict[str, Any] | None,
    *,
    block_size: int,
    max_model_len: int,
    max_num_seqs: int,
    dtype: str,
    seed: int,
    chunked: bool,
    max_num_batched_tokens: int,
) -> list[str]:
    """``vllm serve`` flags of a case: the shared engine flags with prefix caching on and
    chunked prefill as asked, then the policy's (``--kv-policy none`` for vanilla)."""
    from benchmarks.common.server import policy_flags

    engine = er.engine_settings(max_model_len, block_size, max_num_seqs, dtype=dtype)
    engine.update(
        enable_prefix_caching=True,
        enable_chunked_prefill=chunked,
        max_num_batched_tokens=max_num_batched_tokens,
        seed=seed,
    )
    flags = er.cli_flags(engine)
    if policy == "none":
        return flags + ["--kv-policy", "none"]
    return flags + policy_flags(policy, budget, policy_config)


# -- prompts -------------------------------------------------------------------------------


def pick_examples(problems: Sequence[Any], count_tokens, target: int, reserved: int) -> list:
    """Worked examples from the end of ``problems`` backwards, added until
    ``count_tokens(examples)`` reaches ``target``; never one of the first ``reserved``
    problems (the questions asked). ``ValueError`` when there are too few."""
    examples: list = []
    for problem in reversed(problems[reserved:]):
        examples.append(problem)
        if count_tokens(examples) >= target:
            return examples
    raise ValueError(
        f"the examples left after {reserved} questions make fewer than {target} tokens"
    )


def long_prompt(tokenizer: Any, questions: Sequence[str], length: int) -> list[int]:
    """``length`` token ids of the questions run together (repeated if need be)."""
    ids: list[int] = []
    while len(ids) < length:
        before = len(ids)
        for q in questions:
            ids += tokenizer.encode(q.strip() + "\n\n", add_special_tokens=False)
            if len(ids) >= length:
                break
        if len(ids) == before:
            raise ValueError("the questions encode to no tokens")
    return ids[:length]


def chat_ids(tokenizer: Any, question: str, system_prompt: str | None = None) -> list[int]:
    from benchmarks.common.prompts import SYSTEM_PROMPT, render_prompt

    text = render_prompt(tokenizer, question, system_prompt or SYSTEM_PROMPT)
    return tokenizer.encode(text, add_special_tokens=False)


def common_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens every prompt starts with."""
    first = prompts[0]
    n = len(first)
    for p in prompts[1:]:
        n = min(n, len(p))
        n = next((i for i in range(n) if p[i] != first[i]), n)
    return n


# -- /metrics ------------------------------------------------------------------------------


def metric_total(text: str, name: str) -> float | None:
    """Sum of every sample of ``name`` (a counter's ``_total`` too); None when absent."""
    from benchmarks.common.http_load import metric_samples

    samples = metric_samples(text, name) + metric_samples(text, name + "_total")
    return sum(value for _, value in samples) if samples else None


def read_reading(text: str) -> dict[str, float | None]:
    """The numbers this script tracks in one /metrics page."""
    from benchmarks.common.http_load import KV_USAGE

    return {
        "prefix_queries": metric_total(text, PREFIX_QUERIES),
        "prefix_hits": metric_total(text, PREFIX_HITS),
        "kv_usage": metric_total(text, KV_USAGE),
        "head_blocks": metric_total(text, HEAD_BLOCKS),
    }


def prefix_caching_state(metrics_text: str, log_text: str) -> dict[str, Any]:
    """Whether the server runs with prefix caching: vLLM's ``cache_config_info`` label and
    whether the plugin logged that it turned it off."""
    from benchmarks.common.http_load import CACHE_INFO, metric_samples

    label = next(
        (
            labels.get("enable_prefix_caching")
            for labels, _ in metric_samples(metrics_text, CACHE_INFO)
        ),
        None,
    )
    return {
        "enabled": None if label is None else label == "True",
        "plugin_turned_off": PREFIX_OFF_LINE in log_text,
    }


def hit_rate(before: dict, after: dict) -> dict[str, Any]:
    """Prefix-cache queries and hits (tokens) between two readings, and their ratio."""
    if before["prefix_queries"] is None or after["prefix_queries"] is None:
        return {"queries": None, "hits": None, "hit_rate": None}
    queries = after["prefix_queries"] - before["prefix_queries"]
    hits = (after["prefix_hits"] or 0.0) - (before["prefix_hits"] or 0.0)
    return {"queries": queries, "hits": hits, "hit_rate": hits / queries if queries else None}


def peak_kv(samples: Sequence[dict], usable_blocks: int, heads: int) -> dict[str, Any]:
    """Peak vLLM blocks in use (usage x usable blocks) and peak head-blocks (and those in
    whole-block equivalents: head-blocks / (layers x KV heads)) over polled readings."""
    usage = max((s["kv_usage"] or 0.0 for s in samples), default=0.0)
    head = [s["head_blocks"] for s in samples if s["head_blocks"] is not None]
    peak_head = max(head) if head else None
    return {
        "peak_kv_usage": usage,
        "peak_blocks": round(usage * usable_blocks),
        "peak_head_blocks": peak_head,
        "peak_head_block_equiv": None if peak_head is None else peak_head / heads,
    }


# -- timing --------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between ranks; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def gap_stats(gaps: Sequence[float]) -> dict[str, float | int]:
    """Count, mean, p50, p99 and max of gaps in seconds (NaN when there are none)."""
    return {
        "n": len(gaps),
        "mean_s": statistics.fmean(gaps) if gaps else math.nan,
        "p50_s": percentile(gaps, 50),
        "p99_s": percentile(gaps, 99),
        "max_s": max(gaps) if gaps else math.nan,
    }


def split_gaps(
    arrivals: Sequence[Sequence[float]], start: float, end: float
) -> tuple[list[float], list[float]]:
    """Gaps between consecutive chunks of each request: those that overlap ``[start,
    end]`` (a gap from t0 to t1 with t1 > start and t0 < end) and those that end by
    ``start`` (before the interval)."""
    during, before = [], []
    for times in arrivals:
        for t0, t1 in zip(times, times[1:], strict=False):
            if t1 <= start:
                before.append(t1 - t0)
            elif t0 < end:
                during.append(t1 - t0)
    return during, before


# -- the server ----------------------------------------------------------------------------


@contextlib.contextmanager
def case_server(spec: dict[str, Any], log_path: Path, startup_timeout: float):
    """A started server and what it says about itself: usable blocks, prefix caching."""
    import httpx

    from benchmarks.common import server as srv
    from benchmarks.common.http_load import server_num_blocks

    with srv.policy_server(
        spec["model"], spec["serve_flags"], log_path, startup_timeout=startup_timeout
    ) as server:
        text = httpx.get(f"{server.base_url}/metrics", timeout=30).text
        info = {
            "num_blocks": server_num_blocks(text),
            "prefix_caching": prefix_caching_state(text, log_path.read_text(errors="replace")),
        }
        yield server, info


def get_reading(base_url: str) -> dict[str, float | None]:
    import httpx

    return read_reading(httpx.get(f"{base_url}/metrics", timeout=30).text)


async def _timed_request(client, model: str, prompt: list[int], max_tokens: int) -> dict:
    """One streamed request: when it was sent and its chunk arrivals (absolute)."""
    from benchmarks.common.http_load import stream_events

    events: list[tuple[float, int]] = []
    start = time.perf_counter()
    reported = await stream_events(client, model, prompt, max_tokens, events)
    carrying = [(t, n) for t, n in events if n > 0]
    tokens = sum(n for _, n in carrying)
    if not carrying or (reported is not None and reported != tokens) or tokens != max_tokens:
        raise RuntimeError(f"asked for {max_tokens} tokens, the stream carried {tokens}")
    return {"start": start, "first": carrying[0][0], "end": carrying[-1][0], "tokens": tokens}


def _client(base_url: str):
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=3600.0, max_retries=0)


async def _polled(base_url: str, interval: float, body):
    """Run ``await body()`` while polling /metrics; its result and the readings as
    ``(seconds since the start, reading)``."""
    import httpx

    from benchmarks.common.http_load import poll_metrics

    readings: list = []
    stop = asyncio.Event()
    async with httpx.AsyncClient(timeout=30.0) as http:
        poller = asyncio.create_task(
            poll_metrics(
                http, f"{base_url}/metrics", interval, time.perf_counter(), stop, readings,
                parse=read_reading,
            )
        )  # fmt: skip
        try:
            result = await body()
        finally:
            stop.set()
            await poller
    return result, readings


# -- A: shared system prompt ---------------------------------------------------------------


async def run_shared_load(
    base_url: str, model: str, warmup: list[int], prompts: Sequence[list[int]], args
) -> dict[str, Any]:
    """The warm-up request alone, then the measured ones under the concurrency limit."""
    async with _client(base_url) as client:
        t = await _timed_request(client, model, warmup, args.shared_output_len)
        warm = {"ttft_s": t["first"] - t["start"]}
        before = await asyncio.to_thread(get_reading, base_url)
        gate = asyncio.Semaphore(args.shared_concurrency)

        async def one(prompt: list[int]) -> dict:
            async with gate:
                return await _timed_request(client, model, prompt, args.shared_output_len)

        async def body():
            return await asyncio.gather(*(one(p) for p in prompts))

        timings, readings = await _polled(base_url, args.poll_interval, body)
        after = await asyncio.to_thread(get_reading, base_url)
    return {"warmup": warm, "timings": timings, "readings": readings, "before": before,
            "after": after}  # fmt: skip


def shared_summary(load: dict[str, Any], usable_blocks: int, heads: int) -> dict[str, Any]:
    timings = load["timings"]
    ttfts = [t["first"] - t["start"] for t in timings]
    t0 = min(t["start"] for t in timings)
    duration = max(t["end"] for t in timings) - t0
    return {
        **hit_rate(load["before"], load["after"]),
        "warmup_ttft_s": load["warmup"]["ttft_s"],
        "mean_ttft_s": statistics.fmean(ttfts),
        "median_ttft_s": statistics.median(ttfts),
        "output_tok_s": sum(t["tokens"] for t in timings) / duration,
        "duration_s": duration,
        **peak_kv([r for _, r in load["readings"]], usable_blocks, heads),
    }


# -- B: a long prompt against decoding requests --------------------------------------------


async def run_chunked_load(
    base_url: str, model: str, shorts: Sequence[list[int]], long: list[int], args
) -> dict[str, Any]:
    """Start the short requests, send the long one once each has streamed
    ``--short-warmup-tokens``, cancel the short ones ``--tail-s`` after it ends."""
    from benchmarks.common.http_load import stream_events

    async with _client(base_url) as client:
        t0 = time.perf_counter()
        streams: list[list[tuple[float, int]]] = [[] for _ in shorts]
        tasks = [
            asyncio.create_task(stream_events(client, model, p, args.short_max_tokens, ev))
            for p, ev in zip(shorts, streams, strict=True)
        ]

        def streamed(ev) -> int:
            return sum(n for _, n in ev)

        while any(streamed(ev) < args.short_warmup_tokens for ev in streams):
            if any(task.done() for task in tasks):
                for task in tasks:
                    if task.done():
                        task.result()  # raises what failed
                raise RuntimeError("a short request ended before the long prompt was sent")
            await asyncio.sleep(0.01)
        long_timing = await _timed_request(client, model, long, args.long_output_len)
        await asyncio.sleep(args.tail_s)
        finished_early = sum(task.done() for task in tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    arrivals = [[t - t0 for t, n in ev if n > 0] for ev in streams]
    tokens = [[n for _, n in ev if n > 0] for ev in streams]
    return {
        "long_sent_s": long_timing["start"] - t0,
        "long_first_s": long_timing["first"] - t0,
        "long_end_s": long_timing["end"] - t0,
        "long_ttft_s": long_timing["first"] - long_timing["start"],
        "short_arrivals": arrivals,
        "short_tokens": tokens,
        "short_finished_early": finished_early,
    }


def chunked_summary(load: dict[str, Any]) -> dict[str, Any]:
    during, before = split_gaps(load["short_arrivals"], load["long_sent_s"], load["long_first_s"])
    chunks = sum(len(a) for a in load["short_arrivals"])
    tokens = sum(sum(t) for t in load["short_tokens"])
    return {
        "long_ttft_s": load["long_ttft_s"],
        "itl_during": gap_stats(during),
        "itl_before": gap_stats(before),
        "short_tokens_per_chunk": tokens / chunks if chunks else math.nan,
        # A short request that streamed nothing during the whole prefill is the worst case
        # the gaps above can miss: it is counted by the gap that spans the window.
        "short_finished_early": load["short_finished_early"],
    }


# -- cases ---------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^\w-]+", "_", text)


def run_case(spec: dict[str, Any], args, log_dir: Path, work: dict[str, Any]) -> dict[str, Any]:
    """Serve one case and run its experiment's load against it."""
    log_path = log_dir / f"{_slug(spec['label'])}.server.log"
    with case_server(spec, log_path, args.startup_timeout) as (server, info):
        usable = (info["num_blocks"] or 1) - 1  # vLLM's null block
        if spec["experiment"] == "shared":
            load = asyncio.run(
                run_shared_load(
                    server.base_url, spec["model"], work["warmup"], work["prompts"], args
                )
            )
            measured = shared_summary(load, usable, work["heads"])
            timeline = [[t, r["kv_usage"] or 0.0, r["head_blocks"]] for t, r in load["readings"]]
            extra = {"kv_timeline": er.downsample(timeline)}
        else:
            load = asyncio.run(
                run_chunked_load(server.base_url, spec["model"], work["shorts"], work["long"], args)
            )
            measured = chunked_summary(load)
            extra = {"stream": load}
    return {**info, "usable_blocks": usable, **measured, **extra}


# -- report --------------------------------------------------------------------------------


def _ms(value: float) -> float:
    return value * 1000


def _prefix_cell(row: dict[str, Any]) -> str:
    state = row["prefix_caching"]
    text = {True: "on", False: "off", None: "unknown"}[state["enabled"]]
    return text + (" (plugin turned it off)" if state["plugin_turned_off"] else "")


def report_shared(rows: Sequence[dict[str, Any]]) -> str:
    columns = [
        ("case", "label"),
        ("prefix caching (server)", _prefix_cell),
        ("hit rate", "hit_rate"),
        (
            "hits / queries (tokens)",
            lambda r: f"{r['hits']:.0f} / {r['queries']:.0f}" if r["queries"] is not None else None,
        ),  # fmt: skip
        ("warm-up TTFT s", "warmup_ttft_s"),
        ("mean TTFT s", "mean_ttft_s"),
        ("median TTFT s", "median_ttft_s"),
        ("output tok/s", "output_tok_s"),
        ("peak KV blocks (vLLM)", "peak_blocks"),
        ("peak KV usage", "peak_kv_usage"),
        ("peak head-blocks (crystal)", "peak_head_blocks"),
        ("= blocks", "peak_head_block_equiv"),
        ("duration s", "duration_s"),
        ("load avg start / end", er.load_avg_cell),
    ]
    return record_table(rows, columns, 3)


def report_chunked(rows: Sequence[dict[str, Any]]) -> str:
    def itl(key: str, stat: str):
        return lambda r: _ms(r[key][stat])

    columns = [
        ("case", "label"),
        ("chunked prefill", "chunk_label"),
        ("long TTFT s", "long_ttft_s"),
        ("ITL during: mean ms", itl("itl_during", "mean_s")),
        ("p50 ms", itl("itl_during", "p50_s")),
        ("p99 ms", itl("itl_during", "p99_s")),
        ("max ms", itl("itl_during", "max_s")),
        ("gaps", lambda r: r["itl_during"]["n"]),
        ("ITL before: mean ms", itl("itl_before", "mean_s")),
        ("p99 ms", itl("itl_before", "p99_s")),
        ("max ms", itl("itl_before", "max_s")),
        ("tokens / chunk", "short_tokens_per_chunk"),
        ("load avg start / end", er.load_avg_cell),
    ]
    return record_table(rows, columns, 1)


def plot(shared: Sequence[dict[str, Any]], chunked: Sequence[dict[str, Any]]):
    panels = (1 if shared else 0) + len(chunked)
    fig, axes = cli.subplots(
        "Prefix caching (KV in use) and a long prompt's prefill against decoding requests",
        max(panels, 1),
        figsize=(5.2 * max(panels, 1), 4.4),
        squeeze=False,
    )
    axes = list(axes[0])
    if shared:
        ax = axes.pop(0)
        for i, r in enumerate(shared):
            times = [t for t, _, _ in r["kv_timeline"]]
            blocks = [u * r["usable_blocks"] for _, u, _ in r["kv_timeline"]]
            ax.step(times, blocks, where="post", color=f"C{i}", label=f"{r['label']} (vLLM blocks)")
            if any(h is not None for _, _, h in r["kv_timeline"]):
                equiv = [(h or 0) / r["heads"] for _, _, h in r["kv_timeline"]]
                ax.step(times, equiv, where="post", color=f"C{i}", linestyle=":",
                        label=f"{r['label']} (head-blocks / heads)")  # fmt: skip
        ax.set_title("A: KV blocks in use, shared system prompt")
        ax.set_xlabel("seconds since the measured requests started")
        ax.set_ylabel("blocks")
        ax.legend(fontsize=7)
    for ax, r in zip(axes, chunked, strict=True):
        stream = r["stream"]
        origin = stream["long_sent_s"]
        for k, times in enumerate(stream["short_arrivals"]):
            ax.plot([t - origin for t in times], [k] * len(times), "|", markersize=6, color=f"C{k}")
        ax.axvline(0.0, color="k", linestyle="--", linewidth=1, label="long prompt sent")
        first = stream["long_first_s"] - origin
        ax.axvline(first, color="r", linestyle="-", linewidth=1, label="its first token")
        ax.axvspan(0.0, first, color="r", alpha=0.08)
        ax.set_title(f"B: {r['label']}, chunked prefill {r['chunk_label']}", fontsize=9)
        ax.set_xlabel("seconds since the long prompt was sent")
        ax.set_ylabel("short request (one tick per streamed chunk)")
        ax.legend(fontsize=7, loc="upper left")
    return fig


# -- the driver ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    from benchmarks.common.datasets import load_gsm8k
    from benchmarks.common.prompts import few_shot_system_prompt

    model, geometry, _ = er.model_geometry(args.model, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(model)
    heads = geometry.num_layers * geometry.num_kv_heads
    problems = load_gsm8k()
    config = args.kv_policy_config or None
    started = time.perf_counter()
    specs: list[tuple[dict[str, Any], dict[str, Any]]] = []
    settings: dict[str, Any] = {}

    if "shared" in args.experiments:
        n, off = args.shared_requests, args.question_offset
        reserved = off + n + 1
        if off < 0 or reserved >= len(problems):
            parser.error(f"--question-offset {off} + --shared-requests {n} leave no examples")

        def count(examples) -> int:
            return len(tokenizer.encode(few_shot_system_prompt(examples), add_special_tokens=False))

        try:
            examples = pick_examples(problems, count, args.system_tokens, reserved)
        except ValueError as exc:
            parser.error(str(exc))
        system = few_shot_system_prompt(examples)
        prompts = [chat_ids(tokenizer, p.question, system) for p in problems[off : off + n]]
        warmup = chat_ids(tokenizer, problems[off + n].question, system)
        shared_len = common_prefix_len([*prompts, warmup])
        max_len = max(map(len, [*prompts, warmup])) + args.shared_output_len + MODEL_LEN_SLACK
        if max_len > geometry.max_context:
            parser.error(
                f"shared prompts need {max_len} tokens, the model has {geometry.max_context}"
            )
        work = {"prompts": prompts, "warmup": warmup, "heads": heads}
        settings["shared"] = {
            "examples": [p.id for p in examples],
            "system_prompt_tokens": count(examples),
            "common_prefix_tokens": shared_len,
            "prompt_tokens": [len(p) for p in prompts],
            "warmup_question": problems[off + n].id,
            "questions": [p.id for p in problems[off : off + n]],
            "max_model_len": max_len,
        }
        for policy, budget in args.cases:
            flags = serve_flags(
                policy, budget, config if policy != "none" else None, block_size=args.block_size,
                max_model_len=max_len, max_num_seqs=args.shared_concurrency, dtype=args.dtype,
                seed=args.seed, chunked=False, max_num_batched_tokens=max_len,
            )  # fmt: skip
            spec = {"experiment": "shared", "policy": policy, "budget": budget,
                    "label": er.case_label(policy, budget), "serve_flags": flags}  # fmt: skip
            specs.append((spec, work))

    if "chunked" in args.experiments:
        max_len = args.long_prompt_len + args.long_output_len + MODEL_LEN_SLACK
        if max_len > geometry.max_context:
            parser.error(
                f"--long-prompt-len {args.long_prompt_len} + --long-output-len "
                f"{args.long_output_len} + {MODEL_LEN_SLACK} = {max_len} exceeds the model's "
                f"{geometry.max_context}-token context"
            )
        shorts = [chat_ids(tokenizer, p.question) for p in problems[: args.short_requests]]
        if args.short_max_tokens is None:
            args.short_max_tokens = max_len - max(map(len, shorts))
        if max(map(len, shorts)) + args.short_max_tokens > max_len:
            parser.error(
                f"--short-max-tokens {args.short_max_tokens} plus a short prompt exceeds "
                f"--max-model-len {max_len}"
            )
        long = long_prompt(tokenizer, [p.question for p in problems[args.short_requests :]],
                           args.long_prompt_len)  # fmt: skip
        work = {"shorts": shorts, "long": long}
        settings["chunked"] = {
            "short_prompt_tokens": [len(p) for p in shorts],
            "long_prompt_tokens": len(long),
            "max_model_len": max_len,
        }
        for policy, budget in args.cases:
            for mode in args.chunk_modes:
                on = mode == "on"
                flags = serve_flags(
                    policy, budget, config if policy != "none" else None,
                    block_size=args.block_size, max_model_len=max_len,
                    max_num_seqs=args.short_requests + 1, dtype=args.dtype, seed=args.seed,
                    chunked=on, max_num_batched_tokens=args.chunk_tokens if on else max_len,
                )  # fmt: skip
                chunk_label = f"on ({args.chunk_tokens})" if on else "off"
                label = er.case_label(policy, budget)
                spec = {"experiment": "chunked", "policy": policy, "budget": budget,
                        "label": label, "chunk_label": chunk_label, "serve_flags": flags,
                        "slug": f"{label}-chunked-{mode}"}  # fmt: skip
                specs.append((spec, work))

    results: dict[str, list] = {"shared": [], "chunked": []}
    with tempfile.TemporaryDirectory(prefix="prefix-chunked-") as tmp:
        log_dir = args.log_dir or Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        for spec, work in specs:
            spec = {**spec, "model": str(model)}
            what = spec["experiment"] + (
                f", chunked {spec['chunk_label']}" if "chunk_label" in spec else ""
            )
            print(f"== {what}: {spec['label']}: vllm serve {model} {' '.join(spec['serve_flags'])}",
                  flush=True)  # fmt: skip
            log_spec = {**spec, "label": spec.get("slug", spec["label"]) + "-" + spec["experiment"]}
            measured = er.measure_case(run_case, log_spec, args, log_dir, work)
            row = {**spec, **measured, "heads": heads}
            results[spec["experiment"]].append(row)
            print(f"   done in {row['case_wall_s']:.0f} s", flush=True)

    wall = time.perf_counter() - started
    setting = setting_text(args, settings, wall)
    markdown = f"# Prefix caching and chunked prefill (`vllm serve`)\n\n{setting}\n"
    if results["shared"]:
        markdown += "\n## A: shared system prompt\n\n" + report_shared(results["shared"])
        markdown += "\n" + SHARED_NOTES + "\n"
    if results["chunked"]:
        markdown += "\n## B: a long prompt's prefill against decoding requests\n\n"
        markdown += report_chunked(results["chunked"]) + "\n" + CHUNKED_NOTES + "\n"
    payload = {
        "setting": setting,
        "args": {k: v for k, v in vars(args).items() if k not in ("cases",)},
        "cases": [er.case_label(*c) for c in args.cases],
        "inputs": settings,
        "wall_s": wall,
        "shared": results["shared"],
        "chunked": results["chunked"],
    }
    name = NAME if args.name is None else f"{NAME}_{args.name}"
    out = argparse.Namespace(name=name, results_dir=args.results_dir)
    cli.publish(out, name, payload, markdown, plot(results["shared"], results["chunked"]))


SHARED_NOTES = (
    "Hit rate: vLLM's `vllm:prefix_cache_hits` / `vllm:prefix_cache_queries` (tokens) over "
    "the measured requests only (read before and after them); the warm-up request (the "
    "shared system prompt and one more question, sent alone first so the prefix is cached) "
    "is not in it, its TTFT is its own column. Prefix caching (server): vLLM's "
    "`vllm:cache_config_info` label `enable_prefix_caching` after start-up, and whether the "
    "plugin logged turning it off (it does while a policy is active). Peak KV blocks: the "
    "maximum of `vllm:kv_cache_usage_perc` x the usable blocks over the polled readings; "
    "peak head-blocks: the maximum of `crystal_kv:head_blocks_in_use` (blocks of one layer "
    "and KV head; '= blocks' divides by layers x KV heads). TTFT and tok/s are the client's "
    "(streamed completions, token-id prompts); output tok/s = output tokens / (last token - "
    "first request sent)."
)

CHUNKED_NOTES = (
    "ITL during: the gaps between consecutive streamed chunks of the short requests that "
    "overlap the long prompt's prefill (from when it was sent to its first token), pooled "
    "over the short requests; a stall shows as one long gap per request. ITL before: the "
    "gaps that ended before the long prompt was sent. Tokens / chunk > 1 means vLLM merged "
    "tokens into one chunk (client behind), which hides gaps; it stays ~1 here. Long TTFT: "
    "from sending the long prompt to its first streamed token."
)


def setting_text(args: argparse.Namespace, inputs: dict[str, Any], wall: float) -> str:
    lines = [
        f"model {args.model}, {args.dtype}, block size {args.block_size}, eager, seed "
        f"{args.seed}, prefix caching asked on every server; policy cases with "
        f"`--kv-policy-config '{json.dumps(args.kv_policy_config)}'`; "
        f"total wall time {wall:.0f} s on {len(os.sched_getaffinity(0))} cores "
        "(other jobs may share them)."
    ]
    if "shared" in inputs:
        s = inputs["shared"]
        lines.append(
            f"A: {args.shared_requests} requests, GSM8K test questions "
            f"{s['questions'][0]}..{s['questions'][-1]} behind one system prompt of "
            f"{len(s['examples'])} worked GSM8K examples ({s['system_prompt_tokens']} tokens; "
            f"{s['common_prefix_tokens']} tokens shared by every chat-templated prompt, "
            f"prompts {min(s['prompt_tokens'])}-{max(s['prompt_tokens'])} tokens), "
            f"{args.shared_output_len} output tokens each (ignore_eos, greedy), "
            f"{args.shared_concurrency} in flight, --max-num-seqs {args.shared_concurrency}, "
            f"--max-model-len {s['max_model_len']}, no chunked prefill; one warm-up request "
            f"({s['warmup_question']}) first, reported apart."
        )
    if "chunked" in inputs:
        c = inputs["chunked"]
        lines.append(
            f"B: {args.short_requests} short requests (GSM8K questions, "
            f"{min(c['short_prompt_tokens'])}-{max(c['short_prompt_tokens'])} prompt tokens) "
            f"decoding; after {args.short_warmup_tokens} tokens each, one {c['long_prompt_tokens']}"
            f"-token prompt asking {args.long_output_len} tokens; shorts cancelled "
            f"{args.tail_s:g} s after it ends; --max-model-len {c['max_model_len']}, "
            f"--max-num-seqs {args.short_requests + 1}; chunked prefill on = "
            f"--max-num-batched-tokens {args.chunk_tokens}, off = {c['max_model_len']}."
        )
    return "\n\n".join(lines)


if __name__ == "__main__":
    main()
