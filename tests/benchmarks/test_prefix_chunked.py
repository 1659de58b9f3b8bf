"""Prefix/chunked benchmark: the flags of every side, the shared system prompt, reading
/metrics, the inter-token gap statistics, the report, and one tiny end-to-end run."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks import prefix_chunked as pc
from benchmarks.common.datasets import Problem, load_gsm8k
from benchmarks.common.prompts import FINAL_ANSWER_PREFIX, few_shot_system_prompt

# -- arguments and flags -------------------------------------------------------------------


def _args(*argv: str):
    return pc.build_parser().parse_args(list(argv))


def test_defaults() -> None:
    args = _args()
    assert [pc.er.case_label(*c) for c in args.cases] == ["none", "crystal:64"]
    assert args.kv_policy_config == {"prompt": "keep"}
    assert args.experiments == ["shared", "chunked"] and args.chunk_modes == ["on", "off"]
    assert args.dtype == "float32" and args.block_size == 32
    assert (args.shared_requests, args.system_tokens) == (32, 1500)
    assert (args.long_prompt_len, args.short_requests, args.chunk_tokens) == (8000, 8, 512)


def _flags(policy, budget, config=None, chunked=True, mnbt=512):
    return pc.serve_flags(
        policy, budget, config, block_size=32, max_model_len=8040, max_num_seqs=9,
        dtype="float32", seed=3, chunked=chunked, max_num_batched_tokens=mnbt,
    )  # fmt: skip


def test_serve_flags_differ_only_in_the_policy() -> None:
    none, crystal = _flags("none", None), _flags("crystal", 64, {"prompt": "keep"})
    shared = none[:-2]
    assert crystal[: len(shared)] == shared and none[-2:] == ["--kv-policy", "none"]
    assert crystal[len(shared) :] == [
        "--kv-policy", "crystal", "--kv-budget", "64", "--kv-policy-config", '{"prompt": "keep"}'
    ]  # fmt: skip
    text = " ".join(shared)
    for flag in (
        "--enforce-eager", "--dtype float32", "--block-size 32", "--max-model-len 8040",
        "--max-num-seqs 9", "--enable-prefix-caching", "--enable-chunked-prefill",
        "--max-num-batched-tokens 512", "--seed 3",
    ):  # fmt: skip
        assert flag in text
    assert "--no-enable-prefix-caching" not in text
    off = " ".join(_flags("none", None, chunked=False, mnbt=8040))
    assert "--no-enable-chunked-prefill" in off and "--max-num-batched-tokens 8040" in off


def test_serve_flags_exist_in_vllm() -> None:
    pytest.importorskip("vllm")
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    known = {opt for action in parser._actions for opt in action.option_strings}
    for flags in (_flags("none", None), _flags("none", None, chunked=False, mnbt=8040)):
        assert {f for f in flags[:-2] if f.startswith("--")} <= known


# -- prompts -------------------------------------------------------------------------------


def test_gsm8k_solutions_and_few_shot_prompt() -> None:
    first = load_gsm8k(limit=1)[0]
    assert first.solution.startswith("Janet sells 16 - 3 - 4 = 9 duck eggs")
    assert "<<" not in first.solution and "####" not in first.solution
    text = few_shot_system_prompt([first, first])
    assert text.count("Question: Janet") == 2 and "Example 2." in text
    assert f"{FINAL_ANSWER_PREFIX} 18" in text


def test_pick_examples_from_the_end() -> None:
    problems = [Problem(f"p{i}", "q", str(i), "s") for i in range(10)]
    picked = pc.pick_examples(problems, lambda ex: 100 * len(ex), 250, reserved=4)
    assert [p.id for p in picked] == ["p9", "p8", "p7"]
    with pytest.raises(ValueError, match="fewer than 1000 tokens"):
        pc.pick_examples(problems, lambda ex: 100 * len(ex), 1000, reserved=4)


class _Tokenizer:
    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def test_long_prompt_is_exactly_the_length() -> None:
    ids = pc.long_prompt(_Tokenizer(), ["ab", "c"], 17)
    assert len(ids) == 17 and ids[:4] == [ord("a"), ord("b"), 10, 10]
    with pytest.raises(ValueError, match="no tokens"):
        pc.long_prompt(SimpleNamespace(encode=lambda text, add_special_tokens: []), ["x"], 3)


def test_common_prefix_len() -> None:
    assert pc.common_prefix_len([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert pc.common_prefix_len([[1, 2], [1, 2]]) == 2
    assert pc.common_prefix_len([[7], [1]]) == 0


# -- /metrics ------------------------------------------------------------------------------

PAGE = """\
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{{engine="0",model_name="m"}} {queries}
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{{engine="0",model_name="m"}} {hits}
# HELP vllm:kv_cache_usage_perc KV-cache usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",model_name="m"}} {usage}
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{{block_size="32",enable_prefix_caching="{prefix}",num_gpu_blocks="101"}} 1.0
"""

HEAD = """\
# HELP crystal_kv:head_blocks_in_use Head-blocks in use.
# TYPE crystal_kv:head_blocks_in_use gauge
crystal_kv:head_blocks_in_use{{engine="0",model_name="m"}} {head}
"""


def _page(queries=0.0, hits=0.0, usage=0.0, prefix="True", head=None) -> str:
    text = PAGE.format(queries=queries, hits=hits, usage=usage, prefix=prefix)
    return text + (HEAD.format(head=head) if head is not None else "")


def test_read_reading() -> None:
    reading = pc.read_reading(_page(1000, 600, 0.25, head=90))
    assert reading == {
        "prefix_queries": 1000, "prefix_hits": 600, "kv_usage": 0.25, "head_blocks": 90
    }  # fmt: skip
    assert pc.read_reading(_page())["head_blocks"] is None
    assert pc.read_reading("")["prefix_queries"] is None


def test_prefix_caching_state() -> None:
    assert pc.prefix_caching_state(_page(), "") == {"enabled": True, "plugin_turned_off": False}
    log = "INFO crystal-vllm: prefix caching is off (evicted blocks are never shared)\n"
    assert pc.prefix_caching_state(_page(prefix="False"), log) == {
        "enabled": False,
        "plugin_turned_off": True,
    }
    assert pc.prefix_caching_state("", "")["enabled"] is None


def test_hit_rate_and_peak_kv() -> None:
    before, after = pc.read_reading(_page(100, 0)), pc.read_reading(_page(1100, 800))
    assert pc.hit_rate(before, after) == {"queries": 1000, "hits": 800, "hit_rate": 0.8}
    assert pc.hit_rate(before, before)["hit_rate"] is None  # no query: not 0
    assert pc.hit_rate(pc.read_reading(""), after)["queries"] is None
    samples = [pc.read_reading(_page(usage=u, head=h)) for u, h in ((0.1, 30), (0.5, 180))]
    assert pc.peak_kv(samples, 100, heads=90) == {
        "peak_kv_usage": 0.5, "peak_blocks": 50, "peak_head_blocks": 180,
        "peak_head_block_equiv": 2.0,
    }  # fmt: skip
    assert pc.peak_kv([pc.read_reading(_page(usage=0.2))], 100, 90)["peak_head_blocks"] is None


# -- gaps ----------------------------------------------------------------------------------


def test_percentile_and_gap_stats() -> None:
    assert pc.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert pc.percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    assert math.isnan(pc.percentile([], 50))
    stats = pc.gap_stats([0.1, 0.1, 0.4])
    assert stats["n"] == 3 and stats["mean_s"] == pytest.approx(0.2)
    assert stats["p50_s"] == 0.1 and stats["max_s"] == 0.4
    assert math.isnan(pc.gap_stats([])["max_s"])


def test_split_gaps() -> None:
    # Prefill from 1.0 to 3.0: request 0 stalls across it, request 1 keeps streaming.
    during, before = pc.split_gaps([[0.0, 0.5, 1.0, 3.5, 3.6], [0.2, 0.9, 1.5, 2.5, 3.1]], 1.0, 3.0)
    assert before == pytest.approx([0.5, 0.5, 0.7])
    assert during == pytest.approx([2.5, 0.6, 1.0, 0.6])


def _shared_load():
    def reading(q, h, u):
        return {"prefix_queries": q, "prefix_hits": h, "kv_usage": u, "head_blocks": None}

    return {
        "warmup": {"ttft_s": 2.0},
        "timings": [
            {"start": 10.0, "first": 10.5, "end": 12.0, "tokens": 4},
            {"start": 10.0, "first": 11.5, "end": 14.0, "tokens": 4},
        ],
        "readings": [(0.0, reading(0, 0, 0.1)), (1.0, reading(0, 0, 0.3))],
        "before": reading(100, 50, 0.0),
        "after": reading(300, 200, 0.0),
    }


def _chunked_load():
    return {
        "long_sent_s": 1.0, "long_first_s": 3.0, "long_end_s": 3.2, "long_ttft_s": 2.0,
        "short_arrivals": [[0.0, 0.5, 1.0, 3.5, 3.6], [0.2, 0.9, 1.5, 2.5, 3.1]],
        "short_tokens": [[1] * 5, [1, 1, 1, 1, 2]], "short_finished_early": 0,
    }  # fmt: skip


def test_summaries() -> None:
    shared = pc.shared_summary(_shared_load(), usable_blocks=100, heads=90)
    assert shared["hit_rate"] == 0.75 and shared["warmup_ttft_s"] == 2.0
    assert shared["mean_ttft_s"] == 1.0 and shared["median_ttft_s"] == 1.0
    assert shared["output_tok_s"] == 2.0 and shared["peak_blocks"] == 30
    chunked = pc.chunked_summary(_chunked_load())
    assert chunked["long_ttft_s"] == 2.0 and chunked["itl_during"]["max_s"] == 2.5
    assert chunked["itl_before"]["n"] == 3 and chunked["short_tokens_per_chunk"] == 1.1


def test_report_and_plot() -> None:
    common = {"policy": "none", "budget": None, "label": "none", "load_avg_1m": [1.0, 2.0],
              "prefix_caching": {"enabled": True, "plugin_turned_off": False},
              "usable_blocks": 100, "heads": 90}  # fmt: skip
    shared = {**common, **pc.shared_summary(_shared_load(), 100, 90),
              "kv_timeline": [[0.0, 0.1, None], [1.0, 0.3, None]]}  # fmt: skip
    crystal = {**shared, "label": "crystal:64", "hits": 0.0, "queries": 0.0, "hit_rate": None,
               "prefix_caching": {"enabled": False, "plugin_turned_off": True},
               "kv_timeline": [[0.0, 0.1, 90], [1.0, 0.3, 180]]}  # fmt: skip
    text = pc.report_shared([shared, crystal])
    assert "| none | on | 0.750 | 150 / 200 |" in text
    assert "| crystal:64 | off (plugin turned it off) | n/a | 0 / 0 |" in text
    chunked = {**common, "chunk_label": "on (512)", **pc.chunked_summary(_chunked_load()),
               "stream": _chunked_load()}  # fmt: skip
    text = pc.report_chunked([chunked])
    assert "| none | on (512) | 2.0 | 1175.0 |" in text
    pc.plot([shared, crystal], [chunked])
    pc.plot([], [chunked])
    pc.plot([shared], [])


# -- the client against a fake server ------------------------------------------------------


class _Stream:
    def __init__(self, chunks, delay):
        self.chunks, self.delay = chunks, delay

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        for chunk in self.chunks:
            await asyncio.sleep(self.delay)
            yield chunk


class _Completions:
    def __init__(self, delay):
        self.delay = delay

    async def create(self, *, prompt, max_tokens, **_):
        delay = self.delay * (10 if len(prompt) > 5 else 1)  # the long prompt is slow
        chunks = [
            SimpleNamespace(choices=[SimpleNamespace(token_ids=[i])], usage=None)
            for i in range(max_tokens)
        ]
        chunks.append(
            SimpleNamespace(choices=[], usage=SimpleNamespace(completion_tokens=max_tokens))
        )
        return _Stream(chunks, delay)


class _Client:
    def __init__(self, *_, **__):
        self.completions = _Completions(0.002)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False


def test_run_chunked_load_with_a_fake_server(monkeypatch) -> None:
    monkeypatch.setattr(pc, "_client", _Client)
    args = SimpleNamespace(
        short_max_tokens=10_000, short_warmup_tokens=3, long_output_len=4, tail_s=0.05
    )
    load = asyncio.run(pc.run_chunked_load("u", "m", [[1], [2]], list(range(9)), args))
    assert load["long_sent_s"] < load["long_first_s"] < load["long_end_s"]
    assert load["long_ttft_s"] > 0 and load["short_finished_early"] == 0
    # The short requests were cancelled, having streamed past the long request's end.
    assert all(times[-1] > load["long_end_s"] for times in load["short_arrivals"])
    assert all(len(times) >= 3 for times in load["short_arrivals"])


# -- end to end ----------------------------------------------------------------------------


def test_script_runs_as_a_file() -> None:
    out = subprocess.run(
        [sys.executable, str(Path(pc.__file__)), "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    for flag in ("--system-tokens", "--long-prompt-len", "--chunk-tokens", "--chunk-modes"):
        assert flag in out.stdout


@pytest.mark.slow
def test_smoke(tmp_path: Path) -> None:
    pc.main(
        [
            "--model", "tiny", "--cases", "crystal:16", "--chunk-modes", "off",
            "--shared-requests", "3", "--system-tokens", "200", "--shared-output-len", "4",
            "--shared-concurrency", "2", "--long-prompt-len", "1000", "--short-requests", "2",
            "--tail-s", "0.2", "--poll-interval", "0.1",
            "--results-dir", str(tmp_path), "--name", "smoke",
        ]
    )  # fmt: skip
    (path,) = tmp_path.glob("*_prefix_chunked_smoke.json")
    assert path.with_suffix(".png").exists() and path.with_suffix(".md").exists()
    record = json.loads(path.read_text())
    (shared,) = record["shared"]
    # Whatever the server does with prefix caching, the script reports it.
    if shared["prefix_caching"]["enabled"]:
        assert shared["hits"] > 0
    else:
        assert shared["prefix_caching"]["plugin_turned_off"] and not shared["hits"]
    assert shared["mean_ttft_s"] > 0 and shared["output_tok_s"] > 0
    # The policy's gauge is on /metrics (a short run may end between two polls).
    assert shared["peak_head_blocks"] is not None
    (chunked,) = record["chunked"]
    assert chunked["long_ttft_s"] > 0 and chunked["itl_during"]["n"] > 0
    assert record["inputs"]["chunked"]["long_prompt_tokens"] == 1000
