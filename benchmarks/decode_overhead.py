"""Decode step time with nothing evicted: what the policy path costs over vanilla vLLM.

Every case serves the same batch (``--num-requests`` prompts of ``--prompt-len`` tokens,
``--output-len`` tokens each, ``ignore_eos``, greedy) with a budget above every sequence,
so a policy keeps everything and its output equals vanilla's: the only difference left is
the per-step cost of the policy path (per-head writes, attention with probabilities, the
LRFU update). A case that evicts fails the run.

Each case runs in a fresh process with an in-process engine (the shared settings of
``benchmarks/common/engine_runs.py``) stepped by hand; every decode step is timed twice:
wall clock, and the CPU time of the engine's thread (``time.thread_time``), which the
other jobs of a shared machine disturb far less than the wall clock (they still share
caches and memory bandwidth). Cases alternate (``--rounds`` of A B A B ...), and the
ratio to ``none`` is taken within each round, so slow drifts of the machine cancel.

With ``--at-budget`` the question is the other one: what a step costs while a policy
evicts, against vanilla at the context the policy holds. Every policy case (one shared
budget B) generates B + ``--output-len`` tokens and is timed over its last
``--output-len`` decode steps, where each head holds the prompt plus B entries and evicts
one per step; ``none`` gets a prompt of ``--prompt-len`` + B tokens and is timed over
its first ``--output-len`` decode steps, its context running from prompt + B to about
prompt + B + ``--output-len``. A policy case that never evicts fails the run.

Examples (the second is issue 12's "per-token cost at budget B close to vanilla's at a
B-token context"):
    python benchmarks/decode_overhead.py --model smollm2 --cases none crystal:1024 \\
        --num-requests 8 --prompt-len 32 --output-len 256 --rounds 3
    python benchmarks/decode_overhead.py --model smollm2 --dtype float32 --at-budget \\
        --cases none crystal:128 crystal-lite:128 --num-requests 16 --prompt-len 64 \\
        --output-len 32 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import cli  # noqa: E402
from benchmarks.common import engine_runs as er  # noqa: E402
from benchmarks.common.results import markdown_table  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = cli.script_parser(__doc__)
    er.add_case_args(parser, "none crystal:1024", output_len=256, num_requests=8, prompt_len=32)
    parser.add_argument(
        "--rounds", type=cli.positive_int, default=3, help="times every case runs, alternating"
    )
    parser.add_argument(
        "--at-budget",
        action="store_true",
        help="time the policies while they evict, against none at the context they hold "
        "(prompt + budget); the cases share one budget (see above)",
    )
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="model dtype of every case (bfloat16)",
    )
    cli.add_output_args(parser, "decode_overhead", worker=True)
    return parser


# -- one case, inside a fresh process ------------------------------------------------------


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    engine = er.Engine(spec)
    engine.add_batch(spec)
    wall, cpu, running = [], [], []
    while engine.engine.has_unfinished_requests():
        w0, c0 = time.perf_counter(), time.thread_time()
        outputs = engine.engine.step()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.thread_time() - c0)
        running.append(len(outputs))  # requests in the step
        er.report_progress()
    # Step 0 prefills every prompt; the last steps may run a partial batch. Keep the
    # decode steps that ran the whole batch (with --at-budget, the first or last `timed`).
    full = [i for i in range(1, len(wall)) if running[i] == spec["num_requests"]]
    if "timed" in spec:
        which, count = spec["timed"]
        full = full[:count] if which == "first" else full[-count:]
    return {
        "decode_steps": len(full),
        "step_wall_ms": 1e3 * statistics.median(wall[i] for i in full),
        "step_cpu_ms": 1e3 * statistics.median(cpu[i] for i in full),
        "prefill_wall_ms": 1e3 * wall[0],
        "evictions": engine.evictions() or 0,
        "ops": engine.info()["ops"],
    }


# -- the driver ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = er.parse_or_work(build_parser(), argv, run_case)
    model_dir, geometry, vocab_size = er.model_geometry(args.model, args.dtype)
    held = _check_budgets(args)
    seq_len = args.prompt_len + held + args.output_len + (1 if args.at_budget else 0)
    blocks_per_request = -(-seq_len // args.block_size) + 2
    kv_bytes = 2 * args.num_requests * blocks_per_request * geometry.block_bytes(args.block_size)
    engine = er.engine_settings(
        seq_len, args.block_size, max(args.num_requests, 8), dtype=args.dtype
    )
    # Every prompt prefills in step 0, so every timed step runs the whole batch.
    prompts = args.num_requests * (args.prompt_len + held)
    engine["max_num_batched_tokens"] = max(engine["max_num_batched_tokens"], prompts)
    runs = []
    for round_index in range(args.rounds):
        for case in args.cases:
            name, label = er.case_label(*case), f"{er.case_label(*case)} (round {round_index + 1})"
            spec = er.case_spec(model_dir, case, args, vocab_size, engine=engine, kv_bytes=kv_bytes)
            if args.at_budget:  # see the module docstring
                if case[0] == "none":  # a spare token: the prefill makes the first
                    spec.update(timed=("first", args.output_len), output_len=args.output_len + 1)
                    spec["prompt_len"] += held
                else:
                    spec.update(timed=("last", args.output_len), output_len=args.output_len + held)
            steps = spec["output_len"] + 1
            result = er.run_worker(Path(__file__), spec, label, total=steps)
            if result["evictions"] and not args.at_budget:
                raise SystemExit(f"{label} evicted {result['evictions']} entries: raise its budget")
            if args.at_budget and case[0] != "none" and not result["evictions"]:
                raise SystemExit(f"{label} never evicted: the prompt mode keeps everything?")
            runs.append({"case": name, "round": round_index + 1, **result})

    base = {r["round"]: r for r in runs if r["case"] == "none"}
    for r in runs:
        ref = base.get(r["round"])
        r["cpu_x_none"] = r["step_cpu_ms"] / ref["step_cpu_ms"] if ref else None
        r["wall_x_none"] = r["step_wall_ms"] / ref["step_wall_ms"] if ref else None
    summary = []
    for label in dict.fromkeys(r["case"] for r in runs):
        mine = [r for r in runs if r["case"] == label]
        summary.append({
            "case": label,
            "step_cpu_ms": statistics.median(r["step_cpu_ms"] for r in mine),
            "step_wall_ms": statistics.median(r["step_wall_ms"] for r in mine),
            "cpu_x_none": _median_or_none([r["cpu_x_none"] for r in mine]),
            "wall_x_none": _median_or_none([r["wall_x_none"] for r in mine]),
        })  # fmt: skip

    if args.at_budget:
        shape = (
            f"policies at budget {held}: {args.prompt_len} prompt + {held + args.output_len} "
            f"generated tokens, timed over the last {args.output_len} steps (evicting); none: "
            f"{args.prompt_len + held} prompt, timed over its first {args.output_len} steps"
        )
        title = f"Decode step time while evicting at budget {held}, vs none at that context"
    else:
        shape = f"({args.prompt_len} prompt + {args.output_len} generated) tokens, nothing evicted"
        title = "Decode step time, nothing evicted"
    setting = (
        f"model {model_dir.name}, {args.num_requests} requests x {shape}, eager, "
        f"{args.dtype}, block size {args.block_size}, one OpenMP thread; {args.rounds} "
        "alternating rounds; median over the timed decode steps that ran the whole batch"
    )
    headers = ["case", "step CPU ms", "x none (CPU)", "step wall ms", "x none (wall)"]
    rows = [
        [s["case"], s["step_cpu_ms"], s["cpu_x_none"], s["step_wall_ms"], s["wall_x_none"]]
        for s in summary
    ]
    run_headers = ["case", "round", "step CPU ms", "x none", "step wall ms", "x none", "ops"]
    run_rows = [
        [r["case"], r["round"], r["step_cpu_ms"], r["cpu_x_none"], r["step_wall_ms"],
         r["wall_x_none"], r["ops"] or "-"]
        for r in runs
    ]  # fmt: skip
    markdown = (
        f"# {title}\n\n{setting}\n\n"
        f"{markdown_table(headers, rows)}\n\nPer round:\n\n{markdown_table(run_headers, run_rows)}"
    )
    payload = {"setting": setting, "runs": runs, "summary": summary}
    cli.publish(args, "decode_overhead", payload, markdown, _figure(summary, title))


def _check_budgets(args) -> int:
    """The entries a policy holds beyond the prompt in the timed steps: 0 in the default
    mode (whose budgets must exceed every sequence), the shared budget with --at-budget."""
    budgets = {budget for policy, budget in args.cases if policy != "none"}
    if args.at_budget:
        if len(budgets) != 1 or None in budgets:
            raise SystemExit(
                f"--at-budget needs every policy case at one budget, got {sorted(budgets, key=str)}"
            )
        return budgets.pop()
    seq_len = args.prompt_len + args.output_len
    for policy, budget in args.cases:
        if budget is not None and budget <= seq_len:
            raise SystemExit(
                f"case {er.case_label(policy, budget)}: the budget must exceed "
                f"prompt + output = {seq_len} so that nothing is evicted"
            )
    return 0


def _median_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _figure(summary: list[dict[str, Any]], title: str) -> Any:
    fig, ax = cli.subplots(title, figsize=(6, 3.5))
    labels = [s["case"] for s in summary]
    ax.bar(labels, [s["step_cpu_ms"] for s in summary], color="tab:blue", label="CPU time")
    ax.scatter(labels, [s["step_wall_ms"] for s in summary], color="black", zorder=3,
               label="wall clock")  # fmt: skip
    ax.set_ylabel("decode step (ms, median)")
    ax.legend()
    return fig


if __name__ == "__main__":
    main()
