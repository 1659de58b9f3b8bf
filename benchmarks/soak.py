"""Soak: mixed requests against a live `vllm serve`, one KV policy after another, checking
that nothing leaks or breaks.

For each policy a fresh server runs with `debug_checks` on (the cache invariants are
checked after every step) and a KV cache small enough that vLLM preempts
(`--num-gpu-blocks-override`). Concurrent streaming clients then send requests with mixed
prompt and output lengths, a random per-request `kv_budget` (`vllm_xargs`), `n` > 1 on some,
stop strings on some, and 20% of them disconnect mid-stream. After the drain the server must
be back to idle: no head-block in use and no compressed request on its `/metrics`, vLLM's
KV cache usage 0 (every block free again), no error or traceback in its log, and it must
still answer. Every request that was not disconnected must finish with all its tokens.

Results per policy (requests, tokens, client disconnects, vLLM's aborts and preemptions,
evictions, wall time) go to benchmarks/results/<date>_<machine>_soak.{json,md}; the script
exits with status 1 when a check failed.

    python benchmarks/soak.py --model tiny --requests 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common.cli import (
    add_model_arg,
    add_output_args,
    positive_int,
    resolve_model,
    script_parser,
)
from benchmarks.common.http_load import metric_samples
from benchmarks.common.results import record_table, write_results
from crystal_vllm.config import policy_names
from crystal_vllm.policy import PROMPT_MODES

#: Every KV policy (not `none`, which is vanilla vLLM).
SOAK_POLICIES = policy_names()[1:]

#: Stop strings; with ignore_eos they end some requests early (any of them may match the
#: random text of a small model).
STOP_STRINGS = (["e"], ["a", "o"], ["the"], [".", "!"])

#: Log lines that mean something went wrong in the server.
LOG_PROBLEM = re.compile(r"Traceback|\bERROR\b|\bCRITICAL\b|EngineDeadError")


@dataclass(frozen=True)
class SoakSettings:
    """One soak run's knobs (the same for every policy)."""

    requests: int = 200
    concurrency: int = 16
    disconnect_fraction: float = 0.2
    server_budget: int = 64
    max_model_len: int = 512
    num_blocks: int = 40
    max_prompt: int = 400
    max_output: int = 160
    seed: int = 0
    vocab: int = 2000
    #: Every policy's prompt mode (None: each policy's default). ``keep`` also keeps
    #: vLLM's prefix caching on, so shared prompt blocks get soaked too.
    prompt_mode: str | None = None
    #: Tokens of a prefix that half of the prompts start with (0: none).
    shared_prefix: int = 0

    def __post_init__(self) -> None:
        if self.prompt_mode not in (None, *PROMPT_MODES):
            raise ValueError(f"prompt_mode {self.prompt_mode!r} is not one of {PROMPT_MODES}")
        if not 0 <= self.shared_prefix < self.max_prompt:
            raise ValueError(
                f"shared_prefix {self.shared_prefix} must be in [0, {self.max_prompt - 1}] "
                f"(the longest prompt is {self.max_prompt} tokens)"
            )


@dataclass(frozen=True)
class RequestPlan:
    """What one client sends, and whether it hangs up after ``disconnect_after`` chunks."""

    prompt: list[int]
    max_tokens: int
    kv_budget: int
    n: int
    stop: list[str] | None
    temperature: float
    seed: int
    disconnect_after: int | None


@dataclass
class Outcome:
    """What happened to one request."""

    status: str  # completed | disconnected | failed
    tokens: int = 0  # over all choices, as streamed
    error: str | None = None


def make_plans(settings: SoakSettings, rng: random.Random) -> list[RequestPlan]:
    """The requests of one policy's run: lengths, budgets, n, stops and disconnects mixed."""
    plans = []
    prefix = [rng.randrange(10, settings.vocab) for _ in range(settings.shared_prefix)]
    for _ in range(settings.requests):
        prompt_len = rng.choice(
            [rng.randint(1, 32), rng.randint(33, 256), rng.randint(257, settings.max_prompt)]
        )
        shared = prefix if prefix and rng.random() < 0.5 else []
        prompt_len = max(prompt_len, len(shared) + 1)
        room = settings.max_model_len - prompt_len
        max_tokens = max(
            1, min(room, rng.choice([rng.randint(1, 16), rng.randint(17, settings.max_output)]))
        )
        n = rng.choice([1, 1, 1, 2, 3])
        disconnect = rng.random() < settings.disconnect_fraction
        plans.append(
            RequestPlan(
                prompt=shared
                + [rng.randrange(10, settings.vocab) for _ in range(prompt_len - len(shared))],
                max_tokens=max_tokens,
                kv_budget=rng.randint(1, settings.server_budget),
                n=n,
                stop=rng.choice(STOP_STRINGS) if rng.random() < 0.3 else None,
                temperature=0.0 if n == 1 and rng.random() < 0.5 else 1.0,
                seed=rng.randrange(1 << 30),
                disconnect_after=rng.randint(1, 8) if disconnect else None,
            )
        )
    return plans


def check_finished(
    plan: RequestPlan, finish: dict[int, str | None], tokens: dict[int, int]
) -> None:
    """Raise when a request that ran to its end lost a choice or tokens."""
    if sorted(finish) != list(range(plan.n)):
        raise RuntimeError(f"asked for n={plan.n}, got choices {sorted(finish)}")
    for index, reason in finish.items():
        if reason == "length" and tokens.get(index, 0) != plan.max_tokens:
            raise RuntimeError(
                f"choice {index} finished by length with {tokens.get(index, 0)} of "
                f"{plan.max_tokens} tokens"
            )
        if reason not in ("length", "stop"):
            raise RuntimeError(f"choice {index} finished with {reason!r}")
        if reason == "stop" and plan.stop is None and tokens.get(index, 0) >= plan.max_tokens:
            raise RuntimeError(f"choice {index} stopped without a stop string")


async def run_request(client, model: str, plan: RequestPlan) -> Outcome:
    """Send one streaming completion; hang up after ``disconnect_after`` chunks if planned."""
    finish: dict[int, str | None] = {}
    tokens: dict[int, int] = {}
    chunks = 0
    try:
        stream = await client.completions.create(
            model=model,
            prompt=plan.prompt,
            max_tokens=plan.max_tokens,
            n=plan.n,
            stop=plan.stop,
            temperature=plan.temperature,
            seed=plan.seed,
            stream=True,
            extra_body={
                "ignore_eos": True,
                "return_token_ids": True,
                "vllm_xargs": {"kv_budget": plan.kv_budget},
            },
        )
        async for chunk in stream:
            chunks += 1
            for choice in chunk.choices:
                tokens[choice.index] = tokens.get(choice.index, 0) + len(
                    getattr(choice, "token_ids", None) or ()
                )
                if choice.finish_reason is not None:
                    finish[choice.index] = choice.finish_reason
            hang_up = plan.disconnect_after is not None and chunks >= plan.disconnect_after
            if hang_up and len(finish) < plan.n:
                await stream.close()
                return Outcome("disconnected", sum(tokens.values()))
        check_finished(plan, finish, tokens)
        return Outcome("completed", sum(tokens.values()))
    except Exception as exc:  # every failure is reported, none stops the soak
        return Outcome("failed", sum(tokens.values()), f"{type(exc).__name__}: {exc}")


async def run_clients(
    base_url: str, model: str, plans: Sequence[RequestPlan], concurrency: int
) -> list[Outcome]:
    """Every plan, at most ``concurrency`` at a time; outcomes in plan order."""
    from openai import AsyncOpenAI

    outcomes: list[Outcome | None] = [None] * len(plans)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(plans)):
        queue.put_nowait(i)
    async with AsyncOpenAI(
        base_url=f"{base_url}/v1", api_key="unused", timeout=900.0, max_retries=0
    ) as client:

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                outcomes[i] = await run_request(client, model, plans[i])

        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(plans)))))
    return [o for o in outcomes if o is not None]


# -- the server's state ------------------------------------------------------------------


def read_metrics(base_url: str) -> dict[str, float]:
    """The readings the soak checks, from ``/metrics`` (summed over engines)."""
    import urllib.request

    with urllib.request.urlopen(f"{base_url}/metrics", timeout=30) as response:
        text = response.read().decode()

    def total(name: str, **labels: str) -> float:
        samples = metric_samples(text, name)
        return sum(v for lv, v in samples if all(lv.get(k) == x for k, x in labels.items()))

    return {
        "running": total("vllm:num_requests_running"),
        "waiting": total("vllm:num_requests_waiting"),
        "kv_cache_usage": total("vllm:kv_cache_usage_perc"),
        "preemptions": total("vllm:num_preemptions_total"),
        "aborted": total("vllm:request_success_total", finished_reason="abort"),
        "finished_length": total("vllm:request_success_total", finished_reason="length"),
        "finished_stop": total("vllm:request_success_total", finished_reason="stop"),
        "head_blocks_in_use": total("crystal_kv:head_blocks_in_use"),
        "head_blocks_capacity": total("crystal_kv:head_blocks_capacity"),
        "compressed_running": total("crystal_kv:num_requests_compressed"),
        "evicted_entries": total("crystal_kv:evicted_entries_total"),
        "prefill_evicted_entries": total("crystal_kv:prefill_evicted_entries_total"),
        "budget_reallocations": total("crystal_kv:budget_reallocations_total"),
        "prefix_cache_queries": total("vllm:prefix_cache_queries_total"),
        "prefix_cache_hits": total("vllm:prefix_cache_hits_total"),
    }


def idle_problems(reading: dict[str, float]) -> list[str]:
    """What is not back to idle in a reading taken after the drain."""
    problems = []
    for name in ("running", "waiting", "head_blocks_in_use", "compressed_running"):
        if reading[name] != 0:
            problems.append(f"{name} is {reading[name]:g} after the drain, not 0")
    if reading["kv_cache_usage"] != 0:
        problems.append(
            f"vLLM's KV cache usage is {reading['kv_cache_usage']:g} after the drain: "
            "not every block is free again"
        )
    if reading["head_blocks_capacity"] <= 0:
        problems.append("crystal_kv:head_blocks_capacity is missing from /metrics")
    return problems


def wait_idle(base_url: str, timeout: float = 60.0) -> dict[str, float]:
    """The first reading with nothing left (the worker releases finished requests on its
    next step), or the last one after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        reading = read_metrics(base_url)
        if not idle_problems(reading) or time.monotonic() > deadline:
            return reading
        time.sleep(0.5)


def log_problems(log_text: str, limit: int = 20) -> list[str]:
    """Lines of a server log that report an error or a traceback."""
    return [line for line in log_text.splitlines() if LOG_PROBLEM.search(line)][:limit]


def still_answers(base_url: str, model: str) -> bool:
    from openai import OpenAI

    with OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as client:
        completion = client.completions.create(
            model=model, prompt="Still there?", max_tokens=4, extra_body={"ignore_eos": True}
        )
    return completion.usage.completion_tokens == 4


# -- one policy ----------------------------------------------------------------------------


def server_flags(policy: str, settings: SoakSettings) -> list[str]:
    policy_config: dict[str, Any] = {"debug_checks": True}
    if settings.prompt_mode is not None:
        policy_config["prompt"] = settings.prompt_mode
    return [
        "--enforce-eager",
        "--max-model-len",
        str(settings.max_model_len),
        "--num-gpu-blocks-override",
        str(settings.num_blocks),
        "--kv-policy",
        policy,
        "--kv-budget",
        str(settings.server_budget),
        "--kv-policy-config",
        json.dumps(policy_config),
    ]


def soak_policy(model: Path, policy: str, settings: SoakSettings, log_dir: Path) -> dict[str, Any]:
    """One policy's soak on a fresh server: its row of the results."""
    from crystal_vllm.serving import serve

    plans = make_plans(settings, random.Random(f"{settings.seed}-{policy}"))
    log_path = log_dir / f"soak-{policy}.log"
    with serve(
        model, server_flags(policy, settings), log_path=log_path, startup_timeout=900
    ) as srv:
        start = time.perf_counter()
        outcomes = asyncio.run(run_clients(srv.base_url, str(model), plans, settings.concurrency))
        wall = time.perf_counter() - start
        reading = wait_idle(srv.base_url)
        answers = still_answers(srv.base_url, str(model))
        problems = idle_problems(reading)
        # Read before the server stops: vLLM logs an EngineDeadError while shutting down.
        log_text = log_path.read_text(errors="replace")
    failed = [o for o in outcomes if o.status == "failed"]
    problems += [f"request failed: {o.error}" for o in failed[:10]]
    problems += [f"server log: {line}" for line in log_problems(log_text)]
    if not answers:
        problems.append("the server did not answer after the drain")
    if reading["preemptions"] == 0:
        problems.append("vLLM preempted nothing: the KV cache was not small enough")
    if policy != "full" and reading["evicted_entries"] == 0:
        problems.append(f"{policy} evicted nothing")
    shares = settings.shared_prefix and settings.prompt_mode == "keep"
    if shares and reading["prefix_cache_hits"] == 0:
        problems.append("no prefix-cache hit although prompts share a prefix")
    disconnected = sum(o.status == "disconnected" for o in outcomes)
    return {
        "policy": policy,
        "requests": len(plans),
        "completed": sum(o.status == "completed" for o in outcomes),
        "disconnected": disconnected,
        "failed": len(failed),
        "choices": sum(p.n for p in plans),
        "with_stop": sum(p.stop is not None for p in plans),
        "tokens": sum(o.tokens for o in outcomes),
        "aborted_by_vllm": reading["aborted"],
        "finished_by_vllm": reading["finished_length"] + reading["finished_stop"],
        "preemptions": reading["preemptions"],
        "evicted_entries": reading["evicted_entries"],
        "prefill_evicted_entries": reading["prefill_evicted_entries"],
        "budget_reallocations": reading["budget_reallocations"],
        "prefix_cache_hits": reading["prefix_cache_hits"],
        "prefix_cache_queries": reading["prefix_cache_queries"],
        "head_blocks_in_use_after": reading["head_blocks_in_use"],
        "kv_cache_usage_after": reading["kv_cache_usage"],
        "wall_s": wall,
        "ok": not problems,
        "problems": problems,
        "log": str(log_path),
    }


COLUMNS = [
    ("policy", "policy"),
    ("requests", "requests"),
    ("completed", "completed"),
    ("disconnected", "disconnected"),
    ("failed", "failed"),
    ("tokens", "tokens"),
    ("finished by vLLM", lambda r: int(r["finished_by_vllm"])),
    ("preemptions", lambda r: int(r["preemptions"])),
    (
        "evicted (decode + prefill)",
        lambda r: int(r["evicted_entries"] + r["prefill_evicted_entries"]),
    ),
    ("prefix-cache hit tokens", lambda r: int(r.get("prefix_cache_hits", 0))),
    ("head-blocks in use after", lambda r: int(r["head_blocks_in_use_after"])),
    ("KV usage after", "kv_cache_usage_after"),
    ("wall s", "wall_s"),
    ("req/s", lambda r: r["requests"] / r["wall_s"]),
    ("ok", lambda r: "yes" if r["ok"] else "NO"),
]


def report(rows: Sequence[dict[str, Any]], settings: SoakSettings, model: str) -> str:
    lines = [
        f"# Soak: {settings.requests} requests per policy, {settings.concurrency} clients",
        "",
        f"Model `{model}`, `--max-model-len {settings.max_model_len}`, "
        f"`--num-gpu-blocks-override {settings.num_blocks}` (vLLM preempts), `--kv-budget "
        f"{settings.server_budget}`, `debug_checks` on; per request a random `kv_budget` in "
        f"[1, {settings.server_budget}], prompts of 1-{settings.max_prompt} tokens, 1-"
        f"{settings.max_output} new tokens, n in {{1, 2, 3}}, stop strings on ~30%, "
        f"{settings.disconnect_fraction:.0%} of clients disconnecting after 1-8 chunks; "
        f"prompt mode {settings.prompt_mode or 'each policy default'}"
        + (
            f", half of the prompts start with the same {settings.shared_prefix} tokens "
            "(prefix caching on under `keep`)."
            if settings.shared_prefix
            else "."
        ),
        "",
        record_table(rows, COLUMNS, digits=2),
        "Checked after each policy's drain: head-blocks in use and compressed requests 0 on "
        "`/metrics`, vLLM's KV cache usage 0 (all blocks free), nothing running or waiting, "
        "no error or traceback in the server log, the server still answers; every request "
        "not disconnected finished with all its choices and tokens.",
    ]
    for row in rows:
        for problem in row["problems"]:
            lines.append(f"- {row['policy']}: {problem}")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    add_model_arg(parser)
    parser.set_defaults(model="tiny")
    parser.add_argument(
        "--policies",
        nargs="+",
        choices=SOAK_POLICIES,
        default=list(SOAK_POLICIES),
        help="policies to soak, in turn (default: all)",
    )
    defaults = SoakSettings()
    for flag, value, what in (
        ("--requests", defaults.requests, "requests per policy"),
        ("--concurrency", defaults.concurrency, "concurrent clients"),
        ("--kv-budget", defaults.server_budget, "the server's --kv-budget"),
        ("--num-blocks", defaults.num_blocks, "KV blocks of the server (small: vLLM preempts)"),
        ("--max-model-len", defaults.max_model_len, "the server's --max-model-len"),
    ):
        parser.add_argument(
            flag, type=positive_int, default=value, help=f"{what} (default {value})"
        )
    parser.add_argument("--seed", type=int, default=0, help="request mix seed (default 0)")
    parser.add_argument(
        "--prompt-mode",
        choices=PROMPT_MODES,
        default=None,
        help="every policy's prompt mode (default: each policy's own); keep also keeps "
        "vLLM's prefix caching on",
    )
    parser.add_argument(
        "--shared-prefix",
        type=int,
        default=0,
        metavar="TOKENS",
        help="half of the prompts start with the same TOKENS tokens, so that prefix caching "
        "shares their blocks under --prompt-mode keep (default 0)",
    )
    parser.add_argument(
        "--log-dir", type=Path, default=None, help="server logs (default: a temporary folder)"
    )
    add_output_args(parser, "soak")
    args = parser.parse_args(argv)
    if args.max_model_len <= 32:
        parser.error(f"--max-model-len {args.max_model_len} is invalid: it must be > 32")
    try:
        settings_from_args(args)
    except ValueError as exc:  # SoakSettings names the value and its range
        parser.error(str(exc))
    return args


def settings_from_args(args: argparse.Namespace) -> SoakSettings:
    """The run's settings from parsed arguments (validated by :class:`SoakSettings`)."""
    return SoakSettings(
        requests=args.requests,
        concurrency=args.concurrency,
        server_budget=args.kv_budget,
        max_model_len=args.max_model_len,
        num_blocks=args.num_blocks,
        max_prompt=min(400, args.max_model_len - 16),
        seed=args.seed,
        prompt_mode=args.prompt_mode,
        shared_prefix=args.shared_prefix,
    )


def main(argv: Sequence[str] | None = None) -> int:
    import tempfile

    args = parse_args(argv)
    settings = settings_from_args(args)
    model = resolve_model(args.model)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="soak-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for policy in args.policies:
        row = soak_policy(model, policy, settings, log_dir)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "problems"}), flush=True)
        # Written after every policy, so that a long run cut short keeps what it measured.
        markdown = report(rows, settings, args.model)
        payload = {
            "settings": asdict(settings),
            "model": args.model,
            "policies_planned": args.policies,
            "policies": rows,
        }
        paths = write_results(args.name or "soak", payload, markdown, results_dir=args.results_dir)
    print(markdown)
    print(f"results: {paths.json} {paths.markdown}")
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
