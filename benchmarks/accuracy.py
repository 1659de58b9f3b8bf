"""GSM8K / AIME 2025 accuracy of vanilla vLLM and KV policies, through the OpenAI API.

Every problem is one chat completion (the model's chat template, the shared system
prompt, greedy by default). Against a server started elsewhere (a GPU, say) pass
``--base-url``; each case then names the policy that server runs (a label) and the
budget each request asks for through ``vllm_xargs`` (``crystal:128``; a bare
``crystal`` sends none). With ``--serve MODEL`` the script starts one local server per
policy with the same vLLM flags on every side (eager, one dtype, one max-model-len,
prefix caching off), at the largest budget of that policy; smaller budgets are asked for
per request. Results go to one JSONL per (dataset, model, case, max tokens) as problems
finish, and a rerun skips the problems already there, so a killed run resumes.

Examples:
    python benchmarks/accuracy.py --serve qwen2.5-coder-0.5b --limit 100 \\
        --max-tokens 512 --concurrency 8 --cases none crystal:128 h2o:128
    python benchmarks/accuracy.py --base-url http://gpu-host:8000 --cases crystal:512
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import cli  # noqa: E402
from benchmarks.common import policies as pol  # noqa: E402
from benchmarks.common import server as srv  # noqa: E402
from benchmarks.common.datasets import Problem, add_dataset_args, load_problems  # noqa: E402
from benchmarks.common.engine_runs import cli_flags  # noqa: E402
from benchmarks.common.grading import grade  # noqa: E402
from benchmarks.common.policies import Case, parse_case  # noqa: E402
from benchmarks.common.prompts import SYSTEM_PROMPT, build_messages  # noqa: E402
from benchmarks.common.results import RESULTS_DIR, record_table  # noqa: E402
from benchmarks.common.runlog import RunLog  # noqa: E402

DEFAULT_RUN_DIR = RESULTS_DIR / "accuracy_runs"


def build_parser() -> argparse.ArgumentParser:
    parser = cli.script_parser(__doc__)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--base-url",
        help="a running OpenAI-compatible server (e.g. http://127.0.0.1:8000); cases label "
        "its policy and the kv_budget each request asks for",
    )
    target.add_argument(
        "--serve",
        metavar="MODEL",
        help="start one local `vllm serve` per policy: a bundled model name "
        f"({cli.BUNDLED_MODELS}) or an HF folder",
    )
    parser.add_argument(
        "--model-name",
        help="model id for the API (default: the server's first model) and for file names",
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        type=parse_case,
        default=[Case("none")],
        help="cases, each 'none', [NAME=]POLICY or [NAME=]POLICY:BUDGET (budget = KV "
        "entries kept per layer and KV head, sent as vllm_xargs kv_budget; NAME labels a "
        "policy with its own --policy-config); default: none",
    )
    pol.add_policy_config_arg(parser, "--serve: ")
    add_dataset_args(parser, limit=None)
    cli.add_counts(
        parser,
        ("--max-tokens", 512, "generated tokens at most"),
        ("--concurrency", 8, "requests in flight at once"),
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="--serve: context length of every server (default: max tokens + 1024)",
    )
    parser.add_argument(
        "--dtype", default="bfloat16", help="--serve: model dtype on every server (bfloat16)"
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="--serve: one more `vllm serve` argument for every server (repeatable, e.g. "
        "--server-arg=--block-size=32)",
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=DEFAULT_RUN_DIR,
        help="where the per-case JSONL files go; a rerun resumes from them",
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        help="--serve: where the server logs go (default: a new temporary folder)",
    )
    parser.add_argument(
        "--request-timeout", type=float, default=3600.0, help="seconds per request (3600)"
    )
    parser.add_argument(
        "--paired-with",
        metavar="CASE",
        help="the case every other one is compared with problem by problem (a label as "
        "--cases prints it, e.g. crystal:128; default: the first case that is not none)",
    )
    cli.add_output_args(parser, "accuracy_DATASET_MODEL")
    return parser


# -- per-problem records and their summary ------------------------------------------------


def run_log_path(run_dir: Path, dataset: str, model: str, case: Case, max_tokens: int) -> Path:
    """One JSONL per (dataset, model, case, max tokens)."""
    budget = "default" if case.budget is None else str(case.budget)
    return run_dir / f"{dataset}_{model}_{case.series}-{budget}_max{max_tokens}.jsonl"


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy, mean generated tokens and truncations (finish reason ``length``)."""
    n = len(records)
    correct = sum(bool(r["correct"]) for r in records)
    return {
        "problems": n,
        "correct": correct,
        "accuracy": correct / n if n else math.nan,
        "avg_completion_tokens": (
            sum(r["completion_tokens"] for r in records) / n if n else math.nan
        ),
        "truncated": sum(r["finish_reason"] == "length" for r in records),
    }


def run_totals(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Wall time and evictions summed over every invocation that added to a case (NaN /
    None when none measured them), so a resumed case still reports its whole cost."""
    counts = [r["evictions"] for r in runs if r.get("evictions") is not None]
    peaks = [(r["peak_entries"], r["problems"]) for r in runs if r.get("peak_entries") is not None]
    weight = sum(n for _, n in peaks)
    return {
        "wall_s": sum(r["wall_s"] for r in runs) if runs else math.nan,
        "evictions": sum(counts) if counts else None,
        # Mean over the case's requests of their peak KV entries per (layer, KV head).
        "peak_entries": sum(p * n for p, n in peaks) / weight if weight else None,
    }


def full_kv_peak(records: Sequence[dict[str, Any]]) -> float | None:
    """Vanilla vLLM's peak KV entries per (layer, KV head), the mean over the requests of
    prompt + generated tokens (full KV holds every token; it logs no peak of its own)."""
    sizes = [r["prompt_tokens"] + r["completion_tokens"] for r in records if "prompt_tokens" in r]
    return sum(sizes) / len(sizes) if sizes else None


def paired_comparison(reference: Sequence[bool], other: Sequence[bool]) -> dict[str, Any]:
    """Two cases' answers to the same problems, paired: the problems only one of them
    solved, and the exact two-sided sign test on those (McNemar's exact test), i.e. the
    chance of a split at least this uneven if the two cases were equally good. Accuracy
    gaps of a few points on a few hundred problems are often noise; this says which are."""
    if len(reference) != len(other):
        raise ValueError(f"paired answers differ in length: {len(reference)} vs {len(other)}")
    only_reference = sum(a and not b for a, b in zip(reference, other, strict=True))
    only_other = sum(b and not a for a, b in zip(reference, other, strict=True))
    n = only_reference + only_other
    tail = sum(math.comb(n, k) for k in range(min(only_reference, only_other) + 1))
    return {
        "only_reference": only_reference,
        "only_case": only_other,
        "sign_test_p": min(1.0, 2 * tail / 2**n) if n else 1.0,
    }


def relative_accuracy(accuracy: float, baseline: float | None) -> float:
    """``accuracy / baseline``; NaN without a baseline or when the baseline is 0."""
    if baseline is None or math.isnan(baseline) or baseline == 0 or math.isnan(accuracy):
        return math.nan
    return accuracy / baseline


# -- talking to a server ------------------------------------------------------------------


def solve(
    client: Any,
    model_name: str,
    problem: Problem,
    case: Case,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One chat completion for ``problem``, graded."""
    extra_body: dict[str, Any] = {}
    if case.budget is not None:
        extra_body["vllm_xargs"] = {"kv_budget": case.budget}
    start = time.perf_counter()
    response = client.chat.completions.create(
        model=model_name,
        messages=build_messages(problem.question),
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=0,
        extra_body=extra_body or None,
    )
    seconds = time.perf_counter() - start
    choice = response.choices[0]
    text = choice.message.content or ""
    predicted, correct = grade(text, problem.answer, integer=args.dataset == "aime2025")
    return {
        "id": problem.id,
        "reference": problem.answer,
        "predicted": predicted,
        "correct": correct,
        "completion_tokens": response.usage.completion_tokens,
        "prompt_tokens": response.usage.prompt_tokens,
        "finish_reason": choice.finish_reason,
        "seconds": round(seconds, 3),
        "text": text,
    }


def run_case(
    client: Any,
    model_name: str,
    problems: Sequence[Problem],
    case: Case,
    log: RunLog,
    args: argparse.Namespace,
) -> int:
    """Solve the problems ``log`` lacks, ``args.concurrency`` at a time; return how many
    ran. The first failed request stops the case (its error is raised)."""
    from tqdm import tqdm

    todo = [p for p in problems if not log.done(p.id)]
    if not todo:
        return 0
    with (
        ThreadPoolExecutor(max_workers=args.concurrency) as pool,
        tqdm(total=len(todo), desc=case.label, unit="problem") as bar,
    ):

        def finished(future: Future) -> None:
            if not future.cancelled() and future.exception() is None:
                log.add(future.result())
            bar.update()

        futures = [pool.submit(solve, client, model_name, p, case, args) for p in todo]
        for future in futures:
            future.add_done_callback(finished)
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for future in pending:
            future.cancel()
        for future in done:
            if future.exception() is not None:
                raise RuntimeError(f"case {case.label}: a request failed") from future.exception()
    return len(todo)


def _model_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(name.rstrip("/")).name.removesuffix("-bf16"))


def server_args(
    case_policy: str,
    budget: int | None,
    args: argparse.Namespace,
    policy_config: dict[str, Any] | None = None,
) -> list[str]:
    """`vllm serve` flags: identical on every side except the policy, its budget and its
    parameters."""
    settings = {
        "enforce_eager": True,
        "dtype": args.dtype,
        "max_model_len": args.max_model_len or args.max_tokens + 1024,
        "enable_prefix_caching": False,
        "seed": 0,
        "max_num_seqs": max(args.concurrency, 1),
    }
    flags = cli_flags(settings) + srv.policy_flags(case_policy, budget, policy_config)
    return flags + args.server_arg


def group_by_policy(cases: Sequence[Case]) -> dict[str, list[Case]]:
    """Cases per series (named policy) in first-seen order: one server serves all budgets
    of a series."""
    groups: dict[str, list[Case]] = {}
    for case in cases:
        groups.setdefault(case.series, [])
        if case not in groups[case.series]:
            groups[case.series].append(case)
    return groups


# -- results ------------------------------------------------------------------------------


def plot(rows: Sequence[dict[str, Any]], settings: dict[str, Any], line: str = "series") -> Any:
    """Accuracy against the measured peak KV entries per head (the fair x-axis: a
    policy's budget says nothing of its buffer or kept prompt), or against the budget when
    a policy case has no measured peak; one line per value of ``line`` (a labelled policy,
    or ``"policy"`` to join a policy's differently configured cases), a horizontal line for
    ``none`` with its own peak marked."""
    title = (
        f"{settings['model']} on {settings['dataset']}: {settings['problems']} problems, "
        f"max {settings['max_tokens']} tokens, T={settings['temperature']}"
    )
    fig, ax = cli.subplots(title, figsize=(7, 4.5))
    policies = [r for r in rows if r["policy"] != "none"]
    by_peak = bool(policies) and all(r.get("peak_entries") is not None for r in policies)
    for row in rows:
        if row["policy"] == "none":
            ax.axhline(row["accuracy"], color="black", linestyle="--", label="none (full KV)")
            if by_peak and row.get("peak_entries") is not None:
                ax.plot([row["peak_entries"]], [row["accuracy"]], "k*", markersize=9)
    if by_peak:
        xlabel = "peak KV entries per (layer, KV head), measured (prompt + buffer included)"
        pol.plot_by_budget(ax, rows, line, "accuracy", x="peak_entries", xlabel=xlabel)
    else:
        pol.plot_by_budget(ax, rows, line, "accuracy")
    ax.set_ylabel("accuracy")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    return fig


def report(
    rows: Sequence[dict[str, Any]], settings: dict[str, Any], args: argparse.Namespace
) -> str:
    columns = [
        ("case", "case"),
        ("problems", "problems"),
        ("accuracy", "accuracy"),
        ("vs none", "relative_to_none"),
        ("avg generated tokens", "avg_completion_tokens"),
        ("truncated", "truncated"),
        ("wall s", "wall_s"),
        ("evictions (server log)", "evictions"),
        ("peak KV entries per head", "peak_entries"),
        ("solved only by the reference / only by this case", _paired_split),
        ("sign test p", lambda row: _p_value(row.get("sign_test_p"))),
    ]
    table = record_table(rows, columns)
    lines = [
        f"# Accuracy: {settings['model']} on {settings['dataset']}",
        "",
        f"- model: {settings['model']}; problems: {settings['problems']} "
        f"(offset {args.offset}); max tokens {args.max_tokens}; "
        f"temperature {args.temperature}; concurrency {args.concurrency}",
        f"- servers: {settings['servers']}",
        "- budget: KV entries kept per (layer, KV head), sent per request as "
        "vllm_xargs kv_budget; `vs none` = accuracy / accuracy of none",
        "- truncated: finish reason `length` (hit max tokens); evictions: KV entries (summed "
        "over layers and KV heads) the server's policy evicted while decoding the case "
        "(its stats log line; n/a when not logged); wall s: summed over the invocations "
        "that ran the case's problems (a resumed case adds up); peak KV entries per head: "
        "the mean over the case's requests of the most KV entries one (layer, KV head) "
        "held at once (prompt, generated and buffered entries, the step's new token "
        "included), from the server's stats line (none: prompt + generated tokens): "
        "compare policies at equal peak",
        f"- paired with {settings['paired_with']} (the reference), on the problems both "
        "ran: the problems only one of the two solved, and the exact two-sided sign test "
        "on them (the chance of a split at least this uneven between equally good cases)",
        *pol.policy_notes([(r["series"], r["policy"]) for r in rows], args.policy_config),
        "",
        table,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    reference = _paired_reference(args)  # a bad --paired-with fails before any server starts
    problems = load_problems(args)
    if args.serve is not None and any(c.budget is None and c.policy != "none" for c in args.cases):
        raise SystemExit("--serve needs a budget for every policy case (e.g. crystal:256)")

    logs: dict[Case, RunLog] = {}

    def open_log(case: Case, slug: str) -> RunLog:
        settings = {
            "dataset": args.dataset,
            "model": slug,
            "case": case.label,
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "system_prompt": SYSTEM_PROMPT,
        }
        if args.policy_config.get(case.series):
            settings["policy_config"] = args.policy_config[case.series]
        path = run_log_path(args.run_dir, args.dataset, slug, case, args.max_tokens)
        return RunLog(path, settings)

    def run_all(
        base_url: str, cases: Sequence[Case], slug: str | None, server_log: Path | None
    ) -> str:
        import openai

        with openai.OpenAI(
            base_url=f"{base_url.rstrip('/')}/v1",
            api_key="unused",
            timeout=args.request_timeout,
            max_retries=0,
        ) as client:
            model_name = args.model_name or client.models.list().data[0].id
            slug = slug or _model_slug(model_name)
            counted = 0  # the server's evictions so far
            last: srv.CacheStats | None = None  # the stats line after the previous case
            for case in cases:
                logs.setdefault(case, open_log(case, slug))
                start = time.perf_counter()
                ran = run_case(client, model_name, problems, case, logs[case], args)
                if not ran:
                    continue
                run = {"problems": ran, "wall_s": time.perf_counter() - start, "evictions": None}
                if server_log is not None and case.policy != "none":
                    srv.flush_stats(base_url, model_name)
                    logged = srv.logged_cache_stats(server_log)
                    if logged:
                        now = logged[-1].evictions
                        run["evictions"], counted = now - counted, now
                        run["peak_entries"] = srv.peak_entries_between(last, logged[-1])
                        last = logged[-1]
                logs[case].add_run(run)
        return slug

    if args.base_url is not None:
        slug = run_all(
            args.base_url, args.cases, args.model_name and _model_slug(args.model_name), None
        )
        servers = f"external server at {args.base_url}"
    else:
        model = cli.resolve_model(args.serve)
        slug = _model_slug(args.model_name or args.serve)
        servers = (
            f"`vllm serve MODEL {' '.join(server_args('POLICY', None, args))}` "
            "+ `--kv-budget` = the policy's largest budget, one server per policy"
        )
        for case in args.cases:
            logs[case] = open_log(case, slug)
        log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="accuracy-servers-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        for series, cases in group_by_policy(args.cases).items():
            if all(logs[c].done(p.id) for c in cases for p in problems):
                continue  # resumed: nothing left for this server
            budget = max((c.budget for c in cases if c.budget is not None), default=None)
            config = args.policy_config.get(series)
            flags = server_args(cases[0].policy, budget, args, config)
            if args.model_name:
                flags += ["--served-model-name", args.model_name]
            log_path = log_dir / f"server_{slug}_{series}.log"
            print(f"starting vllm serve {model} {' '.join(flags)} (log: {log_path})", flush=True)
            with srv.policy_server(model, flags, log_path) as server:
                run_all(server.base_url, cases, slug, log_path)

    baseline = None
    rows = []
    for case in args.cases:
        records = [logs[case].records[p.id] for p in problems if logs[case].done(p.id)]
        summary, totals = summarize(records), run_totals(logs[case].runs)
        if case.policy == "none":
            baseline = summary["accuracy"]
            totals["peak_entries"] = full_kv_peak(records)
        rows.append(
            {
                "case": case.label,
                "series": case.series,
                "policy": case.policy,
                "policy_config": args.policy_config.get(case.series),
                "budget": case.budget,
                **summary,
                **totals,
                "run_log": str(logs[case].path),
            }
        )
    for row in rows:
        row["relative_to_none"] = relative_accuracy(row["accuracy"], baseline)
    for case, row in zip(args.cases, rows, strict=True):
        if reference is None or case == reference:
            continue
        ids = [p.id for p in problems if logs[case].done(p.id) and logs[reference].done(p.id)]
        paired = paired_comparison(
            [bool(logs[reference].records[i]["correct"]) for i in ids],
            [bool(logs[case].records[i]["correct"]) for i in ids],
        )
        row.update(paired)

    settings = {
        "dataset": args.dataset,
        "model": slug,
        "problems": len(problems),
        "offset": args.offset,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "concurrency": args.concurrency,
        "system_prompt": SYSTEM_PROMPT,
        "servers": servers,
        "paired_with": reference.label if reference else None,
    }
    markdown = report(rows, settings, args)
    payload = {"settings": settings, "cases": rows}
    cli.publish(args, f"accuracy_{args.dataset}_{slug}", payload, markdown, plot(rows, settings))


def _paired_split(row: dict[str, Any]) -> str | None:
    if "only_reference" not in row:
        return None
    return f"{row['only_reference']} / {row['only_case']}"


def _p_value(p: float | None) -> str | None:
    return None if p is None else f"{p:.2g}"


def _paired_reference(args: argparse.Namespace) -> Case | None:
    """The case of ``--paired-with`` (default: the first policy case); None when there is
    no other case to pair it with."""
    if args.paired_with is None:
        reference = next((c for c in args.cases if c.policy != "none"), None)
    else:
        matches = [c for c in args.cases if c.label == args.paired_with]
        if not matches:
            labels = ", ".join(c.label for c in args.cases)
            raise SystemExit(f"--paired-with {args.paired_with!r} is not a case: {labels}")
        reference = matches[0]
    return reference if len(args.cases) > 1 else None


if __name__ == "__main__":
    main()
