"""Soak benchmark: the request mix, the checks it applies, and a short run in CI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from benchmarks import soak
from benchmarks.soak import RequestPlan, SoakSettings


def test_the_mix_has_every_ingredient() -> None:
    settings = SoakSettings(requests=400, server_budget=64, max_model_len=512, max_prompt=400)
    plans = soak.make_plans(settings, random.Random(0))
    assert len(plans) == 400
    assert all(1 <= p.kv_budget <= 64 for p in plans)
    assert all(len(p.prompt) + p.max_tokens <= 512 and p.max_tokens >= 1 for p in plans)
    assert {len(p.prompt) > 256 for p in plans} == {True, False}  # compressed and kept prompts
    assert {p.n for p in plans} == {1, 2, 3}
    assert 0.15 < sum(p.disconnect_after is not None for p in plans) / 400 < 0.25
    assert 0.2 < sum(p.stop is not None for p in plans) / 400 < 0.4
    assert plans == soak.make_plans(settings, random.Random(0))  # seeded


def test_half_of_the_prompts_share_the_prefix() -> None:
    settings = SoakSettings(requests=400, max_prompt=400, prompt_mode="keep", shared_prefix=96)
    plans = soak.make_plans(settings, random.Random(0))
    starts = [tuple(p.prompt[:96]) for p in plans]
    common = max(set(starts), key=starts.count)
    assert 0.4 < starts.count(common) / 400 < 0.6
    assert all(len(p.prompt) > 96 for p in plans if tuple(p.prompt[:96]) == common)
    assert all(len(p.prompt) + p.max_tokens <= 512 for p in plans)
    with pytest.raises(ValueError, match="shared_prefix 400"):
        SoakSettings(max_prompt=400, shared_prefix=400)
    with pytest.raises(ValueError, match="prompt_mode 'kept'"):
        SoakSettings(prompt_mode="kept")


def _plan(**changes) -> RequestPlan:
    base = dict(
        prompt=[1],
        max_tokens=5,
        kv_budget=4,
        n=2,
        stop=None,
        temperature=1.0,
        seed=0,
        disconnect_after=None,
    )
    return RequestPlan(**{**base, **changes})


def test_a_finished_request_must_have_every_choice_and_token() -> None:
    soak.check_finished(_plan(), {0: "length", 1: "length"}, {0: 5, 1: 5})
    soak.check_finished(_plan(stop=["e"]), {0: "stop", 1: "length"}, {0: 2, 1: 5})
    with pytest.raises(RuntimeError, match="asked for n=2, got choices"):
        soak.check_finished(_plan(), {0: "length"}, {0: 5})
    with pytest.raises(RuntimeError, match="finished by length with 4 of 5 tokens"):
        soak.check_finished(_plan(), {0: "length", 1: "length"}, {0: 5, 1: 4})
    with pytest.raises(RuntimeError, match="finished with 'abort'"):
        soak.check_finished(_plan(), {0: "length", 1: "abort"}, {0: 5, 1: 1})


def test_idle_and_log_checks_name_what_is_left() -> None:
    idle = dict.fromkeys(
        ["running", "waiting", "kv_cache_usage", "head_blocks_in_use", "compressed_running"], 0.0
    )
    idle["head_blocks_capacity"] = 512.0
    assert soak.idle_problems(idle) == []
    assert soak.idle_problems({**idle, "head_blocks_in_use": 8.0}) == [
        "head_blocks_in_use is 8 after the drain, not 0"
    ]
    assert "not every block is free" in soak.idle_problems({**idle, "kv_cache_usage": 0.1})[0]
    log = "\n".join(
        [
            "(APIServer pid=1) INFO 12-02 [x.py:1] fine",
            "(Worker pid=2) WARNING 12-02 [utils.py:597] Failed ... Exception: oneDNN",
            "(EngineCore pid=3) ERROR 12-02 [core.py:9] boom",
            "Traceback (most recent call last):",
        ]
    )
    assert soak.log_problems(log) == [
        "(EngineCore pid=3) ERROR 12-02 [core.py:9] boom",
        "Traceback (most recent call last):",
    ]


def test_arguments_refuse_bad_values(capsys) -> None:
    for argv in (["--requests", "0"], ["--policies", "none"], ["--max-model-len", "16"]):
        with pytest.raises(SystemExit):
            soak.parse_args(argv)
    assert "--max-model-len 16 is invalid" in capsys.readouterr().err
    assert soak.parse_args([]).policies == list(soak.SOAK_POLICIES)


@pytest.mark.slow
def test_short_soak_loses_nothing(tmp_path: Path) -> None:
    """The CI version: two policies (the fused LRFU path and a windowed one), 100 requests
    each on the tiny model, prompts kept and half of them sharing a 96-token prefix, so
    that prefix-cache hits, aborts and preemptions meet on shared prompt blocks."""
    pytest.importorskip("openai")
    status = soak.main(
        [
            "--model",
            "tiny",
            "--policies",
            "crystal",
            "snapkv",
            "--requests",
            "100",
            "--prompt-mode",
            "keep",
            "--shared-prefix",
            "96",
            "--results-dir",
            str(tmp_path),
            "--log-dir",
            str(tmp_path / "logs"),
        ]
    )
    (result,) = tmp_path.glob("*_soak.json")
    rows = json.loads(result.read_text())["policies"]
    assert [row["problems"] for row in rows] == [[], []]
    assert status == 0
    for row in rows:
        assert row["failed"] == 0 and row["disconnected"] > 0
        assert row["completed"] + row["disconnected"] == 100
        assert row["preemptions"] > 0 and row["evicted_entries"] > 0
        assert row["prefix_cache_hits"] > 0
        assert row["head_blocks_in_use_after"] == 0 and row["kv_cache_usage_after"] == 0
