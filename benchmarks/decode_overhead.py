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

Example (the issue's setting):
    python benchmarks/decode_overhead.py --model smollm2 --cases none crystal:1024 \\
        --num-requests 8 --prompt-len 32 --output-len 256 --rounds 3
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
    # decode steps that ran the whole batch.
    full = [i for i in range(1, len(wall)) if running[i] == spec["num_requests"]]
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
    model_dir, geometry, vocab_size = er.model_geometry(args.model)
    seq_len = args.prompt_len + args.output_len
    for policy, budget in args.cases:
        if budget is not None and budget <= seq_len:
            raise SystemExit(
                f"case {er.case_label(policy, budget)}: the budget must exceed "
                f"prompt + output = {seq_len} so that nothing is evicted"
            )
    blocks_per_request = -(-seq_len // args.block_size) + 2
    kv_bytes = 2 * args.num_requests * blocks_per_request * geometry.block_bytes(args.block_size)
    engine = er.engine_settings(seq_len, args.block_size, max(args.num_requests, 8))
    runs = []
    for round_index in range(args.rounds):
        for case in args.cases:
            name, label = er.case_label(*case), f"{er.case_label(*case)} (round {round_index + 1})"
            spec = er.case_spec(model_dir, case, args, vocab_size, engine=engine, kv_bytes=kv_bytes)
            result = er.run_worker(Path(__file__), spec, label, total=args.output_len + 1)
            if result["evictions"]:
                raise SystemExit(f"{label} evicted {result['evictions']} entries: raise its budget")
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

    setting = (
        f"model {model_dir.name}, {args.num_requests} requests x ({args.prompt_len} prompt + "
        f"{args.output_len} generated) tokens, nothing evicted, eager, bf16, block size "
        f"{args.block_size}, one OpenMP thread; {args.rounds} alternating rounds; median "
        "over the decode steps that ran the whole batch"
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
        f"# Decode step time, nothing evicted\n\n{setting}\n\n"
        f"{markdown_table(headers, rows)}\n\nPer round:\n\n{markdown_table(run_headers, run_rows)}"
    )
    payload = {"setting": setting, "runs": runs, "summary": summary}
    cli.publish(args, "decode_overhead", payload, markdown, _figure(summary))


def _median_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _figure(summary: list[dict[str, Any]]) -> Any:
    fig, ax = cli.subplots("Decode step time, nothing evicted", figsize=(6, 3.5))
    labels = [s["case"] for s in summary]
    ax.bar(labels, [s["step_cpu_ms"] for s in summary], color="tab:blue", label="CPU time")
    ax.scatter(labels, [s["step_wall_ms"] for s in summary], color="black", zorder=3,
               label="wall clock")  # fmt: skip
    ax.set_ylabel("decode step (ms, median)")
    ax.legend()
    return fig


if __name__ == "__main__":
    main()
