"""Throughput benchmark: argument checks, the shared timing/bytes/metrics helpers, the
driver's guards, and one tiny end-to-end run of each mode."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pytest

from benchmarks import throughput as tp
from benchmarks.common import engine_runs as er
from benchmarks.common.cli import positive_float, positive_int
from benchmarks.common.engine_runs import (
    KVGeometry,
    RequestTiming,
    block_size_arg,
    cli_flags,
    downsample,
    engine_settings,
    kv_bytes_held,
    latency_summary,
    parse_case,
    prompt_tokens,
    run_worker,
    running_stats,
    time_weighted_mean,
)
from benchmarks.common.http_load import ServerGauges, server_num_blocks, timing_from_stream
from benchmarks.common.server import CacheStats, parse_cache_stats, peak_entries_between

SMOLLM2 = KVGeometry(num_layers=30, num_kv_heads=3, head_dim=64, max_context=8192)

# -- arguments -----------------------------------------------------------------------------


def test_parse_case() -> None:
    assert parse_case("none") == ("none", None)
    assert parse_case("crystal:256") == ("crystal", 256)
    assert parse_case("snapkv:1") == ("snapkv", 1)
    for bad in ("crystal", "crystal:0", "crystal:-4", "crystal:1.5", "crystal:", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="POLICY:BUDGET with BUDGET >= 1"):
            parse_case(bad)
    for bad in ("none:4", ":256", "crystl:256"):
        with pytest.raises(argparse.ArgumentTypeError, match="unknown policy .* known: full, crys"):
            parse_case(bad)


def test_number_arguments_name_the_bad_value() -> None:
    assert positive_int("7") == 7
    assert positive_float("0.5") == 0.5
    assert block_size_arg("64") == 64
    with pytest.raises(argparse.ArgumentTypeError, match="0 is invalid: it must be an integer"):
        positive_int("0")
    with pytest.raises(argparse.ArgumentTypeError, match="'x' is not an integer"):
        positive_int("x")
    for bad in ("0", "-1", "nan", "inf"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be a number > 0"):
            positive_float(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="block size 16 .* multiple of 32"):
        block_size_arg("16")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num-requests", "0"], "--num-requests: 0 is invalid: it must be an integer >= 1"),
        (["--output-len", "-5"], "--output-len: -5 is invalid"),
        (["--memory-requests", "0"], "--memory-requests: 0.0 is invalid: it must be a number > 0"),
        (["--block-size", "48"], "block size 48 is invalid"),
        (["--mode", "grpc"], "invalid choice: 'grpc'"),
        (["--cases", "crystal"], "case 'crystal' must be 'none' or POLICY:BUDGET"),
        (["--poll-interval", "0"], "--poll-interval: 0.0 is invalid"),
    ],
)
def test_parser_rejects_bad_values(
    argv: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exc:
        tp.build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_parser_defaults_and_help() -> None:
    args = tp.build_parser().parse_args([])
    assert args.mode == "offline" and args.cases == [("none", None), ("crystal", 256)]
    assert args.concurrency is None and args.expect_no_eviction is False
    text = tp.build_parser().format_help()
    for action in tp.build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help"
    assert "--mode {offline,http}" in text


def test_memory_below_one_request_is_refused(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        tp.main(["--model", "tiny", "--memory-requests", "0.5"])
    assert "--memory-requests 0.5 is invalid: it must be >= 1" in capsys.readouterr().err


def test_too_long_requests_are_refused(capsys: pytest.CaptureFixture, tiny_model) -> None:
    with pytest.raises(SystemExit):
        tp.main(["--model", str(tiny_model), "--prompt-len", "4000", "--output-len", "200"])
    assert "4200 tokens exceeds the model's 4096-token context" in capsys.readouterr().err


def test_tensor_parallel_size_must_divide_the_kv_heads(capsys, tiny_model) -> None:
    with pytest.raises(SystemExit):
        tp.main(["--model", str(tiny_model), "--tensor-parallel-size", "3"])
    err = capsys.readouterr().err
    assert "--tensor-parallel-size 3 is invalid for this model: it must divide its 2 KV" in err


def test_tensor_parallel_size_reaches_the_engine_flags() -> None:
    assert "tensor_parallel_size" not in engine_settings(512, 32, 8)
    flags = cli_flags(engine_settings(512, 32, 8, tensor_parallel_size=2))
    assert flags[flags.index("--tensor-parallel-size") + 1] == "2"


# -- settings, prompts, bytes --------------------------------------------------------------


def test_engine_settings_as_cli_flags() -> None:
    settings = engine_settings(max_model_len=1536, block_size=32, max_num_seqs=8)
    assert settings["enable_prefix_caching"] is False
    assert settings["enable_chunked_prefill"] is False
    assert settings["max_num_batched_tokens"] == 1536
    flags = cli_flags(settings)
    assert "--enforce-eager" in flags and "--no-enable-prefix-caching" in flags
    assert "--no-enable-chunked-prefill" in flags
    assert flags[flags.index("--max-model-len") + 1] == "1536"
    assert flags[flags.index("--dtype") + 1] == "bfloat16"
    assert engine_settings(56, 32, max_num_seqs=64)["max_num_batched_tokens"] == 64


def test_prompt_tokens_are_deterministic_distinct_and_in_range() -> None:
    a = prompt_tokens(0, 64, vocab_size=2048)
    assert a == prompt_tokens(0, 64, vocab_size=2048)
    assert a != prompt_tokens(1, 64, vocab_size=2048)
    assert len(a) == 64 and all(50 <= t < 2048 - 50 for t in a)


def test_kv_bytes_from_the_model_geometry(tiny_model) -> None:
    # One SmolLM2 token of KV: 30 layers x 3 heads x 64 dims x (K, V) x 2 bytes = 23,040.
    assert SMOLLM2.block_bytes(1) == 23_040
    assert SMOLLM2.head_block_bytes(32) == 32 * 64 * 2 * 2
    assert SMOLLM2.block_bytes(32) == 90 * SMOLLM2.head_block_bytes(32)
    tiny = KVGeometry.from_model_dir(tiny_model)
    assert tiny == KVGeometry(num_layers=4, num_kv_heads=2, head_dim=64, max_context=4096)


def test_kv_bytes_held() -> None:
    # Vanilla holds whole blocks; a policy holds head-blocks, whatever its blocks reserve.
    assert kv_bytes_held("none", SMOLLM2, 32, peak_blocks=10, peak_head_blocks=None) == (
        10 * SMOLLM2.block_bytes(32)
    )
    assert kv_bytes_held("crystal", SMOLLM2, 32, peak_blocks=10, peak_head_blocks=450) == (
        450 * 8192
    )
    assert kv_bytes_held("crystal", SMOLLM2, 32, peak_blocks=10, peak_head_blocks=None) is None
    assert kv_bytes_held("none", SMOLLM2, 32, peak_blocks=None, peak_head_blocks=5) is None


# -- timing --------------------------------------------------------------------------------


def test_request_timing() -> None:
    t = RequestTiming(start=1.0, first_token=1.5, end=3.5, output_tokens=5)
    assert (t.ttft, t.tpot, t.e2e) == (0.5, 0.5, 2.5)
    assert math.isnan(RequestTiming(0.0, 1.0, 1.0, 1).tpot)
    with pytest.raises(ValueError, match=">= 1 output token"):
        RequestTiming(0.0, 1.0, 2.0, 0)
    with pytest.raises(ValueError, match="start <= first token <= end"):
        RequestTiming(0.0, 3.0, 2.0, 4)


def test_latency_summary_takes_medians() -> None:
    timings = [
        RequestTiming(0.0, 1.0, 5.0, 5),  # tpot 1.0
        RequestTiming(0.0, 2.0, 4.0, 5),  # tpot 0.5
        RequestTiming(0.0, 3.0, 3.0, 1),  # tpot nan: not counted
    ]
    summary = latency_summary(timings)
    assert summary == {"ttft_median_s": 2.0, "tpot_median_s": 0.75, "e2e_median_s": 4.0}


def test_time_weighted_running() -> None:
    samples = [(0.0, 4), (1.0, 2), (3.0, 0)]
    assert time_weighted_mean(samples, 0.0, 4.0) == pytest.approx((4 + 2 * 2) / 4)
    assert time_weighted_mean(samples, 1.0, 3.0) == 2.0
    assert time_weighted_mean([(1.0, 6)], 0.0, 2.0) == 3.0  # 0 before the first sample
    with pytest.raises(ValueError, match="empty window"):
        time_weighted_mean(samples, 2.0, 2.0)
    stats = running_stats([(0.0, 8), (1.0, 3), (7.0, 1)], elapsed=8.0)
    assert stats["peak_running"] == 8
    assert stats["mean_running"] == pytest.approx((8 + 18 + 1) / 8)
    assert stats["steady_running"] == 3.0  # the middle half, 2 s to 6 s


def test_downsample_keeps_the_ends() -> None:
    samples = [(float(i), i) for i in range(1000)]
    small = downsample(samples, limit=10)
    assert len(small) == 10 and small[0] == samples[0] and small[-1] == samples[-1]
    assert downsample(samples[:5], limit=10) == samples[:5]


def test_timing_from_stream() -> None:
    events = [(1.0, 0), (1.5, 1), (1.7, 0), (2.0, 2), (2.5, 1)]
    t = timing_from_stream(1.0, events, reported_tokens=4)
    assert (t.ttft, t.e2e, t.output_tokens) == (0.5, 1.5, 4)
    assert t.tpot == pytest.approx(1.0 / 3)
    assert timing_from_stream(1.0, events, reported_tokens=None).output_tokens == 4
    with pytest.raises(ValueError, match="carried 4 tokens, its usage says 5"):
        timing_from_stream(1.0, events, reported_tokens=5)
    with pytest.raises(ValueError, match="no tokens"):
        timing_from_stream(1.0, [(1.2, 0)], reported_tokens=None)


# -- server metrics and log ----------------------------------------------------------------

METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 5.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.75
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="32",engine="0",num_gpu_blocks="145"} 1.0
"""


def test_server_gauges_parse() -> None:
    assert ServerGauges.parse(METRICS) == ServerGauges(running=3.0, kv_usage=0.75, waiting=5.0)
    assert server_num_blocks(METRICS) == 145
    two_engines = METRICS.replace(
        'vllm:num_requests_running{engine="0",model_name="m"} 3.0',
        'vllm:num_requests_running{engine="0",model_name="m"} 3.0\n'
        'vllm:num_requests_running{engine="1",model_name="m"} 2.0',
    )
    assert ServerGauges.parse(two_engines).running == 5.0
    without = "\n".join(ln for ln in METRICS.splitlines() if "kv_cache_usage" not in ln)
    with pytest.raises(ValueError, match="no vllm:kv_cache_usage_perc"):
        ServerGauges.parse(without)
    assert (
        server_num_blocks(METRICS.replace('num_gpu_blocks="145"', 'num_gpu_blocks="None"')) is None
    )


def test_parse_cache_stats() -> None:
    log = (
        "(Worker pid=1) INFO 11-28 17:02:20 [model_runner.py:160] crystal-vllm: 4 running, "
        "120 evictions, 3 budget reallocations, 64 head-blocks in use; mean kept ...\n"
        "unrelated line\n"
        "INFO crystal-vllm: 0 running, 900 evictions, 7 budget reallocations, 0 head-blocks "
        "in use; mean kept entries per (layer, KV head) by layer: []\n"
    )
    assert parse_cache_stats(log) == [CacheStats(4, 120, 3, 64), CacheStats(0, 900, 7, 0)]
    assert parse_cache_stats("nothing here") == []


def test_peak_entries_of_the_requests_released_between_two_lines() -> None:
    """The runner logs the mean peak over all released requests; a case's own mean comes
    from the difference of two lines."""
    log = (
        "crystal-vllm: 3 running, 10 evictions, 0 budget reallocations, 8 head-blocks in use; "
        "mean kept entries per (layer, KV head) by layer: [4.0]; peak entries per (layer, KV "
        "head): mean 100.00 over 4 released requests, max 130.0\n"
        "crystal-vllm: 0 running, 20 evictions, 0 budget reallocations, 0 head-blocks in use; "
        "mean kept entries per (layer, KV head) by layer: []; peak entries per (layer, KV "
        "head): mean 120.00 over 10 released requests, max 150.0\n"
    )
    first, second = parse_cache_stats(log)
    assert (first.peak_mean, first.released, first.peak_max) == (100.0, 4, 130.0)
    # (120 * 10 - 100 * 4) / 6 requests released in between.
    assert peak_entries_between(first, second) == pytest.approx(800 / 6)
    assert peak_entries_between(None, first) == pytest.approx(100.0)
    assert peak_entries_between(second, second) is None  # nothing released in between
    assert peak_entries_between(None, CacheStats(0, 1, 0, 0)) is None  # an older runner


# -- the driver ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "evictions", "expect_none", "problem"),
    [
        ("none", None, False, None),
        ("crystal", 10, False, None),
        ("crystal", 0, False, "evicted nothing"),
        ("crystal", None, False, "unknown"),
        ("full", 0, False, None),
        ("crystal", 0, True, None),
        ("crystal", 3, True, "evicted 3 entries despite"),
        ("crystal", None, True, "unknown"),
    ],
)
def test_eviction_problem(
    policy: str, evictions: int | None, expect_none: bool, problem: str | None
) -> None:
    found = tp.eviction_problem(policy, evictions, expect_none)
    assert found is None if problem is None else problem in found


def _fake_case(evictions: int | None) -> dict:
    return {
        "ops": None,
        "elapsed_s": 2.0,
        "generated_tokens": 8,
        "output_tok_s": 4.0,
        "output_tok_per_cpu_s": 8.0,
        "peak_running": 2,
        "mean_running": 1.5,
        "steady_running": 1.5,
        "timeline": [(0.0, 2), (1.0, 1)],
        "peak_blocks": 2,
        "total_blocks": 2,
        "peak_head_blocks": 5,
        "ttft_median_s": 0.1,
        "tpot_median_s": 0.2,
        "e2e_median_s": 1.0,
        "evictions": evictions,
    }


def test_driver_fails_when_a_policy_evicted_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model
) -> None:
    monkeypatch.setattr(er, "run_worker", lambda *a: _fake_case(0))
    with pytest.raises(SystemExit, match="crystal:16: evicted nothing"):
        tp.main(
            [
                "--model",
                str(tiny_model),
                "--cases",
                "crystal:16",
                "--num-requests",
                "2",
                "--output-len",
                "32",
                "--memory-requests",
                "1",
                "--results-dir",
                str(tmp_path),
            ]
        )
    assert not list(tmp_path.iterdir())


def test_driver_writes_results_and_bytes_held(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model
) -> None:
    cases = iter([_fake_case(None), _fake_case(7)])
    monkeypatch.setattr(er, "run_worker", lambda *a: next(cases))
    tp.main(
        [
            "--model",
            str(tiny_model),
            "--cases",
            "none",
            "crystal:16",
            "--num-requests",
            "2",
            "--output-len",
            "32",
            "--memory-requests",
            "1",
            "--results-dir",
            str(tmp_path),
            "--name",
            "unit",
        ]
    )
    (path,) = tmp_path.glob("*_unit.json")
    none, crystal = json.loads(path.read_text())["cases"]
    tiny = KVGeometry.from_model_dir(tiny_model)
    assert none["peak_kv_bytes"] == 2 * tiny.block_bytes(32)
    assert crystal["peak_kv_bytes"] == 5 * tiny.head_block_bytes(32)
    assert crystal["peak_reserved_kv_bytes"] == 2 * tiny.block_bytes(32)
    assert none["num_blocks"] == 3  # 64 tokens = 2 blocks, plus vLLM's null block
    markdown = path.with_suffix(".md").read_text()
    assert "| crystal:16 | 4.00 | 1.00 | 8.00 | 1.00 |" in markdown
    assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_run_worker_reads_progress_and_result(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(
        "import json, sys\n"
        "spec = json.loads(sys.argv[2])\n"
        "print('vllm log line')\n"
        "print('PROGRESS 2', flush=True)\n"
        "print('RESULT ' + json.dumps({'twice': spec['x'] * 2}))\n"
    )
    assert run_worker(script, {"x": 21}, "case", total=2) == {"twice": 42}
    script.write_text("import sys\nprint('booting')\nsys.stderr.write('it broke')\nsys.exit(3)\n")
    with pytest.raises(SystemExit, match=r"(?s)case failed \(exit code 3\).*booting.*it broke"):
        run_worker(script, {}, "case", total=1)


# -- end to end on the tiny model ----------------------------------------------------------


def _run(argv: list[str], tmp_path: Path) -> list[dict]:
    tp.main([*argv, "--model", "tiny", "--results-dir", str(tmp_path), "--name", "smoke"])
    (path,) = tmp_path.glob("*_smoke.json")
    record = json.loads(path.read_text())
    assert record["machine"]["cores_usable"] >= 1
    assert path.with_suffix(".png").exists() and path.with_suffix(".md").exists()
    return record["cases"]


@pytest.mark.slow
def test_offline_smoke(tmp_path: Path) -> None:
    argv = [
        "--cases",
        "none",
        "crystal:16",
        "--num-requests",
        "4",
        "--prompt-len",
        "40",
        "--output-len",
        "24",
        "--memory-requests",
        "1.5",
    ]
    none, crystal = _run(argv, tmp_path)
    for case in (none, crystal):
        assert case["generated_tokens"] == 4 * 24
        assert case["total_blocks"] == 3  # 1.5 x 2 blocks (64 tokens)
        assert 1 <= case["peak_running"] <= 4
        assert case["peak_blocks"] <= case["total_blocks"]
        assert 0 < case["ttft_median_s"] <= case["e2e_median_s"]
        assert case["output_tok_per_cpu_s"] >= 0.5 * case["output_tok_s"]
    assert none["evictions"] is None and none["peak_head_blocks"] is None
    assert none["peak_kv_bytes"] == none["peak_blocks"] * none["block_bytes"]
    assert crystal["evictions"] > 0
    assert crystal["peak_kv_bytes"] == crystal["peak_head_blocks"] * crystal["head_block_bytes"]
    assert 0 < crystal["peak_kv_bytes"] <= crystal["peak_reserved_kv_bytes"]


@pytest.mark.slow
def test_http_smoke(tmp_path: Path) -> None:
    argv = [
        "--mode",
        "http",
        "--cases",
        "crystal:16",
        "--num-requests",
        "3",
        "--prompt-len",
        "40",
        # Long enough that /metrics is polled while requests run: 16 tokens took 0.1 s on
        # a fast CI machine, between two polls.
        "--output-len",
        "120",
        "--memory-requests",
        "2",
        "--poll-interval",
        "0.05",
        # The 40-token prompts count in the budget, so budget 16 must evict.
        "--kv-policy-config",
        '{"prompt": "evict"}',
    ]
    (crystal,) = _run(argv, tmp_path)
    assert crystal["mode"] == "http" and crystal["generated_tokens"] == 3 * 120
    assert [r["tokens"] for r in crystal["requests"]] == [120] * 3
    assert crystal["evictions"] > 0  # read from the server's log after the run
    assert crystal["total_blocks"] == 2 * 5  # 2 requests x ceil(160 / 32) blocks
    assert crystal["peak_running"] >= 1 and crystal["timeline"]
    assert 0 < crystal["ttft_median_s"] <= crystal["e2e_median_s"]


def test_script_runs_as_a_file() -> None:
    import subprocess

    out = subprocess.run(
        [sys.executable, str(Path(tp.__file__)), "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "--memory-requests" in out.stdout


def test_kv_geometry_counts_the_dtype_bytes(tiny_model) -> None:
    bf16 = KVGeometry.from_model_dir(tiny_model)
    fp32 = KVGeometry.from_model_dir(tiny_model, "float32")
    assert fp32.block_bytes(32) == 2 * bf16.block_bytes(32)
