"""Serve benchmark: flags of both sides, the memory arithmetic, parsing vLLM's result and
the plugin's startup line, the timeline statistics, and one tiny end-to-end run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import serve_bench as sb

# -- arguments and memory ------------------------------------------------------------------


def _args(*argv: str):
    return sb.build_parser().parse_args(list(argv))


def test_defaults_are_the_issue_workload() -> None:
    args = _args()
    assert [sb.er.case_label(*c) for c in args.cases] == sb.DEFAULT_CASES.split()
    assert (args.num_requests, args.prompt_len, args.output_len) == (16, 64, 1024)
    assert args.block_size == 32 and args.kv_memory_tokens is None
    assert args.concurrency is None and args.max_num_seqs is None


def test_memory_flags_exclude_each_other(capsys) -> None:
    with pytest.raises(SystemExit):
        _args("--kv-memory-tokens", "4096", "--memory-requests", "4")
    assert "not allowed with argument" in capsys.readouterr().err


def test_pool_blocks_keeps_bytes_fixed_across_block_sizes() -> None:
    # 4096 tokens: 128 blocks of 32 or 32 blocks of 128, the null block included.
    assert sb.pool_blocks(32, 1088) == 128
    assert sb.pool_blocks(128, 1088, kv_memory_tokens=4096) == 32
    assert sb.pool_blocks(64, 1088, kv_memory_tokens=8192) == 128
    # 4 full-length requests of 64 + 2048 tokens (66 blocks each) plus the null block.
    assert sb.pool_blocks(32, 2112, memory_requests=4) == 4 * 66 + 1
    assert sb.pool_blocks(32, 1088, memory_requests=1.5) == 51 + 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kv_memory_tokens": 4100}, "not a multiple of --block-size 32"),
        ({"kv_memory_tokens": 32}, "fewer than 2 blocks"),
        ({"memory_requests": 0.5}, "it must be >= 1"),
        ({"kv_memory_tokens": 4096, "memory_requests": 2}, "not both"),
    ],
)
def test_pool_blocks_refuses(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        sb.pool_blocks(32, 1088, **kwargs)


def test_reservation_blocks() -> None:
    # Vanilla: a whole 64 + 1024-token sequence.
    assert sb.reservation_blocks("none", None, None, 32, 1120, 64, 1024) == 34
    assert sb.reservation_blocks("none", None, None, 128, 1120, 64, 1024) == 9
    # Policies: budget entries plus the 64 prompt entries kept (prompt compress keeps a
    # prompt up to prompt_budget 256), in whole blocks.
    assert sb.reservation_blocks("crystal", 128, None, 32, 1120, 64, 1024) == 6
    assert sb.reservation_blocks("crystal-lite", 256, None, 32, 2144, 64, 2048) == 10
    assert sb.reservation_blocks("crystal", 128, {"prompt": "evict"}, 32, 1120, 64, 1024) == 4
    # Never more than the whole sequence.
    assert sb.reservation_blocks("crystal", 4096, None, 32, 1120, 64, 1024) == 35


def test_memory_ideal() -> None:
    # 4096 tokens at block size 32: 127 usable blocks.
    assert sb.memory_ideal(127, 34, 16, 16, 16) == {"memory_fit": 3, "ideal_running": 3}
    assert sb.memory_ideal(127, 6, 16, 16, 16) == {"memory_fit": 21, "ideal_running": 16}
    # 64 x 2048 at budget 256, memory of 4 full-length requests: 264 usable blocks.
    assert sb.memory_ideal(264, 10, 64, 64, 64) == {"memory_fit": 26, "ideal_running": 26}


# -- flags ---------------------------------------------------------------------------------


def _serve(policy, budget, config=None):
    return sb.serve_flags(
        policy, budget, config, block_size=32, num_blocks=128, max_model_len=1120, max_num_seqs=16
    )


def test_serve_flags_differ_only_in_the_policy() -> None:
    none, crystal = _serve("none", None), _serve("crystal", 128)
    assert none[: len(none) - 2] == crystal[: len(none) - 2]
    assert none[-2:] == ["--kv-policy", "none"]
    assert crystal[len(none) - 2 :] == ["--kv-policy", "crystal", "--kv-budget", "128"]
    shared = " ".join(none)
    for flag in (
        "--enforce-eager",
        "--dtype bfloat16",
        "--block-size 32",
        "--max-model-len 1120",
        "--max-num-seqs 16",
        "--no-enable-prefix-caching",
        "--no-enable-chunked-prefill",
        "--num-gpu-blocks-override 128",
    ):
        assert flag in shared
    lite = _serve("crystal-lite", 256, {"prompt": "keep"})
    assert lite[-2:] == ["--kv-policy-config", '{"prompt": "keep"}']


def test_bench_command() -> None:
    cmd = sb.bench_command(
        "/venv/bin/vllm",
        "http://127.0.0.1:8000",
        "/models/m",
        num_requests=16,
        prompt_len=64,
        output_len=1024,
        concurrency=16,
        seed=3,
        result_dir=Path("/tmp/r"),
        result_filename="none.json",
    )
    assert cmd[:3] == ["/venv/bin/vllm", "bench", "serve"]
    pairs = dict(zip(cmd, cmd[1:], strict=False))
    assert pairs["--backend"] == "vllm" and pairs["--dataset-name"] == "random"
    assert pairs["--base-url"] == "http://127.0.0.1:8000"
    assert pairs["--model"] == pairs["--tokenizer"] == "/models/m"
    assert (pairs["--random-input-len"], pairs["--random-output-len"]) == ("64", "1024")
    assert (pairs["--num-prompts"], pairs["--max-concurrency"]) == ("16", "16")
    assert pairs["--seed"] == "3" and pairs["--random-range-ratio"] == "0"
    assert (pairs["--result-dir"], pairs["--result-filename"]) == ("/tmp/r", "none.json")
    assert pairs["--ready-check-timeout-sec"] == "0"
    assert {"--ignore-eos", "--save-result"} <= set(cmd)


def test_bench_command_flags_exist_in_vllm() -> None:
    """Every flag given to ``vllm bench serve`` is one its parser knows."""
    import argparse

    pytest.importorskip("vllm")
    from vllm.benchmarks.serve import add_cli_args

    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    known = {opt for action in parser._actions for opt in action.option_strings}
    cmd = sb.bench_command(
        "vllm", "u", "m", num_requests=1, prompt_len=1, output_len=1, concurrency=1, seed=0,
        result_dir=Path("."), result_filename="x",
    )  # fmt: skip
    assert {a for a in cmd if a.startswith("--")} <= known


# -- parsing -------------------------------------------------------------------------------

STARTUP = (
    "(Worker pid=1) INFO 12-02 03:53:42 [runner_mixin.py:101] crystal-vllm: policy "
    "crystal-lite, budget 128 per (layer, KV head), prompt compress (prompt_budget 256; "
    "prompt blocks private); a request holds at most 12 blocks of 32 tokens (its longest "
    "prompt and the largest budget); 10 such requests fit in 127 blocks, against 3 "
    "full-length (1120-token) ones; "
    "30 layers x 3 KV heads\n"
)


def test_parse_startup_line() -> None:
    assert sb.parse_startup_line("noise\n" + STARTUP + "more\n") == {
        "policy": "crystal-lite",
        "budget": 128,
        "prompt": "compress",
        "prompt_budget": 256,
        "prompt_blocks": "private",
        "cap_blocks": 12,
        "block_size": 32,
        "fit": 10,
        "usable_blocks": 127,
        "fit_full_length": 3,
        "max_model_len": 1120,
    }
    assert sb.parse_startup_line("INFO vllm started\n") is None


def _result(**overrides):
    result = {key: 1.0 for key in sb.BENCH_KEYS}
    result.update(completed=4, failed=0, total_output_tokens=4 * 128, generated_texts=["x"])
    result.update(overrides)
    return result


def test_bench_summary() -> None:
    summary = sb.bench_summary(_result(output_throughput=12.5), 4, 128)
    assert set(summary) == set(sb.BENCH_KEYS) and summary["output_throughput"] == 12.5
    with pytest.raises(ValueError, match="1 of 4 requests failed"):
        sb.bench_summary(_result(failed=1, completed=3), 4, 128)
    with pytest.raises(ValueError, match="completed 3 of 4"):
        sb.bench_summary(_result(completed=3), 4, 128)
    with pytest.raises(ValueError, match="500 output tokens, not 4 x 128"):
        sb.bench_summary(_result(total_output_tokens=500), 4, 128)


def test_timeline_stats() -> None:
    # (t, running, waiting, kv usage): 2 running for 2 s with 2 waiting, then 4 for 2 s.
    samples = [(0.0, 2, 2, 0.5), (2.0, 4, 0, 0.9), (4.0, 0, 0, 0.0)]
    stats = sb.timeline_stats(samples, 4.0)
    assert stats["mean_running"] == 3.0 and stats["peak_running"] == 4
    assert stats["steady_running"] == 3.0  # [1, 3): 1 s at 2, 1 s at 4
    assert stats["mean_waiting"] == 1.0 and stats["peak_waiting"] == 2
    assert stats["waiting_s"] == 2.0 and stats["peak_kv_usage"] == 0.9
    # A sample at the end of the window (or after it) does not count.
    assert sb.timeline_stats([(0.0, 1, 0, 0.1), (1.0, 9, 9, 1.0)], 1.0)["peak_running"] == 1


def test_report_and_plot() -> None:
    def row(policy, budget, tok_s, mean):
        return {
            "policy": policy, "budget": budget, "bench": _result(output_throughput=tok_s),
            "mean_running": mean, "steady_running": mean, "peak_running": 4,
            "reservation_blocks": 6, "memory_fit": 21, "ideal_running": 4,
            "peak_waiting": 0, "waiting_s": 0.0, "peak_kv_usage": 0.5, "evictions": None,
            "load_avg_1m": [1.0, 2.0], "timeline": [[0.0, 2, 0, 0.1], [1.0, 4, 0, 0.5]],
        }  # fmt: skip

    results = [row("none", None, 10.0, 2.0), row("crystal", 128, 30.0, 3.6)]
    text = sb.report(results, "setting")
    assert "| crystal:128 | 30.00 | 3.00 | 3.60 |" in text
    assert "| 0.90 |" in text  # mean / ideal
    sb.plot(results)


# -- end to end ----------------------------------------------------------------------------


def test_script_runs_as_a_file() -> None:
    out = subprocess.run(
        [sys.executable, str(Path(sb.__file__)), "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "--kv-memory-tokens" in out.stdout and "--memory-requests" in out.stdout


@pytest.mark.slow
def test_smoke(tmp_path: Path) -> None:
    sb.main(
        [
            "--model", "tiny", "--cases", "crystal:16", "--num-requests", "3",
            # 160 tokens: long enough to be polled while running on a fast machine.
            "--prompt-len", "32", "--output-len", "160", "--kv-memory-tokens", "256",
            "--poll-interval", "0.05", "--results-dir", str(tmp_path), "--name", "smoke",
        ]
    )  # fmt: skip
    (path,) = tmp_path.glob("*_serve_bench_smoke.json")
    assert path.with_suffix(".png").exists() and path.with_suffix(".md").exists()
    record = json.loads(path.read_text())
    assert record["num_blocks"] == 8 and record["kv_memory_tokens"] == 256
    (case,) = record["cases"]
    assert case["bench"]["completed"] == 3 and case["bench"]["total_output_tokens"] == 3 * 160
    assert case["reservation_blocks"] == 2  # 16 + 32 prompt entries
    assert case["memory_fit"] == 3 and case["ideal_running"] == 3
    assert case["startup_line"]["cap_blocks"] >= case["reservation_blocks"]
    assert case["evictions"] > 0
    assert case["timeline"] and case["peak_running"] >= 1
    assert not math.isnan(case["bench"]["mean_tpot_ms"])


def test_progress_lines(monkeypatch, capsys) -> None:
    import asyncio

    from benchmarks.common.http_load import ServerGauges

    monkeypatch.setattr(sb, "PROGRESS_INTERVAL_S", 0.01)
    gauges = [(12.3, ServerGauges(running=5, kv_usage=0.25, waiting=2))]

    async def go() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(sb._report_progress(gauges, stop, "crystal:128"))
        await asyncio.sleep(0.05)
        stop.set()
        await task

    asyncio.run(go())
    assert "[crystal:128] 12 s: 5 running, 2 waiting, KV usage 25%" in capsys.readouterr().out
