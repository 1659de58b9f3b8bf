"""Serving throughput at fixed KV memory, measured over HTTP by vLLM's own client.

For each case (``none`` or POLICY:BUDGET) the script starts ``vllm serve`` with the same
flags on every side (eager, bf16, one explicit ``--block-size``, no prefix caching, no
chunked prefill, ``--max-num-seqs``, ``--kv-policy``) and ``--num-gpu-blocks-override`` =
KV memory in tokens / block size, so every case has the same KV bytes; only
``--kv-policy`` and ``--kv-budget`` (and ``--kv-policy-config``) differ. It then runs
``vllm bench serve --backend vllm --dataset-name random --ignore-eos`` against it (the same
seed, hence the same prompts, for every case) while polling the server's /metrics for the
running and waiting requests and the KV usage.

Per case it reports vLLM's output tok/s (and x none), mean TTFT and TPOT (vLLM's result
JSON), the running requests over the benchmark (time-weighted mean, steady = mean over
the middle half, peak), how long requests waited in the server's queue, the per-request
reservation in blocks and the memory-bound ideal concurrency:

* reservation: vanilla vLLM, the blocks of one full-length request (prompt + output);
  a policy, its scheduler's block cap (``crystal_vllm.budget.BudgetRule.cap_blocks`` at
  the case's budget and prompt length: the budget's resident entries plus the prompt
  entries kept on top, rounded up to whole blocks);
* ideal: min(usable blocks // reservation, --concurrency, --num-requests,
  --max-num-seqs), usable blocks = the pool less vLLM's null block;
* mean / ideal: the time-weighted mean of running requests over that ideal.

The plugin's startup line (the cap of a request with the longest prompt and how many such
requests fit) is parsed from the server log and stored with each policy case.

Results go to benchmarks/results/<date>_<machine>_serve_bench[_<name>].{json,md,png}; the
PNG plots running (and waiting) requests over time per case.

Examples (issue 12; a full run takes hours on 2 CPU cores):
    # 16 x (64 + 1024) tokens, 16 at once, KV memory of 4096 tokens
    python benchmarks/serve_bench.py --model smollm2 --num-requests 16 --prompt-len 64 \\
        --output-len 1024 --concurrency 16 --kv-memory-tokens 4096 \\
        --cases none crystal:128 crystal-lite:128 crystal:256 crystal-lite:256 --name 4k
    # 64 x (64 + 2048) tokens, memory of 4 full-length requests, budget 256
    python benchmarks/serve_bench.py --model smollm2 --num-requests 64 --prompt-len 64 \\
        --output-len 2048 --concurrency 64 --memory-requests 4 \\
        --cases none crystal:256 crystal-lite:256 --name 64x2048
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import cli  # noqa: E402
from benchmarks.common import engine_runs as er  # noqa: E402
from benchmarks.common.results import record_table  # noqa: E402

NAME = "serve_bench"
DEFAULT_CASES = "none crystal:128 crystal-lite:128 crystal:256 crystal-lite:256"

#: Tokens allowed beyond prompt + output in ``--max-model-len``: the random dataset
#: decodes and re-encodes its prompts, which can add a token or two.
MODEL_LEN_SLACK = 32

#: Seconds between two progress lines while a case runs.
PROGRESS_INTERVAL_S = 60.0

#: The line ``vllm bench serve`` prints when its measured run starts.
MAIN_START = "Starting main benchmark run"

#: Client output not echoed: interpreter-exit noise of native extensions.
_NOISE = re.compile(r"^\s*(?:nanobind:|- leaked |- \.\.\. skipped|See https://nanobind)")

#: Keys of vLLM's result JSON kept in this script's results.
BENCH_KEYS = (
    "duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
    "request_throughput", "output_throughput", "total_token_throughput",
    "max_concurrent_requests", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
    "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "median_itl_ms",
    "p99_itl_ms", "mean_e2el_ms", "median_e2el_ms", "p99_e2el_ms",
)  # fmt: skip

#: The plugin's startup line (crystal_vllm/vllm_ext/runner_mixin.py).
_STARTUP_LINE = re.compile(
    r"crystal-vllm: policy (?P<policy>[\w-]+), budget (?P<budget>\d+) per \(layer, KV head\), "
    r"prompt (?P<prompt>\w+) \(prompt_budget (?P<prompt_budget>\d+); prompt blocks "
    r"(?P<prompt_blocks>[^)]+)\); a request holds at most (?P<cap_blocks>\d+) blocks of "
    r"(?P<block_size>\d+) tokens.*?; (?P<fit>\d+) such requests fit in "
    r"(?P<usable_blocks>\d+) blocks, against (?P<fit_full_length>\d+) full-length "
    r"\((?P<max_model_len>\d+)-token\) ones"
)


# -- arguments -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = cli.script_parser(__doc__)
    er.add_case_args(parser, DEFAULT_CASES, output_len=1024, num_requests=16, prompt_len=64)
    parser.add_argument(
        "--concurrency",
        type=cli.positive_int,
        default=None,
        help="requests in flight at once (vllm bench serve --max-concurrency; default: "
        "--num-requests)",
    )
    parser.add_argument(
        "--max-num-seqs",
        type=cli.positive_int,
        default=None,
        help="the server's --max-num-seqs, running requests at most, the same for every "
        "case (default: --concurrency)",
    )
    memory = parser.add_mutually_exclusive_group()
    memory.add_argument(
        "--kv-memory-tokens",
        type=cli.positive_int,
        default=None,
        help="KV memory of every case in tokens (vLLM's null block included), a multiple of "
        "--block-size: the server gets --num-gpu-blocks-override = this / block size, so "
        "the bytes are the same at any block size (default 4096)",
    )
    memory.add_argument(
        "--memory-requests",
        type=cli.positive_float,
        default=None,
        help="KV memory instead in full-length (prompt + output) requests that vanilla "
        "vLLM could hold, >= 1, plus the null block (replaces --kv-memory-tokens)",
    )
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="every server's dtype (float32 is several times faster on CPUs without "
        "AVX-512 bf16; default bfloat16)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="vllm bench serve --seed: the random dataset's prompts, the same for every "
        "case (default 0)",
    )
    parser.add_argument(
        "--poll-interval",
        type=cli.positive_float,
        default=0.5,
        help="seconds between two reads of the server's /metrics (default 0.5)",
    )
    parser.add_argument(
        "--startup-timeout",
        type=cli.positive_float,
        default=900.0,
        help="seconds a server may take to become healthy (default 900: importing vLLM in "
        "each server process is slow on a loaded 2-core machine)",
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        help="keep each case's server log, client output and vLLM result JSON here "
        "(default: a temporary folder, deleted after the run)",
    )
    parser.add_argument(
        "--name",
        default=None,
        help=f"result files are <date>_<machine>_{NAME}_<name>.{{json,md,png}} "
        f"(default: <date>_<machine>_{NAME}.*)",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="where the result files go (default: benchmarks/results)",
    )
    return parser


# -- memory arithmetic ---------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pool_blocks(
    block_size: int,
    seq_len: int,
    kv_memory_tokens: int | None = None,
    memory_requests: float | None = None,
) -> int:
    """``--num-gpu-blocks-override``: the KV pool in blocks (vLLM's null block included),
    from a memory in tokens or in full-length requests (``seq_len`` tokens each) plus the
    null block; ``ValueError`` when it is not a whole number of blocks or holds too little."""
    if kv_memory_tokens is not None and memory_requests is not None:
        raise ValueError("give the KV memory in tokens or in requests, not both")
    if memory_requests is not None:
        if memory_requests < 1:
            raise ValueError(
                f"--memory-requests {memory_requests:g} is invalid: it must be >= 1 "
                "(vanilla vLLM must fit one full-length request)"
            )
        return int(memory_requests * _cdiv(seq_len, block_size)) + 1
    tokens = 4096 if kv_memory_tokens is None else kv_memory_tokens
    if tokens % block_size:
        raise ValueError(
            f"--kv-memory-tokens {tokens} is not a multiple of --block-size {block_size}: "
            "the memory would differ between block sizes"
        )
    blocks = tokens // block_size
    if blocks < 2:
        raise ValueError(f"--kv-memory-tokens {tokens} holds fewer than 2 blocks of {block_size}")
    return blocks


def reservation_blocks(
    policy: str,
    budget: int | None,
    policy_config: dict[str, Any] | None,
    block_size: int,
    max_model_len: int,
    prompt_len: int,
    output_len: int,
) -> int:
    """Blocks one request needs at most: vanilla vLLM, a whole ``prompt + output``
    sequence; a policy, its scheduler's cap at ``budget`` for this prompt (before any
    think-end token: the random dataset's requests have no think stage to end)."""
    if policy == "none":
        return _cdiv(prompt_len + output_len, block_size)
    from crystal_vllm.budget import BudgetRule
    from crystal_vllm.config import CrystalKVConfig

    config = CrystalKVConfig.from_additional_config(er.policy_config(policy, budget, policy_config))
    rule = BudgetRule(config, block_size=block_size, max_model_len=max_model_len)
    return rule.cap_blocks(rule.budget(config.budget, think_ended=False), prompt_len)


def memory_ideal(usable_blocks: int, reservation: int, *limits: int) -> dict[str, int]:
    """How many requests the memory holds at their full reservation, and the ideal
    concurrency: that, at most every other limit (clients, requests, --max-num-seqs)."""
    fit = usable_blocks // reservation
    return {"memory_fit": fit, "ideal_running": min(fit, *limits)}


# -- flags ---------------------------------------------------------------------------------


def serve_flags(
    policy: str,
    budget: int | None,
    policy_config: dict[str, Any] | None,
    *,
    block_size: int,
    num_blocks: int,
    max_model_len: int,
    max_num_seqs: int,
    dtype: str = "bfloat16",
) -> list[str]:
    """``vllm serve`` flags of a case: the shared engine flags and pool, then the policy's
    (``--kv-policy none`` for vanilla, so every side names its policy)."""
    engine = er.engine_settings(max_model_len, block_size, max_num_seqs, dtype=dtype)
    flags = er.cli_flags(engine) + ["--num-gpu-blocks-override", str(num_blocks)]
    if policy == "none":
        return flags + ["--kv-policy", "none"]
    from benchmarks.common.server import policy_flags

    return flags + policy_flags(policy, budget, policy_config)


def bench_command(
    vllm: str,
    base_url: str,
    model: str,
    *,
    num_requests: int,
    prompt_len: int,
    output_len: int,
    concurrency: int,
    seed: int,
    result_dir: Path,
    result_filename: str,
) -> list[str]:
    """``vllm bench serve`` against ``base_url``: the random dataset, exactly
    ``output_len`` tokens per request (``--ignore-eos``), greedy, everything sent at once
    under ``--max-concurrency``, no ready-check request (the server is already healthy, and
    that request would run before the measured part), results saved as JSON."""
    return [
        vllm, "bench", "serve",
        "--backend", "vllm",
        "--base-url", base_url,
        "--model", model,
        "--tokenizer", model,
        "--dataset-name", "random",
        "--random-input-len", str(prompt_len),
        "--random-output-len", str(output_len),
        "--random-range-ratio", "0",
        "--num-prompts", str(num_requests),
        "--max-concurrency", str(concurrency),
        "--request-rate", "inf",
        "--ignore-eos",
        "--temperature", "0",
        "--seed", str(seed),
        "--ready-check-timeout-sec", "0",
        "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--disable-tqdm",
        "--save-result",
        "--result-dir", str(result_dir),
        "--result-filename", result_filename,
    ]  # fmt: skip


# -- parsing -------------------------------------------------------------------------------


def parse_startup_line(log_text: str) -> dict[str, Any] | None:
    """The plugin's startup line in a server log (policy, budget, the cap of a request with
    the longest prompt and how many fit), or None when there is none (vanilla)."""
    match = _STARTUP_LINE.search(log_text)
    if match is None:
        return None
    return {
        key: value if key in ("policy", "prompt", "prompt_blocks") else int(value)
        for key, value in match.groupdict().items()
    }


def bench_summary(result: dict[str, Any], num_requests: int, output_len: int) -> dict[str, Any]:
    """The kept keys of vLLM's result JSON; ``ValueError`` when a request failed or did not
    produce exactly ``output_len`` tokens (``--ignore-eos``)."""
    if result.get("failed"):
        raise ValueError(f"vllm bench serve: {result['failed']} of {num_requests} requests failed")
    if result.get("completed") != num_requests:
        raise ValueError(
            f"vllm bench serve completed {result.get('completed')} of {num_requests} requests"
        )
    if result.get("total_output_tokens") != num_requests * output_len:
        raise ValueError(
            f"vllm bench serve got {result.get('total_output_tokens')} output tokens, not "
            f"{num_requests} x {output_len}"
        )
    return {key: result.get(key) for key in BENCH_KEYS}


def timeline_stats(samples: Sequence[tuple[float, float, float, float]], duration: float) -> dict:
    """Running and waiting requests over ``[0, duration)`` from ``(time, running,
    waiting, kv usage)`` samples (each holds until the next)."""
    running = [(t, r) for t, r, _, _ in samples]
    waiting = [(t, w) for t, _, w, _ in samples]
    queued = [(t, 1.0 if w > 0 else 0.0) for t, w in waiting]
    inside = [s for s in samples if 0 <= s[0] < duration]
    return {
        **er.running_stats([s for s in running if s[0] < duration], duration),
        "mean_waiting": er.time_weighted_mean(waiting, 0.0, duration),
        "peak_waiting": max((w for _, _, w, _ in inside), default=0),
        "waiting_s": duration * er.time_weighted_mean(queued, 0.0, duration),
        "peak_kv_usage": max((u for _, _, _, u in inside), default=0.0),
    }


# -- one case ------------------------------------------------------------------------------


@dataclass
class ClientRun:
    """What the client run gave: its exit status, output, and the /metrics samples as
    (seconds since the measured part started, running, waiting, kv usage)."""

    returncode: int
    output: list[str]
    samples: list[tuple[float, float, float, float]] = field(default_factory=list)


async def _report_progress(gauges: list, stop: asyncio.Event, label: str) -> None:
    """Print the latest /metrics sample every ``PROGRESS_INTERVAL_S`` (``vllm bench
    serve`` runs without its progress bar)."""
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=PROGRESS_INTERVAL_S)
        if gauges and not stop.is_set():
            t, g = gauges[-1]
            print(
                f"[{label}] {t:.0f} s: {g.running:.0f} running, {g.waiting:.0f} waiting, "
                f"KV usage {g.kv_usage:.0%}",
                flush=True,
            )


async def run_client(
    cmd: Sequence[str], base_url: str, poll_interval: float, label: str
) -> ClientRun:
    """Run ``vllm bench serve`` (echoing its output) while polling ``/metrics``; times are
    shifted to the client's "Starting main benchmark run" line."""
    import httpx

    from benchmarks.common.http_load import poll_metrics

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    gauges: list = []
    stop = asyncio.Event()
    output: deque[str] = deque(maxlen=200)
    t0 = time.perf_counter()
    main_start = None
    async with httpx.AsyncClient(timeout=30.0) as http:
        poller = asyncio.create_task(
            poll_metrics(http, f"{base_url}/metrics", poll_interval, t0, stop, gauges)
        )
        progress = asyncio.create_task(_report_progress(gauges, stop, label))
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env
        )
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if main_start is None and MAIN_START in line:
                main_start = time.perf_counter() - t0
            output.append(line)
            if main_start is not None and not _NOISE.match(line):
                print(f"[{label}] {line}", flush=True)
        returncode = await proc.wait()
        stop.set()
        await poller
        await progress
    start = main_start or 0.0
    samples = [
        (t - start, g.running, g.waiting, g.kv_usage) for t, g in gauges if t >= start - 1e-9
    ]
    return ClientRun(returncode=returncode, output=list(output), samples=samples)


def run_case(spec: dict[str, Any], args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    """Serve one case, run the client against it, read the result JSON and the logs."""
    import httpx

    from benchmarks.common import server as srv
    from benchmarks.common.http_load import server_num_blocks
    from crystal_vllm.serving import vllm_executable

    label = er.case_label(spec["policy"], spec["budget"])
    slug = re.sub(r"[^\w-]+", "_", label)
    log_path = log_dir / f"{slug}.server.log"
    result_file = f"{slug}.vllm_bench.json"
    with srv.policy_server(
        spec["model"], spec["serve_flags"], log_path, startup_timeout=args.startup_timeout
    ) as server:
        blocks = server_num_blocks(httpx.get(f"{server.base_url}/metrics", timeout=30).text)
        if blocks != spec["num_blocks"]:
            raise SystemExit(
                f"case {label}: the server has {blocks} KV blocks, not {spec['num_blocks']}"
            )
        startup = parse_startup_line(log_path.read_text(errors="replace"))
        cmd = bench_command(
            vllm_executable(),
            server.base_url,
            spec["model"],
            num_requests=args.num_requests,
            prompt_len=args.prompt_len,
            output_len=args.output_len,
            concurrency=spec["concurrency"],
            seed=args.seed,
            result_dir=log_dir,
            result_filename=result_file,
        )
        client = asyncio.run(run_client(cmd, server.base_url, args.poll_interval, label))
        (log_dir / f"{slug}.client.log").write_text("\n".join(client.output) + "\n")
        if client.returncode != 0:
            tail = "\n".join(client.output[-40:])
            raise SystemExit(f"case {label}: vllm bench serve exited {client.returncode}:\n{tail}")
        stats = None
        if spec["policy"] != "none":
            srv.flush_stats(server.base_url, spec["model"])
            stats = srv.logged_cache_stats(log_path)
    raw = json.loads((log_dir / result_file).read_text())
    try:
        bench = bench_summary(raw, args.num_requests, args.output_len)
    except ValueError as exc:
        raise SystemExit(f"case {label}: {exc}") from None
    return {
        "bench": bench,
        **timeline_stats(client.samples, bench["duration"]),
        "timeline": er.downsample([s for s in client.samples if s[0] <= bench["duration"]]),
        "startup_line": startup,
        "evictions": stats[-1].evictions if stats else None,
        "client_command": cmd,
    }


# -- report --------------------------------------------------------------------------------


def report(results: list[dict[str, Any]], setting: str) -> str:
    base = next((r for r in results if r["policy"] == "none"), None)

    def tok_s(row: dict[str, Any]) -> float:
        return row["bench"]["output_throughput"]

    columns = [
        ("case", er.label_of),
        ("output tok/s", tok_s),
        ("x none", lambda r: tok_s(r) / tok_s(base) if base else None),
        ("mean running", "mean_running"),
        ("steady running", "steady_running"),
        ("peak running", "peak_running"),
        ("reservation (blocks)", "reservation_blocks"),
        ("memory fit", "memory_fit"),
        ("ideal running", "ideal_running"),
        ("mean / ideal", lambda r: r["mean_running"] / r["ideal_running"]),
        ("peak waiting", "peak_waiting"),
        ("s with waiting", "waiting_s"),
        ("peak KV usage", "peak_kv_usage"),
        ("mean TTFT s", lambda r: r["bench"]["mean_ttft_ms"] / 1000),
        ("mean TPOT ms", lambda r: r["bench"]["mean_tpot_ms"]),
        ("duration s", lambda r: r["bench"]["duration"]),
        ("evictions", "evictions"),
        ("load avg start / end", er.load_avg_cell),
    ]
    notes = (
        "Output tok/s, TTFT, TPOT and duration are vLLM's (`vllm bench serve` result JSON). "
        "Running and waiting requests and KV usage are the server's /metrics gauges, polled "
        "during the measured part (after the client's 'Starting main benchmark run'); mean "
        "running is time-weighted over vLLM's duration, steady running over its middle half. "
        "Reservation: the blocks one request may hold (vanilla: a full-length request; a "
        "policy: its scheduler's cap at this budget and prompt length); memory fit: usable "
        "blocks // reservation; ideal running: that, at most the clients, requests and "
        "--max-num-seqs. s with waiting: seconds during which the server had a request "
        "queued (admitted ones preempted back included). Evictions: the plugin's log after "
        "the run. Load avg: the machine's 1-minute load average when the case started and "
        f"ended ({os.cpu_count()} cores; other jobs may share them)."
    )
    return (
        f"# Serving at fixed KV memory (`vllm bench serve`)\n\n{setting}\n\n"
        + record_table(results, columns, 2)
        + "\n"
        + notes
        + "\n"
    )


def plot(results: list[dict[str, Any]]):
    fig, (ax1, ax2) = cli.subplots(
        "Running requests over time, fixed KV memory", 2, figsize=(13, 4.2)
    )
    for i, r in enumerate(results):
        color = f"C{i}"
        label = er.label_of(r)
        times = [s[0] for s in r["timeline"]]
        ax1.step(times, [s[1] for s in r["timeline"]], where="post", color=color, label=label)
        ax1.axhline(r["ideal_running"], color=color, linestyle=":", linewidth=1)
        ax2.step(times, [s[2] for s in r["timeline"]], where="post", color=color, label=label)
    ax1.set_title("running (dotted: memory-bound ideal)")
    ax2.set_title("waiting")
    for ax in (ax1, ax2):
        ax.set_xlabel("seconds since the benchmark started")
        ax.set_ylabel("requests")
        ax.legend()
    return fig


# -- the driver ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    seq_len = args.prompt_len + args.output_len
    try:
        num_blocks = pool_blocks(
            args.block_size, seq_len, args.kv_memory_tokens, args.memory_requests
        )
    except ValueError as exc:
        parser.error(str(exc))
    concurrency = args.concurrency or args.num_requests
    max_num_seqs = args.max_num_seqs or concurrency
    model, geometry, _ = er.model_geometry(args.model, args.dtype)
    max_model_len = seq_len + MODEL_LEN_SLACK
    if max_model_len > geometry.max_context:
        parser.error(
            f"--prompt-len {args.prompt_len} + --output-len {args.output_len} (+ "
            f"{MODEL_LEN_SLACK} slack) exceeds the model's {geometry.max_context}-token context"
        )
    usable = num_blocks - 1  # vLLM's null block
    block_bytes = geometry.block_bytes(args.block_size)

    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        log_dir = args.log_dir or Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        for policy, budget in args.cases:
            config = (args.kv_policy_config or None) if policy != "none" else None
            reservation = reservation_blocks(
                policy, budget, config, args.block_size, max_model_len, args.prompt_len,
                args.output_len,
            )  # fmt: skip
            spec = {
                "model": str(model),
                "policy": policy,
                "budget": budget,
                "policy_config": config,
                "num_blocks": num_blocks,
                "concurrency": concurrency,
                "serve_flags": serve_flags(
                    policy,
                    budget,
                    config,
                    block_size=args.block_size,
                    num_blocks=num_blocks,
                    max_model_len=max_model_len,
                    max_num_seqs=max_num_seqs,
                    dtype=args.dtype,
                ),
                "reservation_blocks": reservation,
                **memory_ideal(usable, reservation, concurrency, args.num_requests, max_num_seqs),
            }
            label = er.case_label(policy, budget)
            print(
                f"== case {label}: vllm serve {model} {' '.join(spec['serve_flags'])}", flush=True
            )
            measured = er.measure_case(run_case, spec, args, log_dir)
            results.append({**spec, **measured})

    kv_mib = num_blocks * block_bytes / 2**20
    setting = (
        f"model {args.model}, `vllm bench serve` random dataset, {args.num_requests} requests x "
        f"({args.prompt_len} prompt + {args.output_len} output) tokens, --ignore-eos, greedy, "
        f"max concurrency {concurrency}, seed {args.seed}; every server: eager, {args.dtype}, "
        f"block size {args.block_size}, no prefix caching, no chunked prefill, max-num-seqs "
        f"{max_num_seqs}, max-model-len {max_model_len}, --num-gpu-blocks-override "
        f"{num_blocks} (= {num_blocks * args.block_size} tokens = {kv_mib:.1f} MiB of KV, "
        f"{usable} usable blocks = {usable / _cdiv(seq_len, args.block_size):.2f} full-length "
        f"requests); total wall time {time.perf_counter() - started:.0f} s"
    )
    payload = {
        "setting": setting,
        "block_size": args.block_size,
        "num_blocks": num_blocks,
        "kv_memory_tokens": num_blocks * args.block_size,
        "kv_memory_bytes": num_blocks * block_bytes,
        "num_requests": args.num_requests,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "concurrency": concurrency,
        "max_num_seqs": max_num_seqs,
        "max_model_len": max_model_len,
        "timeline_columns": ["t_s", "running", "waiting", "kv_usage"],
        "cases": results,
    }
    name = NAME if args.name is None else f"{NAME}_{args.name}"
    out = argparse.Namespace(name=name, results_dir=args.results_dir)
    cli.publish(out, name, payload, report(results, setting), plot(results))


if __name__ == "__main__":
    main()
